"""Module incubation: a network cut into K modules, a shallow meta model, and the hybrids that train them.

Deep Incubation / Deep Model Assembling (Ni et al., ICCV 2023, arXiv 2212.04129, §3): a large model
``M = m_K o ... o m_1`` is cut into K modules; a shallow *meta model* ``M^ = m^_K o ... o m^_1`` with
the same interfaces is pre-trained end to end; each module ``m_k`` is then trained on its own inside
the frozen meta model (the hybrid ``m^_K o ... o m_k o ... o m^_1``, task loss only, only ``m_k`` in
the optimizer); the K trained modules are concatenated and fine-tuned end to end.

The paper's code handles ViT-B/L/H only (a ``divided_depths`` argument added to a vendored timm).
Here everything comes from the model's dissection, so any model :func:`surgery.dissect` cuts works:

* :func:`plan_modules`: K contiguous modules at block granularity, balanced by MACs with the
  partition's exact per-model DP (min-max block MACs); the stem stays in module 0, pooling and head
  in module K-1. Chained, the modules *are* the model (they share its parameters).
* :func:`auto_meta`: meta module k keeps the blocks of module k that change the tensor spec (stem,
  downsampling, patch merging, head) plus the first shape-preserving one, taken from a second,
  independently initialised instance of the architecture: for a ViT, one transformer block per
  module (the paper's meta model); meta module k has exactly module k's input and output spec.
  :func:`meta_from_model` cuts a user's shallow variant at the same interfaces instead.
* :class:`IncubationHybrid`: the MT_k network. Every meta parameter has ``requires_grad=False``, the
  frozen parts stay in eval mode (running statistics and dropout frozen), the meta prefix runs under
  ``torch.no_grad()`` and the meta suffix only passes activation gradients back: frozen weights are
  never differentiated (the paper's code computes and all-reduces their unused gradients).

The pieces work on plain lists of modules so that a reassembled chain (stitches and donor blocks,
``surgery align``) is incubated by the same code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from solvers.errors import InfeasibleError
from solvers.partition import best_cuts_for_model, min_feasible_eps
from surgery.dissection import Dissection
from surgery.errors import SurgeryError
from surgery.spec import TensorSpec

__all__ = [
    "ModulePlan", "MetaPlan", "ModuleChain", "IncubationHybrid", "plan_modules", "auto_meta", "meta_from_model",
    "module_state", "load_module_states", "recalibrate_norms", "init_from_meta", "shallow_indices",
]


@dataclass
class ModulePlan:
    """How a model is cut into K modules.

    Attributes:
        boundaries: the K-1 cut-node names between modules (graph order).
        blocks: per module, the ``[start, end)`` range of dissection block indices it holds.
        macs: per module, MACs at batch 1 and the dissection's input size.
        params: per module, parameters (each counted once).
        in_specs / out_specs: per module, the spec of its input and output tensor.
    """

    boundaries: list[str]
    blocks: list[tuple[int, int]]
    macs: list[int]
    params: list[int]
    in_specs: list[TensorSpec]
    out_specs: list[TensorSpec]

    @property
    def k(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {"boundaries": list(self.boundaries), "blocks": [list(b) for b in self.blocks],
                "macs": list(self.macs), "params": list(self.params),
                "in_specs": [s.to_dict() for s in self.in_specs], "out_specs": [s.to_dict() for s in self.out_specs]}


@dataclass
class MetaPlan:
    """Which blocks of the meta model's dissection make each meta module.

    Attributes:
        blocks: per meta module, the dissection block indices it chains (in order).
        macs / params: per meta module, at batch 1 and the dissection's input size.
        source: ``"auto"`` (reduced from the target's architecture) or the meta model's name.
    """

    blocks: list[list[int]]
    macs: list[int]
    params: list[int]
    source: str = "auto"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": [list(b) for b in self.blocks], "macs": list(self.macs), "params": list(self.params),
                "source": self.source}


def _block_dissection(d: Dissection) -> None:
    if d.granularity != "block" or not d.blocks:
        raise SurgeryError(f"{d.name}: incubation needs a block-granularity dissection with its blocks "
                           f"(got granularity {d.granularity!r}, {len(d.blocks)} blocks)")


def plan_modules(d: Dissection, k: int) -> ModulePlan:
    """Cut a dissected model into ``k`` contiguous modules of about equal MACs.

    Module boundaries are block boundaries of ``d``; the one after the first block (the stem) and the
    one before the last block (pooling and head) are never used, so the stem belongs to module 0 and
    the head to module K-1 (paper §3.2: the embedding and the head go with the first and last module).
    Among the remaining boundaries the split minimising the largest module's MACs is taken (the
    partition's per-model DP, :func:`solvers.partition.best_cuts_for_model`, at the smallest feasible
    balance slack); ties go to the earliest boundaries.

    Args:
        d: a block-granularity dissection of the model (its blocks built).
        k: number of modules, ``>= 1``.

    Returns:
        The :class:`ModulePlan`.

    Raises:
        SurgeryError: ``k < 1`` or more modules than the model's blocks allow (``len(blocks) - 2``).
    """
    _block_dissection(d)
    n = len(d.blocks)
    if k < 1:
        raise SurgeryError(f"the number of modules must be at least 1 (got {k})")
    most = max(1, n - 2)
    if k > most:
        raise SurgeryError(f"{d.name} has {n} blocks: at most {most} modules (the stem stays with the first "
                           f"module and the head with the last), got {k}")
    info = d.block_info
    block_macs = np.array([b.macs for b in info], dtype=np.float64)
    total = float(block_macs.sum())
    # Candidate boundary j (1 <= j <= n-1) cuts before block j; 1 and n-1 are excluded (stem, head).
    candidates = list(range(2, n - 1))
    cum = np.cumsum(block_macs)[[j - 1 for j in candidates]] if candidates else np.zeros(0)
    if k == 1:
        cut_idx: list[int] = []
    else:
        eps = min_feasible_eps(cum, total, k)
        if not math.isfinite(eps):  # unreachable given the check above; kept for a clear message
            raise SurgeryError(f"{d.name}: cannot cut {k} modules")
        try:
            cut_idx, _ = best_cuts_for_model(np.zeros((k - 1, len(candidates))), cum, total,
                                             eps=eps * (1 + 1e-9) + 1e-12)
        except InfeasibleError as e:  # a rounding corner of the slack; report it plainly
            raise SurgeryError(f"{d.name}: no balanced split into {k} modules ({e})") from None
    starts = [0, *(candidates[i] for i in cut_idx)]
    ends = [*(candidates[i] for i in cut_idx), n]
    ranges = list(zip(starts, ends, strict=True))
    return ModulePlan(
        boundaries=[info[e - 1].end for e in ends[:-1]],
        blocks=ranges,
        macs=[int(sum(b.macs for b in info[s:e])) for s, e in ranges],
        params=[int(sum(b.params for b in info[s:e])) for s, e in ranges],
        in_specs=[info[s].in_spec for s, _ in ranges],
        out_specs=[info[e - 1].out_spec for _, e in ranges],
    )


def _same_spec(a: TensorSpec, b: TensorSpec) -> bool:
    return a.to_dict() == b.to_dict()


def shallow_indices(infos: Sequence[Any]) -> list[int]:
    """Which of a run of consecutive blocks a shallow stand-in keeps: every block that changes the tensor
    spec (stem, downsampling, patch merging, head) plus the first shape-preserving one.

    Args:
        infos: the blocks' metadata (``in_spec`` / ``out_spec``), consecutive.

    Returns:
        Indices into ``infos``, increasing; chained, the kept blocks map the run's input spec to its
        output spec (the dropped ones preserve the spec).
    """
    keep, kept_plain = [], False
    for i, info in enumerate(infos):
        if not _same_spec(info.in_spec, info.out_spec):
            keep.append(i)
        elif not kept_plain:
            keep.append(i)
            kept_plain = True
    return keep


def auto_meta(d_meta: Dissection, plan: ModulePlan) -> tuple[list[nn.Module], MetaPlan]:
    """The automatic meta model: each module reduced to its spec-changing blocks plus one other block.

    Args:
        d_meta: a block-granularity dissection of a *second* instance of the target's architecture
            (its own weights; the target's are never shared), at the same input size.
        plan: the target's module plan.

    Returns:
        ``(meta_modules, meta_plan)``: K modules; meta module k maps module k's input spec to its
        output spec. A module made only of spec-changing blocks is kept whole.

    Raises:
        SurgeryError: ``d_meta`` does not have the target's blocks (another architecture).
    """
    _block_dissection(d_meta)
    info = d_meta.block_info
    if len(info) < plan.blocks[-1][1]:
        raise SurgeryError(f"{d_meta.name}: the meta instance has {len(info)} blocks, the target "
                           f"{plan.blocks[-1][1]}; build it from the same architecture")
    chosen = [[s + i for i in shallow_indices(info[s:e])] for s, e in plan.blocks]
    modules = [_chain([d_meta.blocks[i] for i in keep]) for keep in chosen]
    meta = MetaPlan(blocks=chosen, macs=[int(sum(info[i].macs for i in keep)) for keep in chosen],
                    params=[int(sum(info[i].params for i in keep)) for keep in chosen], source="auto")
    return modules, meta


def meta_from_model(d_meta: Dissection, plan: ModulePlan, *, name: str | None = None
                    ) -> tuple[list[nn.Module], MetaPlan]:
    """A user's shallow model (e.g. the target's architecture at ``depth=4``) cut at the target's interfaces.

    Its block boundaries are matched to the target's module boundaries by tensor spec: boundary j of
    the meta must carry exactly the spec of the target's boundary j (the per-model DP with a score of
    ``-inf`` on every mismatching boundary, MACs balanced as far as the matches allow).

    Args:
        d_meta: block-granularity dissection of the shallow model, at the target's input size.
        plan: the target's module plan.
        name: the meta model's name for messages and the plan.

    Returns:
        ``(meta_modules, meta_plan)`` as :func:`auto_meta`.

    Raises:
        SurgeryError: the shallow model's input/output spec differs from the target's, or it has no
            boundaries with the target's interfaces in order (e.g. too few blocks).
    """
    _block_dissection(d_meta)
    name = name or d_meta.name
    info, n, k = d_meta.block_info, len(d_meta.blocks), plan.k
    if not _same_spec(info[0].in_spec, plan.in_specs[0]) or not _same_spec(info[-1].out_spec, plan.out_specs[-1]):
        raise SurgeryError(f"meta model {name} takes {info[0].in_spec.to_dict()['shape']} and returns "
                           f"{info[-1].out_spec.to_dict()['shape']}; the target takes "
                           f"{plan.in_specs[0].to_dict()['shape']} and returns {plan.out_specs[-1].to_dict()['shape']}")
    if k == 1:
        ranges = [(0, n)]
    else:
        candidates = list(range(1, n))  # cut before block j
        scores = np.array([[0.0 if _same_spec(info[j - 1].out_spec, plan.out_specs[m]) else -np.inf
                            for j in candidates] for m in range(k - 1)])
        block_macs = np.array([b.macs for b in info], dtype=np.float64)
        cum = np.cumsum(block_macs)[[j - 1 for j in candidates]]
        try:
            cut_idx, _ = best_cuts_for_model(scores, cum, float(block_macs.sum()), eps=float(k))
        except InfeasibleError:
            want = ", ".join(str(tuple(s.to_dict()["shape"])) for s in plan.out_specs[:-1])
            raise SurgeryError(f"meta model {name} ({n} blocks) cannot be cut at the target's {k - 1} module "
                               f"interfaces ({want}); give it at least one block per module") from None
        bounds = [candidates[i] for i in cut_idx]
        ranges = list(zip([0, *bounds], [*bounds, n], strict=True))
    chosen = [list(range(s, e)) for s, e in ranges]
    modules = [_chain([d_meta.blocks[i] for i in keep]) for keep in chosen]
    return modules, MetaPlan(blocks=chosen, macs=[int(sum(info[i].macs for i in c)) for c in chosen],
                             params=[int(sum(info[i].params for i in c)) for c in chosen], source=name)


def _chain(blocks: Sequence[nn.Module]) -> nn.Module:
    return blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)


class ModuleChain(nn.Module):
    """K modules run in order: an assembled model, or a meta model.

    ``forward(x)``: ``x`` as the first module takes it (e.g. ``(N, C, H, W)`` images), returns what the
    last module returns (logits ``(N, classes)`` for a whole classifier).
    """

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: Any) -> Any:
        for part in self.parts:
            x = part(x)
        return x


class IncubationHybrid(nn.Module):
    """The MT_k network: meta modules before and after ``index`` (frozen) around one trainable module.

    Args:
        meta: the K meta modules (pre-trained); their parameters get ``requires_grad=False`` here.
        module: the module being incubated (it takes meta module ``index``'s place).
        index: k, in ``[0, K)``.

    ``forward(x)`` returns the hybrid's output (logits). The meta prefix runs under ``torch.no_grad()``
    (nothing before the trainable module needs a gradient); the suffix passes activation gradients
    only. ``train(mode)`` keeps every frozen part in eval mode: batch-norm running statistics describe
    the weights they were trained with, and dropout / drop-path of a fixed context add only noise.
    :meth:`trainable_parameters` is module ``index``'s parameters (what :func:`surgery.training.train`
    optimises; pass it as ``trainable=``).

    Raises:
        SurgeryError: ``index`` out of range.
    """

    def __init__(self, meta: Sequence[nn.Module], module: nn.Module, index: int):
        super().__init__()
        if not 0 <= index < len(meta):
            raise SurgeryError(f"module index {index} out of range for {len(meta)} modules")
        parts = list(meta)
        parts[index] = module
        self.parts = nn.ModuleList(parts)
        self.index = index
        for i, part in enumerate(self.parts):
            if i != index:
                part.requires_grad_(False)
        self.train(self.training)

    @property
    def module(self) -> nn.Module:
        return self.parts[self.index]

    def frozen_parts(self) -> list[nn.Module]:
        return [p for i, p in enumerate(self.parts) if i != self.index]

    def trainable_parameters(self, freeze: str | None = None) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def train(self, mode: bool = True) -> IncubationHybrid:
        super().train(mode)
        for part in self.frozen_parts():
            part.eval()
        return self

    def forward(self, x: Any) -> Any:
        with torch.no_grad():
            for part in self.parts[:self.index]:
                x = part(x)
        x = self.parts[self.index](x)
        for part in self.parts[self.index + 1:]:
            x = part(x)
        return x


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of one module of a dissected model, under the *model's* parameter names.

    Blocks from :meth:`surgery.Dissection.split` keep the original qualified names of the submodules
    they hold, so these keys are a subset of ``model.state_dict()``'s and K module states together
    load into a fresh instance of the model (:func:`load_module_states`).
    """
    return dict(module.state_dict())  # detached views; save_tensors makes the contiguous CPU copies


