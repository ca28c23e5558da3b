"""AutoProg's elastic supernet: how much to grow, decided by training (Li et al., CVPR 2022, Sec. 4.3).

At the start of a stage the current model is grown to the largest candidate (the *elastic supernet*):
its new blocks can each be switched to the identity, and its input resolution can be lowered. The
supernet trains for a few epochs with one uniformly drawn sub-network per step (no sandwich rule,
as the paper's code); those epochs count in the run's budget. Each candidate ψ = (depth, resolution)
is then scored by the EMA sub-network's training loss L(ψ) and by its measured training-step time
T(ψ) on this machine, and :func:`surgery.training.growth.autoprog_choice` picks ``argmin L T^w``.
The chosen sub-network is extracted (its skipped blocks removed, live weights kept) and trains on.

* :class:`ElasticDepth`: which blocks of a supernet are active for a depth; switches them on any
  model of the supernet's structure (the live model and its EMA).
* :class:`InputSize`: a forward pre-hook resizing a model's inputs (bilinear, antialiased) to the
  stage's or the sampled resolution, during training and validation alike: the data stay at full
  resolution (AutoProg down-samples on the GPU the same way).
* :func:`candidates`: the (depth level, resolution level) pairs searched at a stage.
* :class:`SupernetTask`: the loop's task drawing a sub-network before each step.
* :func:`measure_candidates`: L and T of every candidate.

A skipped block's ``forward`` is replaced by the identity on the instance (not a wrapper module):
state-dict names stay those of the plain architecture, and no computation is spent on it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError
from surgery.training.growth import BlockGroup

__all__ = ["ElasticDepth", "InputSize", "Candidate", "candidates", "SupernetTask", "measure_candidates",
           "plot_searches"]


def _identity(x, *args, **kwargs):
    return x


@dataclass(frozen=True)
class Candidate:
    """A sub-network of the supernet: ``depth_level`` / ``res_level`` index the schedule's ramps."""

    depth_level: int
    res_level: int
    depths: tuple[int, ...]
    resolution: int


class ElasticDepth:
    """The skippable blocks of a supernet grown by :func:`~surgery.training.growth.grow_depth`.

    For a target depth ``d`` of a group grown from ``base`` blocks, the last ``d - base`` new blocks
    are active and the earlier new ones are skipped (AutoProg's ``set_sample_config``): depth ``base``
    is the model before growth, the full depth is the whole supernet.

    Args:
        groups: the supernet's groups (after growth); ``base``: each group's depth before growth;
        plans: :func:`grow_depth`'s plan of each group.
    """

    def __init__(self, groups: Sequence[BlockGroup], base: Sequence[int], plans: Sequence[list[tuple[int, int, bool]]]):
        self.groups, self.base = list(groups), list(base)
        self.new_blocks = [[k for k, _, is_new in plan if is_new] for plan in plans]

    def active(self, depths: Sequence[int]) -> list[list[int]]:
        """Run indices of the active blocks of every group at ``depths``."""
        out = []
        for group, base, new, depth in zip(self.groups, self.base, self.new_blocks, depths, strict=True):
            if not base <= depth <= group.length:
                raise SurgeryError(f"{group.container}: depth {depth} outside the supernet's {base}..{group.length}")
            on = set(new[len(new) - (depth - base):]) if depth > base else set()
            out.append([k for k in range(group.length) if k not in new or k in on])
        return out

    def apply(self, model: nn.Module, depths: Sequence[int] | None) -> None:
        """Switch ``model``'s blocks for ``depths`` (None: every block active)."""
        active = None if depths is None else self.active(depths)
        for gi, group in enumerate(self.groups):
            container = model.get_submodule(group.container)
            keep = None if active is None else set(active[gi])
            for k in range(group.length):
                block = container[group.start + k]
                skip = keep is not None and k not in keep
                if skip:
                    block.forward = _identity
                elif "forward" in block.__dict__:
                    del block.forward


class InputSize:
    """Resize a model's input batches to ``size`` (None or the batch's own size: untouched).

    Installed as a forward pre-hook (``with InputSize(model, 16) as s: ...``; set ``s.size`` to change
    it). Bilinear with antialiasing, so down-sampled images are low-passed, not aliased.
    """

    def __init__(self, model: nn.Module, size: int | None = None):
        self.model, self.size, self._handle = model, size, None

    def __deepcopy__(self, memo) -> InputSize:
        # A deep copy of the hooked model (timm's EMA is one) keeps resizing to the same, current size.
        return self

    def __enter__(self) -> InputSize:
        self._handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args):
        if self.size is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
            return None
        x = args[0]
        if x.shape[-2:] == (self.size, self.size):
            return None
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                          antialias=self.size < x.shape[-1])
        return (x, *args[1:])


