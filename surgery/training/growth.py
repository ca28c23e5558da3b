"""Growing a model during training: the operators (AutoProg, Li et al., CVPR 2022; MSG / LEMON).

What every growth schedule needs, found generically from the module tree (the runner is
:mod:`surgery.training.grow_run`, AutoProg's supernet :mod:`surgery.training.autoprog`):

* :func:`find_block_groups`: the runs of repeated, shape-preserving blocks of a model (a ViT's
  ``blocks``, each ResNet stage's blocks after its downsampling block, each ConvNeXt / Swin stage's
  blocks): consecutive children of one container, of one class and one parameter layout, whose
  output has their input's shape (checked on one probe forward). No per-family code.
* :func:`depth_map`: which existing block each block of the deeper run copies. ``"interleave"``
  is AutoProg's ``new_idx`` (each block followed by its copy; for a growth that is not a multiple,
  the *last* blocks are the ones duplicated: 10 -> 14 gives 0..6, 6, 7, 7, 8, 8, 9, 9);
  ``"stack"`` appends copies of the run in order (StackBERT / G_stack).
* :func:`grow_depth`: the deeper model, in place. New blocks start as copies (AutoProg), with their
  residual branch zeroed (function-preserving: the grown model computes exactly what the small one
  did, the MSG / LEMON property), or re-initialised.

A zeroed residual branch uses what the block offers: timm's ``zero_init_last()`` (ResNet and other
CNN blocks: the last norm's weight, and here its bias too), a layer-scale ``gamma`` (ConvNeXt,
CaiT-style ``ls1``/``ls2``), or else the branch's last projection (``attn.proj`` and ``mlp.fc2`` of
ViT, Swin and PVT blocks).

Also here: :func:`select_blocks` / :func:`set_depths` (a shallower copy of a run: a stage's
architecture, a supernet's sub-network), :func:`renamed_parameters` / :func:`source_name` (where
each parameter came from), :func:`mogrow` and :func:`carry_optimizer_state` (what a growth carries),
:func:`set_resolution` and :func:`set_drop_path` (the other ramped knobs), :func:`manual_schedule`
and :func:`autoprog_choice` (the schedules).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from surgery.errors import SurgeryError

__all__ = ["BlockGroup", "find_block_groups", "depth_map", "growth_plan", "grow_depth", "zero_residual",
           "grown_parameters", "renamed_parameters", "source_name", "mogrow", "resized_group",
           "select_blocks", "set_depths", "set_drop_path", "carry_optimizer_state", "patch_stride", "set_resolution",
           "Stage", "manual_schedule", "autoprog_choice"]


@dataclass(frozen=True)
class BlockGroup:
    """A run of repeated shape-preserving blocks: ``container[start:start + length]``.

    Attributes:
        container: dotted module path of the ``nn.Sequential`` / ``nn.ModuleList`` holding them.
        start: index of the first block of the run in the container.
        length: number of blocks in the run.
        block_class: the blocks' class name.
        params: parameters of one block.
        container_length: children of the container when the group was found (a later change of
            the container makes the group stale).
    """

    container: str
    start: int
    length: int
    block_class: str
    params: int
    container_length: int

    @property
    def stop(self) -> int:
        return self.start + self.length


def _layout(module: nn.Module) -> tuple:
    return (type(module), tuple((n, tuple(t.shape)) for n, t in module.state_dict().items()))


def find_block_groups(model: nn.Module, example: torch.Tensor, *, min_length: int = 2) -> list[BlockGroup]:
    """The runs of repeated shape-preserving blocks of ``model``, outermost first, in model order.

    Args:
        model: any module; ``example`` is one input batch it accepts (its output shape is not used).
        min_length: shortest run reported (a run of one block is not "repeated").

    Returns:
        The groups; runs nested inside a block of another group are left out.
    """
    candidates: list[tuple[str, int, list[nn.Module], int]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) < min_length:
            continue
        children = list(module)
        i = 0
        while i < len(children):
            j = i + 1
            while j < len(children) and _layout(children[j]) == _layout(children[i]):
                j += 1
            if j - i >= min_length and sum(p.numel() for p in children[i].parameters()) > 0:
                candidates.append((name, i, children[i:j], len(children)))
            i = j
    if not candidates:
        return []
    shapes: dict[int, tuple[tuple, tuple]] = {}

    def hook(module, args, output):
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            shapes[id(module)] = (tuple(args[0].shape), tuple(output.shape))

    handles = [b.register_forward_hook(hook) for _, _, blocks, _ in candidates for b in blocks]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    groups = []
    inside: set[str] = set()
    for name, start, blocks, size in candidates:
        if any(name == p or name.startswith(p + ".") for p in inside):
            continue
        ran = [shapes.get(id(b)) for b in blocks]
        if all(r is not None and r[0] == r[1] for r in ran):
            groups.append(BlockGroup(name, start, len(blocks), type(blocks[0]).__name__,
                                     sum(p.numel() for p in blocks[0].parameters()), size))
            inside.update(f"{name}.{start + k}" for k in range(len(blocks)))
    return groups


def depth_map(old: int, new: int, mode: Literal["interleave", "stack"] = "interleave") -> list[int]:
    """For each of the ``new`` blocks, the index of the old block it copies.

    ``interleave`` (AutoProg): old block i appears ``c_i`` times in a row, the extra copies going to
    the last blocks first (10 -> 14: ``[0, 1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8, 9, 9]``; 7 -> 14: every
    block twice). ``stack``: ``0..old-1`` repeated, then cut at ``new``.

    Raises:
        SurgeryError: ``new < old`` or ``old < 1``, or an unknown mode.
    """
    if old < 1 or new < old:
        raise SurgeryError(f"depth can only grow: {old} -> {new}")
    if mode == "stack":
        return [i % old for i in range(new)]
    if mode != "interleave":
        raise SurgeryError(f"unknown growth mode {mode!r}; expected 'interleave' or 'stack'")
    counts = [1] * old
    extra = new - old
    i = old - 1
    while extra > 0:  # the last blocks first, round after round
        counts[i] += 1
        extra -= 1
        i = i - 1 if i > 0 else old - 1
    return [k for k, c in enumerate(counts) for _ in range(c)]


def growth_plan(old: int, new: int, mode: Literal["interleave", "stack"] = "interleave") -> list[tuple[int, int, bool]]:
    """:func:`grow_depth`'s plan without a model: ``(new index, source index, is_new)`` per block, the
    first occurrence of each source being the original block."""
    seen: set[int] = set()
    plan = []
    for k, src in enumerate(depth_map(old, new, mode)):
        plan.append((k, src, src in seen))
        seen.add(src)
    return plan


def zero_residual(block: nn.Module) -> None:
    """Make a residual block compute the identity by zeroing the end of its residual branch(es).

    Raises:
        SurgeryError: the block offers none of the known handles (see the module docstring).
    """
    if callable(getattr(block, "zero_init_last", None)):
        # timm's hook zeroes the last norm's weight and trusts its bias to be at its zero init;
        # a trained block's is not, so the bias of whatever it zeroed is zeroed too
        before = {id(m): m.weight.detach().clone() for m in block.modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor)}
        block.zero_init_last()
        with torch.no_grad():
            for m in block.modules():
                w = getattr(m, "weight", None)
                if (isinstance(w, torch.Tensor) and id(m) in before and not torch.equal(before[id(m)], w)
                        and not w.any() and isinstance(getattr(m, "bias", None), torch.Tensor)):
                    m.bias.zero_()
        return
    done = False
    with torch.no_grad():
        for name in ("ls1", "ls2", "ls", "gamma", "gamma1", "gamma2", "layer_scale", "ls_attn", "ls_mlp"):
            part = getattr(block, name, None)
            target = part.gamma if isinstance(part, nn.Module) and isinstance(getattr(part, "gamma", None),
                                                                              torch.Tensor) else part
            if isinstance(target, nn.Parameter):
                target.zero_()
                done = True
        if done:
            return
        for path in ("attn.proj", "mlp.fc2"):
            try:
                layer = block.get_submodule(path)
            except AttributeError:
                continue
            for p in layer.parameters(recurse=False):
                p.zero_()
            done = True
    if not done:
        raise SurgeryError(f"{type(block).__name__} has no known residual branch end to zero "
                           "(zero_init_last, a layer scale, attn.proj / mlp.fc2); use init='copy' or 'random'")


def _reinit(block: nn.Module) -> None:
    for module in block.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def grow_depth(model: nn.Module, group: BlockGroup, new_length: int, *,
               mode: Literal["interleave", "stack"] = "interleave",
               init: Literal["copy", "zero", "random"] = "copy") -> list[tuple[int, int, bool]]:
    """Deepen one block group of ``model`` in place.

    Args:
        model: the model holding ``group``.
        group: from :func:`find_block_groups` on this model.
        new_length: blocks in the run after growth (>= ``group.length``).
        mode: :func:`depth_map`'s order.
        init: new blocks as copies (``copy``, AutoProg), copies with a zeroed residual branch
            (``zero``: the model's function is unchanged), or re-initialised (``random``).

    Returns:
        ``(new index in the run, source index in the old run, is_new)`` for every block of the run;
        the first copy of each old block is the original module itself (its parameters, hence its
        optimizer state, carry over), later copies are new modules.

    Raises:
        SurgeryError: a shrinking ``new_length``, a stale group, or ``zero`` on an unknown block.
    """
    _, children = _run_of(model, group)
    run = children[group.start:group.stop]
    plan = growth_plan(group.length, new_length, mode)
    grown = []
    for _, src, is_new in plan:
        if not is_new:
            grown.append(run[src])
            continue
        block = copy.deepcopy(run[src])
        if init == "zero":
            zero_residual(block)
        elif init == "random":
            _reinit(block)
        elif init != "copy":
            raise SurgeryError(f"unknown init {init!r}; expected copy, zero or random")
        grown.append(block)
    _replace_run(model, group, grown)
    return plan


def _run_of(model: nn.Module, group: BlockGroup) -> tuple[nn.Module, list[nn.Module]]:
    container = model.get_submodule(group.container)
    children = list(container)
    if len(children) != group.container_length or len(children[group.start:group.stop]) != group.length:
        raise SurgeryError(f"{group.container} no longer has {group.length} blocks at {group.start}: find the groups "
                           "again after changing the model")
    return container, children


def _replace_run(model: nn.Module, group: BlockGroup, blocks: list[nn.Module]) -> None:
    """Put ``blocks`` where the group's run is (a new container of the same kind; other children kept)."""
    container, children = _run_of(model, group)
    new_children = children[:group.start] + list(blocks) + children[group.stop:]
    rebuilt = type(container)(*new_children) if isinstance(container, nn.Sequential) else nn.ModuleList(new_children)
    parent_path, _, leaf = group.container.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, rebuilt)
    _sync_depth_attributes(model, group, len(blocks))


