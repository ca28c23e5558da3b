"""Co-training S members on their own views of the same images (Divide-and-Co-training, the engine).

Zhao et al., "Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training" (IEEE TIP 2022),
Sec. III-B and III-C: every member sees its own, independently augmented view of each image; the
loss is the sum of the members' cross-entropies plus ``lambda`` times the generalised Jensen-Shannon
divergence of their predictions, ``H(mean_i p_i) - mean_i H(p_i)`` (:func:`jsd`), with ``lambda``
warmed up linearly (0.5 after the first part of training); the ensemble's prediction is the mean of
the members' logits. Mixup, when enabled, is drawn once for all views (same ``lambda`` and pairing),
so the agreement term compares predictions of the same mixed targets.

The paper's code runs its members one after another in a Python loop. Members of one architecture
run here as one batched model (:class:`StackedMembers`: ``torch.func.stack_module_state`` +
``functional_call`` under ``vmap``, each member's parameters stacked along a leading ``S`` axis,
batch-norm statistics per member); members of different architectures, or a model vmap cannot
run, use :class:`LoopedMembers`. Both train in the project's one loop (:func:`surgery.training.train`)
through :class:`CoTrainingTask`, and become an :class:`Ensemble` (plain modules, what a model folder
holds) with :func:`to_ensemble`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.errors import SurgeryError

__all__ = ["jsd", "co_training_views", "StackedMembers", "LoopedMembers", "Ensemble", "CoTrainingTask",
           "make_members", "to_ensemble"]


def jsd(logits: Tensor) -> Tensor:
    """Generalised Jensen-Shannon divergence of S predictions, averaged over the batch.

    ``H(mean_i p_i) - (1/S) sum_i H(p_i)`` with ``p_i = softmax(logits_i)`` (the paper, Eq. 4); zero
    when all members agree, at most ``log S``. Computed in float32 or wider from log-probabilities
    (``log mean_i p_i`` by logsumexp), so confident predictions do not underflow.

    Args:
        logits: ``(S, B, K)``.

    Returns:
        A scalar tensor (nats).
    """
    if logits.dim() != 3:
        raise SurgeryError(f"jsd expects (S, B, K) logits, got shape {tuple(logits.shape)}")
    low = logits.dtype in (torch.float16, torch.bfloat16)
    logp = (logits.float() if low else logits).log_softmax(-1)
    s = logits.shape[0]
    log_mean = torch.logsumexp(logp, dim=0) - math.log(s)  # (B, K)
    h_mean = -(log_mean.exp() * log_mean).sum(-1)
    h_each = -(logp.exp() * logp).sum(-1).mean(0)
    return (h_mean - h_each).mean()


def co_training_views(x: Tensor, ways: int, *, padding: int | None = None, flip: bool = True) -> Tensor:
    """S independently augmented views of a batch: random crop with zero padding and horizontal flip.

    The augmentation of the paper's CIFAR recipe, per member and per image, on the batch's device in
    one gather (no Python loop over images). Zero padding of a normalised batch pads with the mean
    colour. Randomness comes from torch's global generator (the loop's checkpoints restore it).

    Args:
        x: ``(B, C, H, W)``.
        ways: S.
        padding: pixels on each side; default ``H // 8`` (4 at 32 px).
        flip: random horizontal flips.

    Returns:
        ``(S, B, C, H, W)``.
    """
    b, c, h, w = x.shape
    pad = h // 8 if padding is None else padding
    dev = x.device
    out = x.unsqueeze(0).expand(ways, b, c, h, w)
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
        dy = torch.randint(0, 2 * pad + 1, (ways, b), device=dev)
        dx = torch.randint(0, 2 * pad + 1, (ways, b), device=dev)
        rows = (dy[..., None] + torch.arange(h, device=dev))[..., :, None]  # (S, B, H, 1)
        cols = (dx[..., None] + torch.arange(w, device=dev))[..., None, :]  # (S, B, 1, W)
        bidx = torch.arange(b, device=dev)[None, :, None, None]
        out = padded.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 1, 4, 2, 3)  # (S, B, C, H, W)
    if flip:
        mask = torch.rand(ways, b, device=dev) < 0.5
        out = torch.where(mask[:, :, None, None, None], out.flip(-1), out)
    return out.contiguous()


class StackedMembers(nn.Module):
    """S members of one architecture as one batched model (``torch.func`` vmap).

    ``stacked`` mirrors a member's module tree, each parameter and buffer with a leading ``S`` axis
    (so the state dict reads like a member's, shapes ``(S, ...)``); the forward runs the members'
    structure (a copy on the meta device, never registered) through ``functional_call`` under
    ``vmap``. Batch-norm statistics update per member in training mode; dropout and drop-path draw
    different masks per member.

    ``forward(x)`` with ``x`` of shape ``(B, C, H, W)`` returns the ensemble's logits ``(B, K)`` (the
    mean of the members'); ``forward(x, per_member=True)`` returns ``(S, B, K)``, and ``x`` may then
    be ``(S, B, C, H, W)``, one view per member.

    Raises:
        SurgeryError: members of different structure (use :class:`LoopedMembers`).
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        from torch.func import stack_module_state

        members = list(members)
        shapes = [[(n, tuple(t.shape)) for n, t in m.state_dict().items()] for m in members]
        if any(s != shapes[0] for s in shapes[1:]) or any(type(m) is not type(members[0]) for m in members):
            raise SurgeryError("stacked members must share one architecture; use LoopedMembers")
        params, buffers = stack_module_state(members)
        self.ways = len(members)
        self.stacked = copy.deepcopy(members[0])
        for name, value in params.items():
            owner, leaf = self._owner(name)
            setattr(owner, leaf, nn.Parameter(value.detach().clone()))
        for name, value in buffers.items():
            owner, leaf = self._owner(name)
            owner._buffers[leaf] = value.detach().clone()
        self._member_dims = {n: t.dim() for n, t in members[0].named_parameters()}
        object.__setattr__(self, "_structure", copy.deepcopy(members[0]).to("meta"))
        self.train(members[0].training)

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        prefix, _, leaf = name.rpartition(".")
        return (self.stacked.get_submodule(prefix) if prefix else self.stacked), leaf

    def train(self, mode: bool = True) -> StackedMembers:
        super().train(mode)
        self._structure.train(mode)
        return self

    def no_weight_decay(self) -> set[str]:
        """Names of stacked biases and norm weights (1-D per member: the loop skips their decay)."""
        return {f"stacked.{n}" for n, d in self._member_dims.items() if d <= 1}

    def forward(self, x: Tensor, per_member: bool = False) -> Tensor:
        from torch.func import functional_call

        params = dict(self.stacked.named_parameters())
        buffers = dict(self.stacked.named_buffers())

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(self._structure, (p, b), (xi,))

        views = x.dim() == 5
        if views and x.shape[0] != self.ways:
            raise SurgeryError(f"got {x.shape[0]} views for {self.ways} members")
        out = torch.vmap(one, in_dims=(0, 0, 0 if views else None), randomness="different")(params, buffers, x)
        return out if per_member else out.mean(0)


class LoopedMembers(nn.Module):
    """S members (any architectures with the same classes) run one after another; same contract as
    :class:`StackedMembers`."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.ways = len(self.members)

    def forward(self, x: Tensor, per_member: bool = False) -> Tensor:
        views = x.dim() == 5
        out = torch.stack([m(x[i] if views else x) for i, m in enumerate(self.members)])
        return out if per_member else out.mean(0)


_POOLS: dict[int, Any] = {}


def _thread_pool(workers: int):
    """A process-wide thread pool per size (members run concurrently on CPU; created once)."""
    from concurrent.futures import ThreadPoolExecutor

    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="surgery-member")
    return _POOLS[workers]


class Ensemble(nn.Module):
    """The trained members as plain modules: logits are the mean of the members' (the paper's rule).

    What a saved ensemble folder loads into; ``torch.export`` traces it like any model, and
    ``ensemble.members[i]`` is member ``i`` alone.

    ``forward(x)``: ``(B, C, H, W)`` -> ``(B, K)``. ``concurrent=True`` runs the members in parallel:
    one Python thread each on CPU (torch releases the GIL inside its kernels), one CUDA stream each
    on GPU.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.concurrent = False

    def member_logits(self, x: Tensor) -> Tensor:
        """``(S, B, K)``: every member's logits."""
        if not self.concurrent or len(self.members) == 1:
            return torch.stack([m(x) for m in self.members])
        if x.is_cuda:
            current = torch.cuda.current_stream(x.device)
            streams = [torch.cuda.Stream(x.device) for _ in self.members]
            outs = []
            for m, stream in zip(self.members, streams, strict=True):
                stream.wait_stream(current)
                with torch.cuda.stream(stream):
                    outs.append(m(x))
            for stream in streams:
                current.wait_stream(stream)
            return torch.stack(outs)
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def run(m: nn.Module) -> Tensor:  # grad and inference modes are per thread: carry the caller's
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return m(x)

        return torch.stack(list(_thread_pool(len(self.members)).map(run, self.members)))

    def forward(self, x: Tensor) -> Tensor:
        return self.member_logits(x).mean(0)