def load_module_states(model: nn.Module, states: Sequence[dict[str, torch.Tensor]]) -> None:
    """Assemble: load the K modules' weights into ``model`` (every tensor of the model from exactly one).

    Raises:
        SurgeryError: a tensor of the model is missing from every state, or a state has a key the
            model does not (states from another architecture).
    """
    merged: dict[str, torch.Tensor] = {}
    for state in states:
        merged.update(state)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(merged)), sorted(set(merged) - expected)
    if missing or unexpected:
        raise SurgeryError(f"the modules' weights do not make up the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    model.load_state_dict(merged, strict=True)


def recalibrate_norms(model: nn.Module, batches: Iterable[Any], *, max_batches: int = 20,
                      only: Iterable[nn.Module] | None = None) -> int:
    """Re-estimate every batch-norm layer's running statistics on ``batches`` (no weight changes).

    Module k's batch-norm statistics were collected on the meta model's activations; once the
    modules are assembled each one sees its real predecessor's instead, so the stored statistics no
    longer describe its inputs ("precise BN": Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021,
    §3). torch's own :func:`torch.optim.swa_utils.update_bn` does the work (statistics reset, then a
    cumulative average over the batches, in train mode, without gradients).

    Args:
        model: the assembled model; its train/eval mode is restored afterwards.
        batches: ``(inputs, targets)`` batches of target images (targets unused).
        max_batches: at most this many batches are used.
        only: recalibrate just these modules' batch-norm layers; every other layer keeps its
            statistics and runs in eval mode (torch's ``update_bn`` resets all of them, hence the
            short loop of our own here).

    Returns:
        The number of batch-norm layers recalibrated (0: nothing to do, nothing run).
    """
    from torch.optim.swa_utils import update_bn

    def bn_layers(root: nn.Module) -> list[nn.Module]:
        return [m for m in root.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    norms = bn_layers(model) if only is None else [m for part in only for m in bn_layers(part)]
    if not norms:
        return 0
    device = next(model.parameters()).device
    feed = (b for _, b in zip(range(max_batches), batches, strict=False))
    if only is None:
        update_bn(feed, model, device=device)
        model.eval()
        return len(norms)
    model.eval()
    momenta = {}
    for m in norms:  # a cumulative average over the batches, as update_bn does
        m.reset_running_stats()
        momenta[m] = m.momentum
        m.momentum = None
        m.train()
    with torch.no_grad():
        for batch in feed:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device))
    for m, momentum in momenta.items():
        m.momentum = momentum
    model.eval()
    return len(norms)


