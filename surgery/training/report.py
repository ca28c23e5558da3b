"""What a training run shows and logs: a progress bar or plain lines, and ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["TrainReporter", "append_jsonl", "truncate_metrics"]


class TrainReporter:
    """A rich progress bar per epoch on a terminal; plain periodic lines otherwise; nothing when quiet."""

    def __init__(self, quiet: bool, epochs: int, steps: int, log_every: int):
        from rich.console import Console

        self.epochs, self.steps, self.log_every = epochs, steps, log_every
        console = Console()
        self.mode = "quiet" if quiet else ("rich" if console.is_terminal else "plain")
        self.progress = None
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=console,
            )
            self.progress.start()
        self.task = None

    def start_epoch(self, epoch: int) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task(f"epoch {epoch}/{self.epochs}", total=self.steps, metrics="")

    def step(self, epoch: int, step_in_epoch: int, metrics: dict[str, Any] | None) -> None:
        if self.progress is not None:
            text = (f"loss {metrics['loss']:.4f}{_acc(metrics['acc'], 3)} {metrics['images_per_s']:.0f} img/s"
                    if metrics else None)
            self.progress.update(self.task, advance=1, **({"metrics": text} if text else {}))
        elif self.mode == "plain" and metrics:
            print(f"epoch {epoch}/{self.epochs} step {step_in_epoch}/{self.steps} loss {metrics['loss']:.4f}"
                  f"{_acc(metrics['acc'], 4)} lr {metrics['lr']:.3e} {metrics['images_per_s']:.1f} img/s",
                  flush=True)

    def end_epoch(self, rec: dict[str, Any]) -> None:
        if self.mode == "quiet":
            return
        parts = [f"epoch {rec['epoch']}/{self.epochs}", f"train_loss {rec['train_loss']:.4f}"]
        if rec["train_acc"] is not None:
            parts.append(f"train_acc {rec['train_acc']:.4f}")
        # a task's extra loss terms (train_<name>), in the order it returned them
        parts += [f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("train_") and k not in _FIXED]
        for key in ("val_loss", "val_acc", "ema_val_loss", "ema_val_acc"):
            if rec[key] is not None:
                parts.append(f"{key} {rec[key]:.4f}")
        parts += [f"{rec['images_per_s']:.1f} img/s", f"{rec['epoch_time_s']:.1f}s"]
        line = " ".join(parts)
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


_FIXED = {"train_loss", "train_acc"}


def _acc(value: float | None, digits: int) -> str:
    return "" if value is None else f" acc {value:.{digits}f}"


def append_jsonl(path: Path | None, record: dict[str, Any]) -> None:
    """Append one JSON line to ``path`` (no-op for ``None``, and on ranks other than 0)."""
    from surgery import distributed

    if path is not None and distributed.is_main():
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, done_epochs: int) -> None:
    """Drop lines of epochs after the checkpoint (a crash mid-epoch leaves step lines behind)."""
    from surgery.workspace import write_text

    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= done_epochs:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a torn last line from the crash
    write_text(path, "".join(k + "\n" for k in kept))