def make_members(members: Sequence[nn.Module], batched: bool | str = "auto",
                 example: Tensor | None = None) -> tuple[nn.Module, str]:
    """The members as one trainable module: stacked (vmap) when possible, else looped.

    Args:
        members: the S members.
        batched: ``True`` (stacked, or an error), ``False`` (looped) or ``"auto"`` (stacked when the
            members share an architecture and a training forward of ``example`` runs under vmap).
        example: a small input ``(B, C, H, W)`` for the ``"auto"`` check.

    Returns:
        ``(module, "stacked" | "looped")``.
    """
    if batched is False or len(members) == 1 and batched == "auto":
        return LoopedMembers(members), "looped"
    try:
        stacked = StackedMembers(members)
        if batched == "auto" and example is not None:
            state = copy.deepcopy(stacked.state_dict())
            with torch.no_grad():
                stacked.train()(example, per_member=True)
            stacked.load_state_dict(state)  # the check must not move batch-norm statistics
        return stacked, "stacked"
    except Exception as e:  # noqa: BLE001  (vmap refuses many ops in many ways: any refusal means loop)
        if batched is True:
            raise SurgeryError(f"members cannot run batched: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
                               ) from None
        return LoopedMembers(members), "looped"


def to_ensemble(trained: nn.Module, template: Sequence[nn.Module]) -> Ensemble:
    """An :class:`Ensemble` of plain member modules holding ``trained``'s weights.

    Args:
        trained: a :class:`StackedMembers` or :class:`LoopedMembers`.
        template: S member modules of the right architectures (their weights are replaced; they may
            be the ones the stacked model was made from).
    """
    members = [copy.deepcopy(m) for m in template]
    if isinstance(trained, LoopedMembers):
        for dst, src in zip(members, trained.members, strict=True):
            dst.load_state_dict(src.state_dict())
    else:
        state = trained.stacked.state_dict()
        for i, m in enumerate(members):
            m.load_state_dict({k: v[i] for k, v in state.items()})
    return Ensemble([m.to(next(iter(trained.parameters())).device) for m in members])