def resized_group(group: BlockGroup, length: int) -> BlockGroup:
    """The same group after its run became ``length`` blocks long."""
    return replace(group, length=length, container_length=group.container_length + length - group.length)


def select_blocks(model: nn.Module, group: BlockGroup,
                  keep: Sequence[int]) -> tuple[BlockGroup, list[tuple[int, int, bool]]]:
    """Keep only the blocks ``keep`` (indices in the run, in order) of a group, in place.

    Used to start a progressive schedule from a shallower copy of the full architecture (the first
    blocks) and to extract an AutoProg sub-network from its supernet (the active blocks).

    Returns:
        The group after the change, and a plan like :func:`grow_depth`'s (``(new index, old index,
        False)``) for :func:`renamed_parameters` with the group *before* the change.

    Raises:
        SurgeryError: an empty, unordered or out-of-range ``keep``, or a stale group.
    """
    keep = list(keep)
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= group.length:
        raise SurgeryError(f"blocks to keep must be increasing indices in 0..{group.length - 1}, got {keep}")
    _, children = _run_of(model, group)
    run = children[group.start:group.stop]
    _replace_run(model, group, [run[i] for i in keep])
    return resized_group(group, len(keep)), [(k, i, False) for k, i in enumerate(keep)]


def set_depths(model: nn.Module, groups: Sequence[BlockGroup], depths: Sequence[int]) -> list[BlockGroup]:
    """Cut every group of a freshly built model to its first ``depths[i]`` blocks (a stage's
    architecture: blocks of one run share one layout, so any ``d`` of them hold the same tensors).

    Raises:
        SurgeryError: a depth outside ``1..group.length``, or a count mismatch.
    """
    if len(depths) != len(groups):
        raise SurgeryError(f"{len(groups)} block groups but {len(depths)} depths")
    out = []
    for group, depth in zip(groups, depths, strict=True):
        if not 1 <= depth <= group.length:
            raise SurgeryError(f"{group.container}: depth {depth} outside 1..{group.length}")
        out.append(select_blocks(model, group, range(depth))[0] if depth < group.length else group)
    return out