def _original_names(meta_module: nn.Module, n_blocks: int) -> dict[str, torch.Tensor]:
    """A meta module's weights under the architecture's own names (a chain of blocks adds ``j.``)."""
    state = meta_module.state_dict()
    if n_blocks == 1:
        return dict(state)
    return {key.split(".", 1)[1]: value for key, value in state.items()}


def init_from_meta(module: nn.Module, block_keys: Sequence[Sequence[str]], span: tuple[int, int],
                   meta_module: nn.Module, meta_blocks: Sequence[int]) -> dict[str, int]:
    """Start module k from the pre-trained automatic meta module instead of random weights ("stacking").

    Not the paper's recipe (its modules start random, §3.2). The blocks the meta module kept are
    copied as they are; every other block copies the nearest earlier block of the module with the
    same parameter shapes (the interleaved/stacked copy of progressive growth: AutoProg, Li et al.
    CVPR 2022, §3.3; progressive stacking, Gong et al. ICML 2019). Every module then starts from the
    same trained context, so the modules stay compatible when assembled.

    Args:
        module: target module k (its weights are overwritten in place).
        block_keys: per dissection block of the target, its state-dict keys (the model's names).
        span: module k's ``[start, end)`` block range.
        meta_module: meta module k, from :func:`auto_meta` (the same architecture's blocks).
        meta_blocks: the block indices meta module k kept.

    Returns:
        ``{"copied": blocks copied from the meta, "stacked": blocks copied from an earlier block,
        "random": blocks left at their random initialisation}``.
    """
    source = _original_names(meta_module, len(meta_blocks))
    state = module.state_dict()
    done: dict[int, list[torch.Tensor]] = {}
    counts = {"copied": 0, "stacked": 0, "random": 0}
    for i in range(*span):
        keys = [key for key in block_keys[i] if key in state]
        if i in meta_blocks and all(key in source for key in keys):
            values = [source[key] for key in keys]
            counts["copied"] += 1
        else:
            shapes = [tuple(state[key].shape) for key in keys]
            match = next((v for j, v in sorted(done.items(), reverse=True)
                          if [tuple(t.shape) for t in v] == shapes), None)
            if match is None or not keys:  # e.g. the first block after a width change
                counts["random"] += 1
                continue
            values = match
            counts["stacked"] += 1
        for key, value in zip(keys, values, strict=True):
            state[key] = value.clone()
        done[i] = values
    module.load_state_dict(state, strict=True)
    return counts