class CoTrainingTask:
    """The co-training loss as a task of the one loop: ``task(model, x, y) -> {"loss", "output", ...}``.

    ``loss = sum_i CE(z_i, y) + lambda(t) * JSD(z_1..z_S)`` on S views (:func:`co_training_views`,
    or the same batch for every member with ``views=False``); ``lambda(t) = lam * t / warmup`` over
    the first ``warmup`` fraction of the steps (at least 0.005, as the paper's code), then ``lam``;
    the paper's defaults are ``lam = 0.5`` and a 40-of-300-epoch warm-up. The loop tells the task
    where it is through :meth:`on_step` (so a resumed run continues the ramp). ``output`` is the
    ensemble's mean logits; logged terms: ``jsd``, ``lambda``, ``member{i}_acc``.

    Args:
        ways: S.
        lam: weight of the JSD term.
        warmup: fraction of the training steps over which ``lambda`` ramps up.
        views: each member its own augmented view (False: the same batch for all).
        padding: crop padding of the views (default ``H // 8``).
        mixup: Beta(``mixup``, ``mixup``) mixup drawn once per batch for all views; 0 disables.
        label_smoothing: of every member's cross-entropy.
    """

    def __init__(self, ways: int, *, lam: float = 0.5, warmup: float = 0.13, views: bool = True,
                 padding: int | None = None, mixup: float = 0.0, label_smoothing: float = 0.0):
        if ways < 1:
            raise SurgeryError(f"ways must be at least 1, got {ways}")
        if lam < 0 or not 0 <= warmup <= 1 or mixup < 0:
            raise SurgeryError(f"bad co-training setting: lam {lam} (>= 0), warmup {warmup} (0..1), "
                               f"mixup {mixup} (>= 0)")
        self.ways, self.lam, self.warmup, self.views = ways, lam, warmup, views
        self.padding, self.mixup, self.label_smoothing = padding, mixup, label_smoothing
        self.progress = 1.0

    def on_step(self, step: int, total: int) -> None:
        """Called by the loop before each step: ``step`` done of ``total``."""
        self.progress = step / max(total, 1)

    def weight(self) -> float:
        """``lambda`` at the current progress."""
        if self.warmup <= 0 or self.progress >= self.warmup:
            return self.lam
        return max(self.lam * self.progress / self.warmup, min(0.005, self.lam))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        s, b = self.ways, x.shape[0]
        # S = 1 gets its view too: the undivided baseline trains under the members' augmentation
        inputs = co_training_views(x, s, padding=self.padding) if self.views else x
        y2, mix = None, 1.0
        if self.mixup > 0:
            mix = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
            perm = torch.randperm(b, device=x.device)
            inputs = mix * inputs + (1 - mix) * inputs[..., perm, :, :, :]
            y2 = y[perm]
        logits = model(inputs, per_member=True)  # (S, B, K)
        flat = logits.float().reshape(s * b, -1)
        ce = F.cross_entropy(flat, y.repeat(s), reduction="none", label_smoothing=self.label_smoothing)
        if y2 is not None:
            ce = mix * ce + (1 - mix) * F.cross_entropy(flat, y2.repeat(s), reduction="none",
                                                        label_smoothing=self.label_smoothing)
        ce = ce.view(s, b).mean(1)  # (S,)
        weight = self.weight()
        agreement = jsd(logits) if s > 1 else logits.new_zeros((), dtype=torch.float32)
        out: dict[str, Tensor] = {"loss": ce.sum() + weight * agreement, "output": logits.mean(0).detach(),
                                  "jsd": agreement.detach(), "lambda": torch.tensor(weight, device=x.device)}
        hits = (logits.detach().argmax(-1) == y).float().mean(1)  # (S,)
        for i in range(s):
            out[f"member{i}_acc"] = hits[i]
        return out
