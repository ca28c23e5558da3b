"""Everything in surgery that trains: the one loop and the methods built on it.

* :mod:`surgery.training.loop`: :func:`train` (AdamW, warm-up + cosine, EMA, AMP, resumable
  checkpoints) and :func:`evaluate`;
* :mod:`surgery.training.schedule`, :mod:`~surgery.training.checkpoint`, :mod:`~surgery.training.report`:
  its learning-rate schedule and EMA, its checkpoint files, its progress output and metrics log;
* :mod:`surgery.training.finetune`: ``surgery finetune`` / ``surgery evaluate`` on a saved model folder;
* :mod:`surgery.training.incubation` and :mod:`~surgery.training.incubation_run`: module incubation
  (Deep Incubation): modules, meta model and hybrids, and ``surgery incubate``'s resumable phases.

The loop's public names are re-exported here and from :mod:`surgery` itself.
"""

from __future__ import annotations

from surgery.training.loop import (
    EPOCH_KEYS,
    STEP_KEYS,
    Task,
    TrainConfig,
    TrainResult,
    classification_task,
    evaluate,
    select_trainable,
    train,
)

__all__ = ["EPOCH_KEYS", "STEP_KEYS", "Task", "TrainConfig", "TrainResult", "classification_task", "evaluate",
           "select_trainable", "train"]