def set_drop_path(model: nn.Module, rate: float) -> int:
    """Set stochastic depth in place, by timm's rule: block ``i`` of the model's ``n`` blocks (over all
    stages, in order) drops its residual branches with probability ``rate * i / (n - 1)``.

    A block is an item of a ``nn.Sequential`` / ``nn.ModuleList`` holding timm ``DropPath`` modules;
    blocks built at rate 0 (timm's first block, a model built without drop path) hold none and stay
    at 0: build with ``drop_path_rate > 0`` to ramp it. Returns how many ``DropPath`` modules were set.
    """
    from timm.layers import DropPath

    modules = dict(model.named_modules())
    owner: dict[str, tuple[str, int]] = {}  # DropPath path -> (container path, item index)
    for name, m in modules.items():
        if not isinstance(m, DropPath):
            continue
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the nearest ancestor that is an item of a container
            container = ".".join(parts[:cut - 1]) if cut > 1 else ""
            if parts[cut - 1].isdigit() and isinstance(modules.get(container), (nn.Sequential, nn.ModuleList)):
                owner[name] = (container, int(parts[cut - 1]))
                break
    order: dict[str, int] = {}  # containers in model order -> ordinal of their first item
    total = 0
    for name in modules:
        if name in {c for c, _ in owner.values()} and name not in order:
            order[name] = total
            total += len(modules[name])
    for name, (container, index) in owner.items():
        modules[name].drop_prob = rate * (order[container] + index) / max(total - 1, 1)
    return len(owner)


