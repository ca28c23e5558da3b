"""Cut points of a traced graph, runs of cut points, and the choice of block boundaries.

Pure graph analysis over a topologically ordered node list and the abstract values recorded by shape
probes (:mod:`surgery.tracing`); nothing here runs a model.

Provenance. The cut-point test is the one measured on 50 timm models in ``research/feasibility.md`` §3
and its appendix: node ``v`` is a cut if no tensor edge goes from a node strictly before ``v`` to a node
strictly after it, computed for all nodes at once with a difference array over edge spans (O(V+E)).
Shape integers (``B, N, C = x.shape`` taken early and used later) do not count as crossing, but a block
must not bake them in: :func:`crossing_rules` expresses each crossing integer as
``input.size(d) * num // den`` of the cut tensor, fitted on probes at two batch sizes (and two
resolutions where the model accepts them), or as a constant when it never changes. A cut where some
crossing value fits no rule is dropped. The granularity rules (module containers, stage = change of
grid/channels, minimum MAC share) are ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from surgery.spec import TensorSpec
from surgery.tracing import TensorShape

__all__ = [
    "CutPoint", "Const", "FromDim", "DeviceOf", "Pack", "recomputable", "tensor_cuts", "crossing_values", "fit_rule",
    "crossing_rules", "group_runs", "container_boundaries", "run_candidates", "prune_block_boundaries",
    "stage_boundaries", "merge_small_blocks", "flat_stage_boundaries", "drop_empty_blocks", "Item", "pair_cuts",
    "pair_rules",
]


@dataclass(frozen=True)
class CutPoint:
    """A place where the model can be split: exactly one tensor crosses it (or, in the fallback for
    two-stream models, exactly two: see :func:`pair_cuts`; ``spec.parts`` then names them).

    Attributes:
        name: graph node name; its output is the tensor that crosses.
        position: index of the node in graph (topological) order.
        spec: what the crossing tensor looks like.
        macs: cumulative MACs of the model up to and including this node (batch 1).
        depth: relative depth ``position / number of nodes``.
    """

    name: str
    position: int
    spec: TensorSpec
    macs: int
    depth: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"name": self.name, "position": self.position, "spec": self.spec.to_dict(),
                "macs": int(self.macs), "depth": self.depth}


# --- rules for non-tensor values that cross a cut -------------------------------------------------

@dataclass(frozen=True)
class Const:
    """A crossing value that is the same in every probe: baked into the block as a literal."""

    value: Any


@dataclass(frozen=True)
class FromDim:
    """A crossing integer equal to ``x.size(dim) * num // den`` of the block's input ``x`` in every probe."""

    dim: int
    num: int
    den: int


@dataclass(frozen=True)
class DeviceOf:
    """A crossing ``torch.device`` (``x.device`` read early, used later): the block input's device.

    Never baked as a constant: the probes run on the meta device, and a block must follow its input to
    whatever device it is moved to.
    """


@dataclass(frozen=True)
class Pack:
    """A crossing tuple / list / ``torch.Size`` rebuilt element by element."""

    kind: type
    items: tuple


@dataclass(frozen=True)
class Item:
    """A crossing value whose ``rule`` applies to element ``index`` of a two-tensor block input."""

    index: int
    rule: Any


_BAKEABLE = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, slice,
             type(Ellipsis))


def _bakeable(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_bakeable(v) for v in value)
    return isinstance(value, _BAKEABLE)