def candidates(stage: int, depth_levels: Sequence[tuple[int, ...]], res_levels: Sequence[int],
               current: tuple[int, int] = (0, 0)) -> list[Candidate]:
    """The sub-networks searched at the start of ``stage`` (AutoProg's candidate sets, at most 3 per axis).

    Stage 0: depth and resolution each at their first, middle and last level ({9, 15, 18} x {128,
    192, 224} for VOLO-D1's 4 stages). Later stages: depth at the current level and the next two,
    resolution at the current level and the next one.

    Args:
        depth_levels: per-group depths of each ramp level (the manual schedule's, one per stage).
        res_levels: resolution of each ramp level; ``current``: the (depth, resolution) levels chosen so far.
    """
    last = len(depth_levels) - 1
    if stage == 0:
        d_opts = sorted({0, (last + 1) // 2, last})
        r_opts = sorted({0, (last + 1) // 2, last})
    else:
        d_opts = sorted({min(current[0] + j, last) for j in range(3)})
        r_opts = sorted({min(current[1] + j, last) for j in range(2)})
    out: dict[tuple, Candidate] = {}  # levels of equal values (a ramp that does not move) are one candidate
    for d in d_opts:
        for r in r_opts:
            key = (tuple(depth_levels[d]), int(res_levels[r]))
            out.setdefault(key, Candidate(d, r, *key))
    return list(out.values())


class SupernetTask:
    """The loop's task for supernet training: a uniformly drawn sub-network before every step.

    The draw depends only on ``(seed, step)``, so every rank draws the same sub-network and a resumed
    run draws what the uninterrupted one did.
    """

    def __init__(self, base: Callable, model: nn.Module, elastic: ElasticDepth, size: InputSize,
                 options: Sequence[Candidate], seed: int):
        self.base, self.model, self.elastic, self.size = base, model, elastic, size
        self.options, self.seed = list(options), seed

    def on_step(self, step: int, total: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        pick = self.options[int(torch.randint(len(self.options), (1,), generator=g))]
        self.elastic.apply(self.model, pick.depths)
        self.size.size = pick.resolution

    def __call__(self, model, x, y):
        return self.base(model, x, y)


def _autocast(x: torch.Tensor):
    """Mixed precision on CUDA, as the loop trains there (a step timed in float32 would mislead)."""
    return torch.autocast(x.device.type, dtype=torch.float16, enabled=x.device.type == "cuda")


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(saved[n])


def measure_candidates(model: nn.Module, ema: nn.Module, elastic: ElasticDepth, size: InputSize,
                       options: Sequence[Candidate],
                       batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, seed: int = 0,
                       timed_steps: int = 3, clock: Callable[[], float] = time.perf_counter) -> list[dict[str, float]]:
    """L(ψ) and T(ψ) of every candidate (AutoProg's ``validate_trainset`` and step timing).

    L: the EMA sub-network's mean loss over ``batches`` (fixed training batches) in train mode, as
    the paper's code (batch statistics, dropout drawn from ``seed``), without gradients; the EMA's
    buffers are restored afterwards. T: the median of ``timed_steps`` forward + backward passes of the
    live sub-network on the first batch after one untimed pass; gradients and buffers are restored.
    ``size`` must resize both models' inputs (a deep copy of a hooked model shares its hook).

    Returns:
        ``[{"depth_level", "res_level", "depths", "resolution", "loss", "step_s"}, ...]`` in ``options`` order.
    """
    out = []
    was = model.training, ema.training
    saved_model, saved_ema = _buffers(model), _buffers(ema)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.train()
    ema.train()
    try:
        for cand in options:
            elastic.apply(ema, cand.depths)
            size.size = cand.resolution
            torch.manual_seed(seed)
            total, n = 0.0, 0
            with torch.no_grad():
                for x, y in batches:
                    with _autocast(x):
                        total += float(loss_fn(ema(x), y)) * y.shape[0]
                    n += y.shape[0]
            _restore(ema, saved_ema)
            elastic.apply(model, cand.depths)
            x, y = batches[0]
            times = []
            for i in range(timed_steps + 1):
                t0 = clock()
                with _autocast(x):
                    loss = loss_fn(model(x), y)
                loss.backward()
                if i:
                    times.append(clock() - t0)
            model.zero_grad(set_to_none=True)
            _restore(model, saved_model)
            out.append({"depth_level": cand.depth_level, "res_level": cand.res_level, "depths": list(cand.depths),
                        "resolution": cand.resolution, "loss": total / max(n, 1),
                        "step_s": statistics.median(times)})
    finally:
        elastic.apply(model, None)
        elastic.apply(ema, None)
        for name, p in model.named_parameters():
            p.grad = grads[name]
        model.train(was[0])
        ema.train(was[1])
    return out


def plot_searches(searches: Sequence[dict], path) -> None:
    """AutoProg's choices as a picture: per searched stage, every candidate's step time T against its
    EMA loss L, the fitted power law L = a T^b and the chosen candidate circled.

    Args:
        searches: ``[{"stage", "candidates": [{"loss", "step_s", "depths", "resolution"}], "chosen", "fit"}]``.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(searches), figsize=(4.2 * len(searches), 3.6), squeeze=False)
    for ax, search in zip(axes[0], searches, strict=True):
        table = search["candidates"]
        t = np.array([c["step_s"] * 1e3 for c in table])
        loss = np.array([c["loss"] for c in table])
        ax.scatter(t, loss, s=18)
        for c, x, y in zip(table, t, loss, strict=True):
            ax.annotate(f"{'/'.join(map(str, c['depths']))}@{c['resolution']}", (x, y), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        grid = np.linspace(t.min(), t.max(), 50)
        fit = search["fit"]
        ax.plot(grid, fit["a"] * np.power(grid / 1e3, fit["b"]), lw=1, label=f"L = a T^{fit['b']:.2f}")
        best = search["chosen"]
        ax.scatter([t[best]], [loss[best]], s=120, facecolors="none", edgecolors="red", label="chosen")
        ax.set_xlabel("training step (ms)")
        ax.set_ylabel("EMA training loss")
        ax.set_title(f"stage {search['stage'] + 1}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    from surgery.workspace import atomic_path

    with atomic_path(path) as tmp:  # rank 0 writes; an interrupted write leaves the last picture
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