def _sync_depth_attributes(model: nn.Module, group: BlockGroup, new_length: int) -> None:
    """Keep bookkeeping attributes that mirror a block count in step (timm ViT ``depth`` is not
    stored; some models keep ``num_blocks`` / ``depth`` next to the container)."""
    parent_path = group.container.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    for attr in ("depth", "num_blocks"):
        value = getattr(parent, attr, None)
        if isinstance(value, int) and value == group.length:
            setattr(parent, attr, new_length)


def grown_parameters(before: int, group: BlockGroup, new_length: int) -> int:
    """The parameter count after growing ``group`` to ``new_length`` blocks (copies add whole blocks)."""
    return before + (new_length - group.length) * group.params


# ---------------------------------------------------------------------------- MoGrow and optimizer state


def renamed_parameters(group: BlockGroup, plan: list[tuple[int, int, bool]]) -> dict[str, str]:
    """Module-path prefixes after growth -> before growth, for the container's children.

    A block inside the run maps to the old block it copies (``plan`` from :func:`grow_depth`);
    children after the run shift by the growth. Paths outside the container are unchanged (not listed).
    """
    grown = len(plan) - group.length
    out = {}
    for c in range(group.container_length + grown):
        if c < group.start:
            old = c
        elif c < group.start + len(plan):
            old = group.start + plan[c - group.start][1]
        else:
            old = c - grown
        out[f"{group.container}.{c}."] = f"{group.container}.{old}."
    return out


def source_name(name: str, renames: dict[str, str]) -> str:
    """A grown (or extracted) model's parameter name -> the name it had before (``renames`` from
    :func:`renamed_parameters`)."""
    for new_prefix, old_prefix in renames.items():
        if name.startswith(new_prefix):
            return old_prefix + name[len(new_prefix):]
    return name