def fit_rule(values: Sequence[Any], shapes: Sequence[tuple[int, ...]]):
    """Express a non-tensor value in terms of the cut tensor's shape, consistently over all probes.

    Args:
        values: the value in each probe.
        shapes: the cut tensor's shape in the same probes.

    Returns:
        :class:`Const`, :class:`FromDim`, :class:`DeviceOf`, :class:`Pack`, or ``None`` when no rule fits.
    """
    first = values[0]
    if all(isinstance(v, torch.device) for v in values):
        return DeviceOf()
    if all(type(v) is type(first) for v in values) and all(v == first for v in values[1:]) and _bakeable(first):
        return Const(first)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        for d, size in enumerate(shapes[0]):
            if size == 0:
                continue
            ratio = Fraction(values[0], size)
            if all(len(s) > d and Fraction(v) == s[d] * ratio for v, s in zip(values, shapes, strict=True)):
                return FromDim(d, ratio.numerator, ratio.denominator)
        return None
    if all(isinstance(v, (tuple, list)) and type(v) is type(first) and len(v) == len(first) for v in values):
        items = []
        for i in range(len(first)):
            rule = fit_rule([v[i] for v in values], shapes)
            if rule is None:
                return None
            items.append(rule)
        return Pack(type(first), tuple(items))
    return None


# --- cut points --------------------------------------------------------------------------------

def recomputable(nodes: Sequence, is_tensor: Sequence[bool]) -> list[bool]:
    """Per position: whether the node is a tensor computed from parameters and shape values only.

    Such a tensor does not depend on the input's values: a rotary position table built once from the
    patch grid (DINOv3, ``timm.models.eva``) and handed to every block, a ``cls_token.expand(B, ...)``.
    A block that uses one defined before its start recomputes it from a copy of its producers (their
    shape inputs become crossing values with rules), so it does not count as crossing a cut; otherwise
    such a table would cross every block and leave no cut at all.
    """
    pos = {n: i for i, n in enumerate(nodes)}
    out = [False] * len(nodes)
    for i, n in enumerate(nodes):
        if not is_tensor[i] or n.op not in ("call_function", "call_method", "call_module"):
            continue
        out[i] = all(a.op == "get_attr" or out[pos[a]] or (not is_tensor[pos[a]] and a.op != "placeholder")
                     for a in n.all_input_nodes)
    return out


def _last_use(nodes, recompute: Sequence[bool] | None = None) -> list[int]:
    """Per position: position of the node's last user (its own position when unused).

    With ``recompute``, a recomputable node's inputs live until its own last use (a block after it
    rebuilds it from them).
    """
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = list(range(len(nodes)))
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[pos[a]] = max(last_use[pos[a]], i)
    if recompute is not None:
        for i in range(len(nodes) - 1, -1, -1):  # users first, so chains of recomputed nodes propagate
            if recompute[i]:
                for a in nodes[i].all_input_nodes:
                    last_use[pos[a]] = max(last_use[pos[a]], last_use[i])
    return last_use


def tensor_cuts(nodes: Sequence, is_tensor: Sequence[bool], single_tensor: Sequence[bool],
                recompute: Sequence[bool] | None = None) -> list[int]:
    """Positions of nodes that only their own tensor output crosses (O(V+E) difference array).

    Args:
        nodes: fx nodes in graph order.
        is_tensor: per position, whether the node's value holds a tensor (edges from it count).
        single_tensor: per position, whether the node's value is one tensor (it may be a cut).
        recompute: per position, whether the node is :func:`recomputable` (its edges do not count, and
            it is never a cut itself).

    Returns:
        Sorted positions of cut nodes (never placeholders, ``get_attr`` or the output node).
    """
    recompute = recompute if recompute is not None else [False] * len(nodes)
    last_use = _last_use(nodes)
    diff = [0] * (len(nodes) + 1)
    for i, n in enumerate(nodes):
        if n.op == "get_attr" or not is_tensor[i] or recompute[i]:
            continue  # parameters used inline, shape ints and recomputed tables do not count as crossing
        lo, hi = i + 1, last_use[i]
        if lo < hi:
            diff[lo] += 1
            diff[hi] -= 1
    cuts, cover = [], 0
    for i, n in enumerate(nodes):
        cover += diff[i]
        if cover == 0 and single_tensor[i] and not recompute[i] and n.op not in ("placeholder", "output", "get_attr"):
            cuts.append(i)
    return cuts


def crossing_values(nodes: Sequence, is_tensor: Sequence[bool], cuts: Sequence[int],
                    recompute: Sequence[bool] | None = None) -> dict[int, list[int]]:
    """For each cut position, the positions of non-tensor nodes whose value crosses it.

    A sweep over cuts in order with the live non-tensor spans: O(V + E + number of crossings). With
    ``recompute``, the shape values a recomputable node is built from cross wherever it is used.
    """
    last_use = _last_use(nodes, recompute)
    starts = sorted((i for i, n in enumerate(nodes)
                     if n.op != "get_attr" and not is_tensor[i] and last_use[i] > i + 1))
    live: list[int] = []
    out: dict[int, list[int]] = {}
    k = 0
    for c in cuts:
        while k < len(starts) and starts[k] < c:
            live.append(starts[k])
            k += 1
        live = [a for a in live if last_use[a] > c]  # drop spans that ended; live lists stay short
        out[c] = list(live)
    return out


def crossing_rules(nodes: Sequence, probes_values: Sequence[dict[str, Any]], is_tensor: Sequence[bool],
                   cuts: Sequence[int], recompute: Sequence[bool] | None = None) -> dict[int, dict[str, Any]]:
    """Fit a rule for every non-tensor value crossing every cut; cuts with an unfittable value are left out.

    Args:
        nodes: fx nodes in graph order.
        probes_values: per probe, node name -> abstract value.
        is_tensor: per position, whether the node's value holds a tensor.
        cuts: candidate cut positions from :func:`tensor_cuts`.
        recompute: per position, whether the node is :func:`recomputable`.

    Returns:
        Valid cut position -> {crossing node name: rule}.
    """
    crossing = crossing_values(nodes, is_tensor, cuts, recompute)
    valid: dict[int, dict[str, Any]] = {}
    for c in cuts:
        shapes = [vals[nodes[c].name].shape for vals in probes_values]
        rules = {}
        for a in crossing[c]:
            name = nodes[a].name
            rule = fit_rule([vals[name] for vals in probes_values], shapes)
            if rule is None:
                break
            rules[name] = rule
        else:
            valid[c] = rules
    return valid


def pair_cuts(nodes: Sequence, is_tensor: Sequence[bool], single_tensor: Sequence[bool],
              recompute: Sequence[bool] | None = None) -> dict[int, tuple[int, int]]:
    """Positions where exactly two tensors cross: the node's own output and one earlier tensor (O(V+E) sweep).

    Fallback for two-stream models (CrossViT's two token widths, TNT's pixel and patch tokens, NASNet's
    cells taking the previous two cells' outputs), where :func:`tensor_cuts` finds almost nothing. Edges
    count as in :func:`tensor_cuts`; both crossing values must be single tensors.

    Returns:
        Cut position -> the positions of the two crossing tensors, in graph order.
    """
    recompute = recompute if recompute is not None else [False] * len(nodes)
    last_use = _last_use(nodes)
    ends: dict[int, list[int]] = {}
    live: set[int] = set()
    out: dict[int, tuple[int, int]] = {}
    for i, n in enumerate(nodes):
        if n.op != "get_attr" and is_tensor[i] and not recompute[i] and last_use[i] > i:
            live.add(i)
            ends.setdefault(last_use[i], []).append(i)
        for j in ends.pop(i, ()):
            live.discard(j)
        if (len(live) == 2 and i in live and n.op not in ("placeholder", "output", "get_attr")
                and all(single_tensor[j] for j in live)):
            a, b = sorted(live)
            out[i] = (a, b)
    return out