def mogrow(model: nn.Module, ema_before: dict[str, torch.Tensor], renames: dict[str, str]) -> None:
    """MoGrow (AutoProg, Li et al. CVPR 2022, Sec. 4.2): initialise the grown model from the momentum
    (EMA) network: every parameter and buffer, inherited or duplicated, is copied from the EMA's
    value for the block it came from.

    Args:
        model: the model after :func:`grow_depth`.
        ema_before: the EMA's state dict before growth (same names as the model before growth).
        renames: from :func:`renamed_parameters` (several groups: merge the dicts).

    Raises:
        SurgeryError: an entry of the grown model has no EMA counterpart.
    """
    state = model.state_dict()
    missing = []
    with torch.no_grad():
        for name, tensor in state.items():
            src = ema_before.get(source_name(name, renames))
            if src is None or src.shape != tensor.shape:
                missing.append(name)
                continue
            tensor.copy_(src)
    if missing:
        raise SurgeryError(f"MoGrow: {len(missing)} entries of the grown model have no EMA value "
                           f"(first: {missing[0]}); the EMA must be the model's own, before growth")


def carry_optimizer_state(old: torch.optim.Optimizer, old_names: dict[int, str], model: nn.Module,
                          renames: dict[str, str], new: torch.optim.Optimizer) -> int:
    """Carry Adam-style moments across a growth (MSG's ``transfer_states``; AutoProg resets them).

    Every parameter of ``new`` (built over the grown model) takes a copy of the state of the old
    parameter it came from: the same parameter for inherited blocks, the source block's for copies.

    Args:
        old: the optimizer before growth; ``old_names``: ``id(param) -> name`` in the old model.
        model: the grown model; ``renames``: from :func:`renamed_parameters`.
        new: a fresh optimizer over the grown model's parameters (same type).

    Returns:
        How many parameters received carried state (the others start fresh).
    """
    by_name = {old_names[id(p)]: st for p, st in old.state.items() if id(p) in old_names}
    carried = 0
    for name, param in model.named_parameters():
        st = by_name.get(source_name(name, renames))
        if st is None or any(isinstance(v, torch.Tensor) and v.dim() and v.shape != param.shape for v in st.values()):
            continue  # new, or resized (a resampled position embedding): fresh moments
        new.state[param] = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        carried += 1
    return carried


# ---------------------------------------------------------------------------- resolution


def patch_stride(model: nn.Module) -> int | None:
    """The step of a model's patch embedding in pixels (the larger side), None without one.

    The stride of its projection, not ``patch_size``: PVT-v2 embeds overlapping 7 x 7 patches every
    4 px, and it is the step that an input side must be a multiple of; for a ViT both are equal.
    """
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        return None
    stride = getattr(getattr(embed, "proj", None), "stride", None) or getattr(embed, "patch_size", None)
    if stride is None:
        return None
    return int(stride) if isinstance(stride, int) else int(max(stride))