def pair_rules(nodes: Sequence, probes_values: Sequence[dict[str, Any]], is_tensor: Sequence[bool],
               pairs: dict[int, tuple[int, int]], recompute: Sequence[bool] | None = None
               ) -> dict[int, dict[str, Any]]:
    """:func:`crossing_rules` for two-tensor cuts: each crossing value is fitted on the first tensor's
    shape, else on the second's, and wrapped in :class:`Item`; cuts with an unfittable value are left out."""
    cuts = sorted(pairs)
    crossing = crossing_values(nodes, is_tensor, cuts, recompute)
    valid: dict[int, dict[str, Any]] = {}
    for c in cuts:
        shapes = [[vals[nodes[j].name].shape for vals in probes_values] for j in pairs[c]]
        rules = {}
        for a in crossing[c]:
            name = nodes[a].name
            values = [vals[name] for vals in probes_values]
            for k, s in enumerate(shapes):
                rule = fit_rule(values, s)
                if rule is not None:
                    rules[name] = Item(k, rule)
                    break
            else:
                break
        else:
            valid[c] = rules
    return valid


# --- runs and granularity ------------------------------------------------------------------------

def group_runs(cuts: Sequence[int], is_compute: Sequence[bool],
               starts_run: Sequence[bool] | None = None) -> list[list[int]]:
    """Group cut positions into runs: consecutive cuts with no other tensor-producing node between them.

    ``add -> relu`` after a residual block is one run: splitting after ``add`` or after ``relu`` is the
    same place in the network.

    Args:
        cuts: sorted valid cut positions.
        is_compute: per position, whether the node produces a tensor (a non-cut one ends a run).
        starts_run: per position, whether a cut there always starts a new run: a leaf that is a whole
            sub-network (an attention module kept as a leaf for its train-mode behaviour, see
            :func:`surgery.tracing.reads_training`) is not "the same place" as the cut before it, as it was
            not while its inner nodes were traced.
    """
    runs: list[list[int]] = []
    for c in cuts:
        if (runs and not any(is_compute[i] for i in range(runs[-1][-1] + 1, c))
                and not (starts_run is not None and starts_run[c])):
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs


def container_boundaries(positions: Iterable[int], module_path: Sequence[str],
                         is_container: Callable[[str], bool], is_simple: Callable[[str | None], bool],
                         kind: Callable[[str], Any]) -> set[int]:
    """Positions after which the graph moves from one block module to the next.

    Let ``v`` be the node, ``w`` the next node, ``P`` the deepest module holding both, and ``cv``, ``cw``
    the children of ``P`` holding ``v`` and ``w``. The boundary after ``v`` is a block boundary when

    * ``P`` is the root or a container (``nn.Sequential``/``nn.ModuleList``/``nn.ModuleDict``) and ``cv``,
      ``cw`` are not both single layers (a conv, a norm, an activation: at most one module with
      parameters), so that a stem or head written as a flat sequence of layers stays one block; or
    * ``cv`` and ``cw`` are two non-simple siblings of the same class (RegNet's ``RegStage`` holds its
      blocks as attributes ``b1, b2, ...`` rather than in a container).

    A residual ``add`` after the attention of a transformer block has ``v`` and ``w`` inside the block
    module and ``cv`` = ``None`` (the block's own code): not a boundary.

    Args:
        positions: positions to test (valid cut positions).
        module_path: per position, dotted path of the innermost module ('' for the root).
        is_container: whether the module at a path ('' = root) is the root or a container.
        is_simple: whether the module at a path is a single layer; ``None`` (code running in ``P``'s own
            ``forward``) counts as simple.
        kind: the class of the module at a path.
    """
    kept = set()
    for v in positions:
        w = min(v + 1, len(module_path) - 1)
        common = _common_prefix(module_path[v], module_path[w])
        cv, cw = _child(common, module_path[v]), _child(common, module_path[w])
        simple_v, simple_w = is_simple(cv), is_simple(cw)
        if is_container(common) and not (simple_v and simple_w):
            kept.add(v)
        elif cv is not None and cw is not None and not simple_v and not simple_w and kind(cv) is kind(cw):
            kept.add(v)
    return kept


def run_candidates(runs: Sequence[Sequence[int]], output_producer: int | None,
                   at_boundary: set[int]) -> tuple[list[int], set[int]]:
    """Candidate cuts of each run, and which candidates are block boundaries.

    All nodes of a run cut the network at about the same place (``add -> relu``). A run's candidates are
    its block-boundary nodes (see :func:`container_boundaries`; a chain of leaf blocks is one run with
    several), or, when it has none, one representative: its last node, except in the run that reaches the
    model output, where it is the first node, so that pooling and head form the last block. A candidate
    equal to the output producer would make an empty last block: dropped.

    Args:
        runs: runs of cut positions from :func:`group_runs`.
        output_producer: position of the node whose value the graph returns (``None`` if not a node).
        at_boundary: positions that are block boundaries.

    Returns:
        Candidate positions in order, and the subset that are block boundaries.
    """
    candidates, blocks = [], set()
    for run in runs:
        marked = [i for i in run if i in at_boundary and i != output_producer]
        if marked:
            candidates.extend(marked)
            blocks.update(marked)
            continue
        c = run[0] if output_producer is not None and run[-1] == output_producer else run[-1]
        if c != output_producer:
            candidates.append(c)
    return candidates, blocks


def _common_prefix(a: str, b: str) -> str:
    pa, pb = a.split(".") if a else [], b.split(".") if b else []
    common = []
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _child(parent: str, path: str) -> str | None:
    """Path of the child of ``parent`` that contains ``path`` (``None`` when ``path`` is ``parent``)."""
    if path == parent:
        return None
    rest = path[len(parent) + 1:] if parent else path
    return (parent + "." if parent else "") + rest.split(".")[0]


def prune_block_boundaries(boundaries: Sequence[int], specs: dict[int, TensorSpec],
                           single_layer: Sequence[bool]) -> list[int]:
    """Keep the head whole and drop blocks that are a lone layer.

    * No block boundary on a pooled vector (``NC``): pooling and head form the last block (timm's
      attention-pool heads are a module of their own and would otherwise be a block).
    * A block made only of single layers joins a neighbour: the stem when it directly follows it (ResNet's
      ``bn1, act1, maxpool`` after a deep-stem ``conv1``), else the next block (the final norm between the
      last transformer block and an attention-pool head joins the head).

    Args:
        boundaries: sorted block-boundary positions.
        specs: position -> output spec.
        single_layer: per position, whether the node runs in the root's own code or in a top-level
            child module that is a single layer.
    """
    out: list[int] = []
    for b in boundaries:
        if specs[b].layout == "NC":
            continue
        if out and all(single_layer[i] for i in range(out[-1] + 1, b + 1)):
            if len(out) == 1:
                out[0] = b  # right after the stem (ResNet's bn1/act1/maxpool after a deep conv1): join the stem
            continue  # otherwise join the next block (a final norm joins the head)
        out.append(b)
    return out


def stage_boundaries(boundaries: Sequence[int], specs: Sequence[TensorSpec]) -> list[int]:
    """Boundaries where the grid, channels or layout change (``granularity="stage"``), plus the first and last.

    Args:
        boundaries: block-level boundary positions, sorted.
        specs: the output spec of each boundary.
    """
    if len(boundaries) <= 2:
        return list(boundaries)
    keep = [boundaries[0]]
    for i in range(1, len(boundaries) - 1):
        a, b = specs[i], specs[i + 1]
        if (a.layout, a.channels, a.grid) != (b.layout, b.channels, b.grid):
            keep.append(boundaries[i])
    keep.append(boundaries[-1])
    return keep