def set_resolution(model: nn.Module, size: int) -> None:
    """Make ``model`` take ``size`` x ``size`` inputs (AutoProg's resolution axis), in place.

    Models with absolute position embeddings or fixed token grids (timm ViT, Swin, ...) are resized
    with timm's own ``set_input_size``, which resamples the position embedding (bicubic, as AutoProg);
    convolutional models take any size and are left as they are.

    Raises:
        SurgeryError: the patch size does not divide ``size``, or a model with a position embedding
            built for another size offers no way to resize it.
    """
    patch = patch_stride(model)
    if patch is not None and size % patch:
        raise SurgeryError(f"resolution {size} is not a multiple of the patch size {patch}")
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None and tuple(built) == (size, size):
        return  # already this size: nothing to resample (and a model without set_input_size is fine)
    if callable(getattr(model, "set_input_size", None)):
        try:
            model.set_input_size(img_size=(size, size))
        except (AssertionError, RuntimeError, ValueError) as e:
            raise SurgeryError(f"{type(model).__name__} cannot take {size}x{size} inputs: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return
    if any(isinstance(getattr(model, n, None), torch.Tensor) for n in ("pos_embed", "absolute_pos_embed")):
        raise SurgeryError(f"{type(model).__name__} has a position embedding but no set_input_size; "
                           "its resolution cannot grow")


# ---------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Stage:
    """One stage of a progressive schedule.

    Attributes:
        index: 0-based stage number; ``epochs``: its length; ``first_epoch``: where it starts.
        depths: blocks per group (in :func:`find_block_groups` order) during the stage.
        resolution: input side during the stage.
        drop_path: drop-path rate during the stage (ramped like the rest, AutoProg Sec. 3.1).
    """

    index: int
    first_epoch: int
    epochs: int
    depths: tuple[int, ...]
    resolution: int
    drop_path: float


def manual_schedule(epochs: int, stages: int, full_depths: Sequence[int], full_resolution: int, *,
                    depth_start: float = 0.5, resolution_start: float = 0.6, multiple: int = 1,
                    drop_path: float = 0.0) -> list[Stage]:
    """AutoProg's "Prog" baseline schedule: K equal stages, every knob ramped linearly to its maximum.

    Stage k of K gets depth ``round(linspace(depth_start, 1, K)[k] * L)`` per group (at least 1),
    resolution ``linspace(resolution_start, 1, K)[k] * R`` rounded down to ``multiple`` (a ViT's
    patch size; at least one multiple), and drop-path ``linspace(0, drop_path, K)[k]``; the last stage
    is always the full model at full resolution.

    Raises:
        SurgeryError: fewer epochs than stages, stages < 1, or ramps outside ``(0, 1]``.
    """
    if stages < 1 or epochs < stages:
        raise SurgeryError(f"{stages} stages need at least {stages} epochs (got {epochs}); stages >= 1")
    if not (0 < depth_start <= 1 and 0 < resolution_start <= 1):
        raise SurgeryError(f"depth_start and resolution_start must be in (0, 1], got {depth_start}, {resolution_start}")
    bounds = [round(k * epochs / stages) for k in range(stages + 1)]
    out = []
    for k in range(stages):
        t = k / (stages - 1) if stages > 1 else 1.0
        d = depth_start + (1 - depth_start) * t
        r = resolution_start + (1 - resolution_start) * t
        depths = tuple(max(1, min(full, round(d * full))) for full in full_depths)
        res = max(multiple, int(r * full_resolution) // multiple * multiple)
        out.append(Stage(k, bounds[k], bounds[k + 1] - bounds[k], depths, min(res, full_resolution),
                         drop_path * t))
    return out


def autoprog_choice(candidates: Sequence[tuple[float, float]]) -> tuple[int, dict[str, float]]:
    """AutoProg's pick among sub-network candidates (Li et al., CVPR 2022, Sec. 4.3; the code's criterion).

    Each candidate has a (smoothed) training loss ``L`` and a measured step time ``T``; a power law
    ``L ~ a * T^b`` is fitted over the candidates (scipy ``curve_fit``), ``w = max(-b, 0)``, and the
    candidate minimising ``L * T^w`` wins: more compute is worth it only as far as the loss falls faster
    than the time grows.

    Args:
        candidates: ``(loss, step_time_s)`` per candidate, both positive.

    Returns:
        ``(index of the chosen candidate, {"a", "b", "w"})``; with one candidate, ``(0, ...)``.

    Raises:
        SurgeryError: no candidates, or a non-positive loss or time.
    """
    import numpy as np
    from scipy.optimize import OptimizeWarning, curve_fit

    if not candidates:
        raise SurgeryError("autoprog_choice needs at least one candidate")
    loss = np.array([c[0] for c in candidates], dtype=np.float64)
    time_s = np.array([c[1] for c in candidates], dtype=np.float64)
    if (loss <= 0).any() or (time_s <= 0).any():
        raise SurgeryError("candidate losses and step times must be positive")
    if len(candidates) == 1 or np.allclose(time_s, time_s[0]):
        return int(np.argmin(loss)), {"a": float(loss[0]), "b": 0.0, "w": 0.0}
    # a straight line in log-log space is the least-squares start; curve_fit refines in linear space
    b0, log_a0 = np.polyfit(np.log(time_s), np.log(loss), 1)
    try:
        with warnings.catch_warnings():  # a few candidates: the fit's covariance is not needed, nor estimable
            warnings.simplefilter("ignore", OptimizeWarning)
            (a, b), _ = curve_fit(lambda t, a, b: a * np.power(t, b), time_s, loss, p0=(np.exp(log_a0), b0),
                                  maxfev=10_000)
    except RuntimeError:  # no convergence: the log-log line is the fit
        a, b = float(np.exp(log_a0)), float(b0)
    w = max(-float(b), 0.0)
    score = loss * np.power(time_s, w)
    return int(np.argmin(score)), {"a": float(a), "b": float(b), "w": w}