def merge_small_blocks(boundaries: Sequence[int], cumulative_macs: Sequence[int], total_macs: int,
                       min_fraction: float) -> list[int]:
    """Remove boundaries until every block has at least ``min_fraction`` of the model's MACs.

    Greedy: repeatedly take the smallest block and merge it with its smaller neighbour (removing the
    boundary between them), until all blocks pass or a single block remains.

    Args:
        boundaries: sorted boundary positions.
        cumulative_macs: MACs from the model input up to and including each boundary.
        total_macs: MACs of the whole model.
        min_fraction: minimum share of the model MACs per block, in ``[0, 1]``.
    """
    bounds, cum = list(boundaries), list(cumulative_macs)
    threshold = min_fraction * total_macs
    while bounds:
        edges = [0] + cum + [total_macs]
        sizes = [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]
        smallest = min(range(len(sizes)), key=sizes.__getitem__)
        if sizes[smallest] >= threshold:
            break
        # block i lies between boundary i-1 and boundary i; merge with the smaller neighbour
        if smallest == 0:
            drop = 0
        elif smallest == len(sizes) - 1:
            drop = smallest - 1
        else:
            drop = smallest - 1 if sizes[smallest - 1] <= sizes[smallest + 1] else smallest
        del bounds[drop], cum[drop]
    return bounds


def is_tensor_shape(value: Any) -> bool:
    """Whether an abstract probe value is exactly one tensor."""
    return isinstance(value, TensorShape)


def flat_stage_boundaries(positions: Sequence[int], specs: dict[int, TensorSpec], module_path: Sequence[str],
                          is_container: Callable[[str], bool], is_simple: Callable[[str | None], bool]) -> set[int]:
    """Positions inside a flat sequence of layers after which the grid changes (fallback for VGG-like bodies).

    A body written as one ``nn.Sequential`` of single layers (VGG's ``features``: conv, relu, ..., max-pool)
    has no boundary by :func:`container_boundaries`, which keeps flat stems and heads whole. When the model
    would otherwise have too few blocks, :func:`surgery.dissection.dissect` also cuts such a sequence where
    its grid changes: after ``v`` when ``v`` and the next node are two single layers (or the parent's own
    code) of the root or of a container, and the next valid cut has another grid or layout. The boundary
    lies before the down-sampling layer, where timm's ``feature_info`` marks VGG's stages.

    Args:
        positions: valid cut positions, sorted.
        specs: position -> output spec.
        module_path: per position, dotted path of the innermost module ('' for the root).
        is_container: as for :func:`container_boundaries`.
        is_simple: as for :func:`container_boundaries`.
    """
    kept = set()
    positions = sorted(positions)
    for v, nxt in zip(positions, positions[1:], strict=False):
        w = min(v + 1, len(module_path) - 1)
        common = _common_prefix(module_path[v], module_path[w])
        if not (is_container(common) and is_simple(_child(common, module_path[v]))
                and is_simple(_child(common, module_path[w]))):
            continue
        a, b = specs[v], specs[nxt]
        if a.grid is not None and b.grid is not None and (a.layout, a.grid) != (b.layout, b.grid):
            kept.add(v)
    return kept


def drop_empty_blocks(boundaries: Sequence[int], removable: set[int], cumulative_macs: Sequence[int],
                      total_macs: int) -> list[int]:
    """Drop boundaries in ``removable`` until no block without MACs (a lone pool) is left where that helps.

    A block with no MACs joins the next block when its end boundary may be dropped (a lone max-pool
    opens the next stage, as it does where the boundary is taken before it), else the previous one.

    Args:
        boundaries: sorted boundary positions.
        removable: the boundaries that may be dropped.
        cumulative_macs: per position, MACs from the model input up to and including it.
        total_macs: MACs of the whole model.
    """
    out = list(boundaries)
    i = 0
    while i <= len(out):  # block i lies between boundary i-1 and boundary i
        start = cumulative_macs[out[i - 1]] if i else 0
        end = cumulative_macs[out[i]] if i < len(out) else total_macs
        if end == start:
            if i < len(out) and out[i] in removable:
                del out[i]
                continue
            if i and out[i - 1] in removable:
                del out[i - 1]
                i -= 1
                continue
        i += 1
    return out
