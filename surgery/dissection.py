"""Dissect a model into blocks: the public :func:`dissect` and the :class:`Dissection` it returns.

Steps (``DESIGN.md``, "Dissect"): trace once with torch.fx and timm's registries
(:mod:`surgery.tracing`); probe the graph on the meta device at batch 1 (shapes and MACs per node), at
batch 2, and at a second resolution when the model accepts one; find the cut points where exactly one
tensor crosses and fit rules that recompute crossing shape integers from that tensor
(:mod:`surgery.cuts`); group cut nodes into runs, one candidate per run; choose boundaries by
granularity; and materialise each block as a standalone ``torch.fx.GraphModule`` that shares its
parameters with the model. Running the blocks in order reproduces the model.

Provenance: the cut-point definition and the measurements behind it are in ``research/feasibility.md``
§3; the node-copy construction of sub-graphs follows the idea of ``torch.fx.passes.split_module`` and
torchvision's feature extractor (``research/ecosystem.md`` §1), written for single-tensor interfaces.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from surgery import cuts as C
from surgery.count import count_params
from surgery.errors import SurgeryError, TraceError
from surgery.spec import BlockInfo, TensorSpec
from surgery.tracing import Probe, TensorShape, adopt_mode, has_tensor, modes_kept, one_line, run_probe, trace_model

__all__ = ["dissect", "Dissection", "GRANULARITIES"]

GRANULARITIES = ("node", "block", "stage")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# node.meta key marking tensors built from parameters and shapes only (see surgery.cuts.recomputable)
RECOMPUTE_META = "surgery_recompute"
# second resolutions tried for the resolution probe (added to H, W); non-square first, so that the
# probe can tell height from width
_RESOLUTION_STEPS = ((32, 64), (64, 64))


# --- tensor specs ------------------------------------------------------------------------------

_MAX_PREFIX = 16  # class + distillation + register tokens (timm models have at most 5)


def _aspect_ok(gh: int, gw: int, hw: tuple[int, int]) -> bool:
    """Whether a ``gh x gw`` grid can cover an ``H x W`` input: stride >= 1 and the input's aspect ratio
    up to rounding by one cell (exact for square inputs)."""
    h, w = hw
    return 1 <= gh <= h and 1 <= gw <= w and 2 * abs(gh * w - gw * h) < h + w


def _aspect_grids(m: int, hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Grids of ``m`` cells that have the aspect ratio of an ``H x W`` input."""
    out = []
    for gh in range(1, math.isqrt(m) + 1):
        if m % gh == 0:
            out += [g for g in {(gh, m // gh), (m // gh, gh)} if _aspect_ok(*g, hw)]
    return out


def _tokens_layout(n: int, n_res: int | None, hw: tuple[int, int], hw_res: tuple[int, int] | None,
                   prefix_hint: int | None, max_prefix: int = _MAX_PREFIX
                   ) -> tuple[tuple[int, int] | None, int | None, int]:
    """Patch grid, stride and prefix-token count of ``n`` tokens, from the input size (and a 2nd probe).

    ``n = prefix + gh * gw``, preferring in turn: the model's own prefix count (``prefix_hint``), fewer
    prefix tokens, a grid of integer stride ``(H/s, W/s)`` over any other grid of the input's aspect
    ratio (PiT's 27 x 27 from a 16-wide, stride-8 patch conv at 224 px; LeViT's 5 x 5 at 288 px).
    With the resolution probe the same prefix count must explain ``n_res`` at ``hw_res``. ``n``
    tokens that are all prefix tokens (PiT's final class token) need ``n == prefix_hint``. Returns
    ``(None, None, 0)`` when nothing fits.
    """
    h, w = hw
    best = None
    for prefix in range(min(max_prefix, n) + 1):
        m, m_res = n - prefix, (n_res - prefix if n_res is not None else None)
        other_count = prefix != prefix_hint
        options = []  # (score, grid, stride)
        if m == 0:
            if not other_count and m_res in (None, 0):
                options.append(((other_count, prefix, 0), None, None))
        else:
            for s in range(1, min(h, w) + 1):
                if h % s or w % s or (h // s) * (w // s) != m:
                    continue
                if m_res is not None and (hw_res[0] % s or hw_res[1] % s
                                          or (hw_res[0] // s) * (hw_res[1] // s) != m_res):
                    continue
                options.append(((other_count, prefix, 0), (h // s, w // s), s))
            if m_res is None or (m_res > 0 and _aspect_grids(m_res, hw_res)):
                options += [((other_count, prefix, 1), g, h // g[0]) for g in _aspect_grids(m, hw)]
        for score, grid, stride in options:
            if best is None or score < best[0]:
                best = (score, grid, stride, prefix)
    if best is None:
        return None, None, 0
    return best[1], best[2], best[3]


def _positions_spec(shape: tuple[int, ...], channels_last: bool, n_res: int | None, hw: tuple[int, int],
                    hw_res: tuple[int, int] | None) -> TensorSpec:
    """An ``"other"`` spec: features on the last (or first) non-batch dim, positions in the rest, in an
    order no layout describes; the grid is given when the number of positions fits one."""
    channels = shape[-1] if channels_last else shape[1]
    m = math.prod(shape[1:-1] if channels_last else shape[2:])
    grid, stride, _ = _tokens_layout(m, n_res, hw, hw_res, 0, max_prefix=0)
    return TensorSpec("other", channels, grid, stride, 0, shape)


def infer_spec(shape: tuple[int, ...], res_shape: tuple[int, ...] | None, hw: tuple[int, int],
               hw_res: tuple[int, int] | None, prefix_hint: int | None = None, *, raster: bool = True,
               batch2_shape: tuple[int, ...] | None = None) -> TensorSpec:
    """Describe a tensor crossing a cut from its batch-1 shape (and its shapes in other probes).

    A spec is right or says ``"other"`` (unknown, never stitched):

    * A first dim that does not follow the batch (TNT's pixel tokens fold ``B * N``): ``"other"``.
    * 4-d: with a resolution probe, the dims that follow the resolution are the grid: 2-3 ``NCHW``,
      1-2 ``NHWC`` (timm Swin stages); anything else (NesT's blockified ``(B, T, N, C)`` changes only
      ``T``) is ``"other"``. Without a probe (or when nothing follows it: pooled maps), the grid is the
      pair of dims with the input's aspect ratio (dims 2-3 first); when neither pair has it,
      ``"other"``, with the feature dim last when the other dims hold a grid's worth of positions
      (NesT: ``16 x 196 = 56 x 56`` positions of 96 channels), else first.
    * 3-d: ``NLC`` tokens, ``N = prefix + gh * gw`` (see :func:`_tokens_layout`); grid ``None`` when no
      grid explains ``N``. Tokens that are not in raster order (``raster=False``: Hiera after its
      unroll) are ``"other"``; so are ``(B, C, N)`` tensors whose last dim follows the resolution.
    * 2-d: ``NC`` vectors.

    Args:
        shape: shape at batch 1.
        res_shape: shape in the resolution probe (batch 2), or ``None``.
        hw: input height and width.
        hw_res: input height and width of the resolution probe, or ``None``.
        prefix_hint: the model's number of class/distillation/register tokens when it has them.
        raster: whether tokens are in raster order of their grid.
        batch2_shape: shape in the batch-2 probe, or ``None``.
    """
    shape = tuple(shape)
    if res_shape is not None and len(res_shape) != len(shape):
        res_shape = None
    if hw_res is None:
        res_shape = None
    if len(shape) < 2 or shape[0] != 1 or (batch2_shape is not None and tuple(batch2_shape)[:1] != (2,)):
        return TensorSpec("other", 0, shape=shape)
    if len(shape) == 4:
        return _map_spec(shape, res_shape, hw, hw_res)
    if len(shape) == 3:
        n, c = shape[1], shape[2]
        if res_shape is not None and res_shape[2] != c:
            if res_shape[1] == n:  # (B, C, N): the last dim follows the resolution
                return _positions_spec(shape, False, res_shape[2], hw, hw_res)
            return TensorSpec("other", 0, shape=shape)
        grid, stride, prefix = _tokens_layout(n, res_shape[1] if res_shape else None, hw, hw_res, prefix_hint)
        if not raster:
            return TensorSpec("other", c, grid if not prefix else None, stride if not prefix else None, 0, shape)
        return TensorSpec("NLC", c, grid, stride, prefix, shape)
    if len(shape) == 2:
        return TensorSpec("NC", shape[1], None, None, 0, shape)
    return TensorSpec("other", 0, shape=shape)


def _map_spec(shape: tuple[int, ...], res_shape: tuple[int, ...] | None, hw: tuple[int, int],
              hw_res: tuple[int, int] | None) -> TensorSpec:
    """Spec of a 4-d tensor (see :func:`infer_spec`)."""
    changed = {d for d in (1, 2, 3) if shape[d] != res_shape[d]} if res_shape is not None else set()
    if changed:
        layout = {frozenset((2, 3)): "NCHW", frozenset((1, 2)): "NHWC"}.get(frozenset(changed))
    elif _aspect_ok(shape[2], shape[3], hw):
        layout = "NCHW"
    elif _aspect_ok(shape[1], shape[2], hw):
        layout = "NHWC"
    else:
        layout = None
    if layout is not None:
        grid, channels = ((shape[2], shape[3]), shape[1]) if layout == "NCHW" else ((shape[1], shape[2]), shape[3])
        return TensorSpec(layout, channels, grid, hw[0] // grid[0], 0, shape)
    if changed:
        if 3 not in changed:
            return _positions_spec(shape, True, res_shape[1] * res_shape[2], hw, hw_res)
        if 1 not in changed:
            return _positions_spec(shape, False, res_shape[2] * res_shape[3], hw, hw_res)
        return TensorSpec("other", 0, shape=shape)
    last = _positions_spec(shape, True, None, hw, None)
    return last if last.grid is not None else _positions_spec(shape, False, None, hw, None)


def _prefix_hint(model: nn.Module) -> int | None:
    """The model's number of prefix tokens: timm's ``num_prefix_tokens``, else the tokens held by its
    ``cls_token`` / ``dist_token`` / ``reg_token`` parameters (PiT keeps class and distillation tokens in
    one ``cls_token``); ``None`` when it has none of these."""
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    tokens = [getattr(model, a, None) for a in ("cls_token", "dist_token", "reg_token")]
    tokens = [t for t in tokens if isinstance(t, torch.Tensor) and t.dim() == 3]
    return sum(int(t.shape[1]) for t in tokens) if tokens else None


def _unrolled(model: nn.Module, nodes: Sequence[Node]) -> tuple[int, int] | None:
    """Where tokens leave raster order: ``(position of the last node of timm Hiera's unroll, the token
    count at which all unroll strides are pooled away and tokens are in raster order again)``; ``None``
    for models without an unroll (timm ``hiera.Unroll``: ``size`` and ``schedule``)."""
    unroll = getattr(model, "unroll", None)
    size, schedule = getattr(unroll, "size", None), getattr(unroll, "schedule", None)
    if size is None or schedule is None:
        return None
    last = max((i for i, n in enumerate(nodes) if str(n.meta.get("module_path") or "").split(".")[0] == "unroll"),
               default=None)
    if last is None:
        return None
    return last, math.prod(size) // math.prod(math.prod(s) for s in schedule)


# --- building blocks ---------------------------------------------------------------------------

def _emit_rule(graph: Graph, x: Node, rule, parts: Sequence[Node] = ()) -> Any:
    """Materialise a crossing-value rule as graph nodes computing it from the block input ``x`` (or from
    the tensors ``parts`` of a two-tensor input, for :class:`surgery.cuts.Item` rules)."""
    if isinstance(rule, C.Item):
        return _emit_rule(graph, parts[rule.index], rule.rule)
    if isinstance(rule, C.Const):
        return rule.value
    if isinstance(rule, C.DeviceOf):
        return graph.call_function(getattr, (x, "device"))
    if isinstance(rule, C.FromDim):
        value = graph.call_method("size", (x, rule.dim))
        if rule.num != 1:
            value = graph.call_function(operator.mul, (value, rule.num))
        if rule.den != 1:
            value = graph.call_function(operator.floordiv, (value, rule.den))
        return value
    items = [_emit_rule(graph, x, r, parts) for r in rule.items]
    if rule.kind is torch.Size:
        return graph.call_function(torch.Size, (items,))
    return rule.kind(items)


def _class_name(name: str, index: int) -> str:
    base = re.sub(r"\W", "_", name) or "model"
    return f"{base}_block{index}"


def build_block(gm: GraphModule, nodes: Sequence[Node], start: int | None, end: int | None,
                rules: dict[str, Any], class_name: str = "Block", start_parts: Sequence[int] = (),
                end_parts: Sequence[int] = ()) -> GraphModule:
    """Copy the nodes after ``start`` up to ``end`` into a standalone ``GraphModule``.

    The block holds ``gm``'s own modules (shared, mode included: ``block.train()`` switches them, as it
    switches the dropout and stochastic-depth leaves kept by :func:`surgery.tracing.trace_model`) and starts
    in ``gm``'s mode; in ``train()`` it behaves like that part of the model in ``train()``.

    Args:
        gm: the traced model; submodules and parameters are shared, not copied.
        nodes: its nodes in graph order.
        start: position of the cut whose output is the block input (``None``: the model input).
        end: position of the cut whose output the block returns (``None``: up to the model output).
        rules: crossing-value rules of the ``start`` cut (name -> rule), see :func:`surgery.cuts.fit_rule`.
        class_name: class name of the generated module.
        start_parts: for a ``start`` cut where two tensors cross, their positions: the block's one input
            is the tuple of both (unpacked inside); empty for a single-tensor cut.
        end_parts: likewise for ``end``: the block returns the tuple of both tensors.
    """
    graph = Graph()
    env: dict[Node, Any] = {}
    x = None
    parts: list[Node] = []
    if start is not None:
        x = graph.placeholder("x")
        if start_parts:
            for k, j in enumerate(start_parts):
                parts.append(graph.call_function(operator.getitem, (x, k)))
                env[nodes[j]] = parts[-1]
        else:
            env[nodes[start]] = x

    def lookup(a: Node) -> Any:
        if a not in env:  # defined before the block: a parameter, or a shape value recomputed from x
            if a.op == "get_attr":
                env[a] = graph.node_copy(a)
            elif a.meta.get(RECOMPUTE_META):  # a table built from parameters and shapes: rebuild it here
                env[a] = graph.node_copy(a, lookup)
            else:
                env[a] = _emit_rule(graph, x, rules[a.name], parts)
        return env[a]

    first = 0 if start is None else start + 1
    last = len(nodes) - 1 if end is None else end
    for i in range(first, last + 1):
        env[nodes[i]] = graph.node_copy(nodes[i], lookup)
    if end is not None:
        graph.output(tuple(env[nodes[j]] for j in end_parts) if end_parts else env[nodes[end]])
    block = GraphModule(gm, graph, class_name)
    adopt_mode(block, gm.training, gm)  # never flip the shared modules (the model's own) as a side effect
    return block


# --- the dissection ------------------------------------------------------------------------------

class Dissection:
    """A model cut into blocks, with everything needed to re-cut it differently.

    Attributes:
        name: model name.
        input_size: input size without batch, e.g. ``(3, 224, 224)``.
        granularity: the granularity the boundaries were chosen at.
        graph_module: the traced model (shares parameters with the original).
        cut_points: every candidate cut point (one per run of cut nodes), in graph order.
        boundaries: names of the cut points the blocks end at.
        blocks: the blocks, standalone modules; chained they reproduce the model, in eval mode and (with
            the same random seed) in train mode.
            A block at a two-tensor cut point (``spec.parts``) takes and/or returns a tuple of two tensors.
        block_info: metadata of each block (params and MACs counted once each; MACs at batch 1).
        params: parameters of the model; macs: MACs of the model at batch 1 and ``input_size``.
        input_spec / output_spec: specs of the model input and output.
        resizable: whether the model accepted a second input resolution in the probes (then the blocks
            recompute spatial sizes and accept other resolutions too).
    """

    def __init__(self, *, name: str, input_size: tuple[int, ...], granularity: str, min_macs_fraction: float,
                 graph_module: GraphModule, nodes: list[Node], valid_cuts: dict[int, dict[str, Any]],
                 specs: dict[int, TensorSpec], node_macs: list[int], params: int, cut_points: list[C.CutPoint],
                 input_spec: TensorSpec, output_spec: TensorSpec, resizable: bool,
                 pairs: dict[int, tuple[int, int]] | None = None):
        self.name = name
        self.input_size = tuple(input_size)
        self.granularity = granularity
        self.min_macs_fraction = min_macs_fraction
        self.graph_module = graph_module
        self._nodes = nodes
        self._valid_cuts = valid_cuts
        self._specs = specs
        self._cum_macs = [0] * len(node_macs)
        total = 0
        for i, m in enumerate(node_macs):
            total += m
            self._cum_macs[i] = total
        self.params = params
        self.macs = total
        self.cut_points = cut_points
        self.input_spec = input_spec
        self.output_spec = output_spec
        self.resizable = resizable
        self._pairs = dict(pairs or {})  # two-tensor cut position -> positions of its two tensors
        self._position = {n.name: i for i, n in enumerate(nodes)}
        self.boundaries: list[str] = []
        self.blocks: list[nn.Module] = []
        self.block_info: list[BlockInfo] = []

    def position(self, node: str) -> int:
        """Index of cut point ``node`` in graph order.

        Raises:
            SurgeryError: ``node`` is not a cut point of this model.
        """
        return self._positions([node])[0]

    def _positions(self, boundaries: Sequence[str]) -> list[int]:
        positions = []
        for b in boundaries:
            pos = self._position.get(b)
            if pos is None or pos not in self._valid_cuts:
                raise SurgeryError(f"{self.name}: {b!r} is not a cut point of this model")
            positions.append(pos)
        return sorted(set(positions))

    def split(self, boundaries: Sequence[str]) -> list[nn.Module]:
        """Blocks for any set of cut-point node names (order does not matter).

        Any node that is a valid cut is accepted, not only the listed ``cut_points``.

        Args:
            boundaries: node names where the model is cut; ``[]`` gives the whole model as one block.

        Returns:
            ``len(boundaries) + 1`` modules; chained they reproduce the model, in eval mode and, for the same
            random seed, in train mode (stochastic depth, dropout and batch statistics included).

        Raises:
            SurgeryError: when a name is not a cut point.
        """
        positions = self._positions(boundaries)
        starts, ends = [None, *positions], [*positions, None]
        return [
            build_block(self.graph_module, self._nodes, s, e, self._valid_cuts[s] if s is not None else {},
                        _class_name(self.name, i), self._pairs.get(s, ()), self._pairs.get(e, ()))
            for i, (s, e) in enumerate(zip(starts, ends, strict=True))
        ]

    def block_infos(self, boundaries: Sequence[str], blocks: Sequence[nn.Module]) -> list[BlockInfo]:
        """Metadata of the blocks produced by :meth:`split` for ``boundaries``."""
        positions = self._positions(boundaries)
        n = len(self._nodes)
        infos = []
        starts, ends = [None, *positions], [*positions, None]
        for i, (s, e, block) in enumerate(zip(starts, ends, blocks, strict=True)):
            macs_before = self._cum_macs[s] if s is not None else 0
            macs_to = self._cum_macs[e] if e is not None else self.macs
            infos.append(BlockInfo(
                model=self.name, index=i,
                start=self._nodes[s].name if s is not None else None,
                end=self._nodes[e].name if e is not None else None,
                params=count_params(block), macs=macs_to - macs_before,
                in_spec=self._specs[s] if s is not None else self.input_spec,
                out_spec=self._specs[e] if e is not None else self.output_spec,
                depth=(s / n if s is not None else 0.0, e / n if e is not None else 1.0),
            ))
        return infos

    def set_boundaries(self, boundaries: Sequence[str]) -> None:
        """Re-cut at ``boundaries``: updates ``boundaries``, ``blocks`` and ``block_info``."""
        positions = self._positions(boundaries)
        self.boundaries = [self._nodes[p].name for p in positions]
        self.blocks = self.split(self.boundaries)
        self.block_info = self.block_infos(self.boundaries, self.blocks)

    def run_blocks(self, x: torch.Tensor, blocks: Sequence[nn.Module] | None = None) -> Any:
        """Run ``blocks`` (default: :attr:`blocks`) in order on ``x``."""
        for block in self.blocks if blocks is None else blocks:
            x = block(x)
        return x

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: name, sizes, granularity, cut points, boundaries, block infos (no tensors)."""
        return {
            "name": self.name,
            "input_size": list(self.input_size),
            "granularity": self.granularity,
            "min_macs_fraction": self.min_macs_fraction,
            "params": int(self.params),
            "macs": int(self.macs),
            "resizable": self.resizable,
            "input_spec": self.input_spec.to_dict(),
            "output_spec": self.output_spec.to_dict(),
            "cut_points": [c.to_dict() for c in self.cut_points],
            "boundaries": list(self.boundaries),
            "blocks": [b.to_dict() for b in self.block_info],
        }

    def __repr__(self) -> str:
        return (f"Dissection({self.name!r}, {len(self.blocks)} blocks at {self.granularity!r}, "
                f"{len(self.cut_points)} cut points, {self.params / 1e6:.2f}M params, {self.macs / 1e9:.3f} GMACs)")


def _probes(gm: GraphModule, input_size: tuple[int, ...], name: str) -> tuple[Probe, list[Probe], Probe | None]:
    """Batch-1 probe with FLOPs, the list of probes used to fit crossing rules, and the resolution probe."""
    try:
        base = run_probe(gm, (1, *input_size), count_flops=True)
    except Exception as exc:
        raise TraceError(f"{name}: forward pass on input {tuple(input_size)} failed ({one_line(exc)})") from exc
    on_meta = base.device == "meta"
    fit = [base, run_probe(gm, (2, *input_size), on_meta=on_meta)]
    res = None
    if len(input_size) == 3:
        c, h, w = input_size
        for dh, dw in _RESOLUTION_STEPS:
            try:
                res = run_probe(gm, (2, c, h + dh, w + dw), on_meta=on_meta)
                break
            except Exception:  # the model fixes its input size (asserts, fixed position embeddings)
                continue
    if res is not None:
        fit.append(res)
    return base, fit, res


def _is_container(model: nn.Module):
    def is_container(path: str) -> bool:
        return path == "" or isinstance(model.get_submodule(path), _CONTAINERS)
    return is_container


def _is_simple(model: nn.Module):
    """A single layer: at most one module with its own parameters in its subtree."""
    cache: dict[str, bool] = {}  # called once per graph node, but there are few distinct paths

    def is_simple(path: str | None) -> bool:
        if path is None:
            return True
        if path not in cache:
            with_params = sum(1 for m in model.get_submodule(path).modules()
                              if next(m.parameters(recurse=False), None) is not None)
            cache[path] = with_params <= 1
        return cache[path]
    return is_simple


def _output_producer(nodes: Sequence[Node]) -> int | None:
    out = nodes[-1]
    arg = out.args[0] if out.args else None
    if isinstance(arg, Node):
        return nodes.index(arg)
    return None


def dissect(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), *, name: str = "model",
            granularity: str = "block", min_macs_fraction: float = 0.0, verify: bool = False,
            device: torch.device | str | None = None, flat_stages: bool = True,
            pair_cuts: bool = True) -> Dissection:
    """Trace ``model`` once and cut it into blocks.

    Candidate cut points are single-tensor cuts, one per run of consecutive cut nodes. Granularity:

    * ``"node"``: every candidate is a boundary.
    * ``"block"``: candidates between children of the root or of a container module (``nn.Sequential``,
      ``nn.ModuleList``, ``nn.ModuleDict``), not inside a block module: one block per transformer block,
      residual block, MBConv block, ...; stem and head are blocks of their own when a cut separates them.
    * ``"stage"``: block boundaries where the next block changes grid, channels or layout, plus the first
      (end of stem) and the last (start of head).

    A model whose body is one flat sequence of layers (VGG's ``features``) would get fewer than 4 blocks
    that way; with ``flat_stages`` such a sequence is also cut before each layer that changes the grid
    (one block per VGG stage; see :func:`surgery.cuts.flat_stage_boundaries`). A two-stream model
    (CrossViT, TNT, NASNet), where two tensors cross between blocks, is then also cut where exactly two
    tensors cross (``pair_cuts``, see :func:`surgery.cuts.pair_cuts`) when that gives at least 4 blocks;
    such a cut's spec is ``"other"``
    with the two tensors named in ``parts``, and a block there takes and/or returns the tuple of both
    (:meth:`Dissection.run_blocks` chains them unchanged). Models with at least 4 blocks without these
    fallbacks are not affected.

    Then, if ``min_macs_fraction > 0``, adjacent blocks are merged until each has at least that share of
    the model's MACs. Works on models on the ``meta`` device (structure only: nothing is computed).

    Args:
        model: the model (eval mode is used for tracing; its mode is restored).
        input_size: input size without batch.
        name: model name for metadata and messages.
        granularity: ``"node"``, ``"block"`` or ``"stage"``.
        min_macs_fraction: minimum share of the model's MACs per block, in ``[0, 1)``.
        verify: run a random batch through model and blocks and check they agree (skipped on meta).
        device: device of the verification input; default the model's device.
        flat_stages: cut flat layer sequences at grid changes when the model would otherwise have fewer
            than 4 blocks (``False``: never).
        pair_cuts: when the model would otherwise have fewer than 4 blocks, also cut where exactly two
            tensors cross (``False``: never); such blocks take and/or return a tuple of two tensors.

    Returns:
        The :class:`Dissection`.

    Raises:
        TraceError: the model cannot be traced, fails on this input size, has fewer than 2 cut points,
            or (with ``verify``) its blocks do not reproduce it.
        SurgeryError: bad arguments.
    """
    if granularity not in GRANULARITIES:
        raise SurgeryError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    if not 0.0 <= min_macs_fraction < 1.0:
        raise SurgeryError(f"min_macs_fraction must be in [0, 1), not {min_macs_fraction}")
    input_size = tuple(int(s) for s in input_size)
    gm = trace_model(model, name)
    nodes = list(gm.graph.nodes)
    base, fit, res = _probes(gm, input_size, name)

    values = [base.values[n.name] for n in nodes]
    is_tensor = [has_tensor(v) for v in values]
    recompute = C.recomputable(nodes, is_tensor)
    for n, r in zip(nodes, recompute, strict=True):
        if r:
            n.meta[RECOMPUTE_META] = True
    module_path = [n.meta.get("module_path", "") for n in nodes]
    # a whole attention module kept as a leaf for train mode: not the same place as the cut before it
    is_simple = _is_simple(model)
    starts_run = [bool(n.meta.get("mode_leaf")) and not is_simple(n.target) for n in nodes]

    def analyse(probes: list[Probe], with_pairs: bool = False):
        single = [all(isinstance(p.values[n.name], TensorShape) for p in probes) for n in nodes]
        valid = C.crossing_rules(nodes, [p.values for p in probes], is_tensor,
                                 C.tensor_cuts(nodes, is_tensor, single, recompute), recompute)
        pairs: dict[int, tuple[int, int]] = {}
        if with_pairs:
            all_pairs = {c: pr for c, pr in C.pair_cuts(nodes, is_tensor, single, recompute).items()
                         if all(nodes[j].op != "placeholder" for j in pr)}  # not while the input is still live
            pair_valid = C.pair_rules(nodes, [p.values for p in probes], is_tensor, all_pairs, recompute)
            pairs = {c: all_pairs[c] for c in pair_valid if c not in valid}
            valid = {**valid, **{c: pair_valid[c] for c in pairs}}
        runs = C.group_runs(sorted(valid), [t and not r for t, r in zip(is_tensor, recompute, strict=True)],
                            starts_run)
        at_boundary = C.container_boundaries(valid, module_path, _is_container(model), _is_simple(model),
                                               lambda path: type(model.get_submodule(path)))
        return (valid, *C.run_candidates(runs, _output_producer(nodes), at_boundary), runs, at_boundary, pairs)

    valid, candidates, block_level, runs, at_boundary, pairs = analyse(fit)
    if res is not None and len(block_level) < 4:
        # Some models carry a grid size as a list from block to block (MViTv2's [H, W]): no rule maps it
        # to the token tensor's shape across resolutions, so most cuts look invalid. At the traced
        # resolution those values are constants; cutting there (and giving up resizability) is better
        # than not cutting at all.
        fixed = analyse(fit[:2])
        if len(fixed[2]) > len(block_level):
            valid, candidates, block_level, runs, at_boundary, pairs = fixed
            res = None

    hw = input_size[1:] if len(input_size) == 3 else (1, 1)
    prefix_hint = _prefix_hint(model)
    unrolled = _unrolled(model, nodes)

    def spec_of(pos: int, res: Probe | None, pairs: dict[int, tuple[int, int]]) -> TensorSpec:
        if pos in pairs:  # two tensors cross: their tuple, described by the first one's shape
            a, b = pairs[pos]
            return TensorSpec("other", 0, shape=base.values[nodes[a].name].shape,
                              parts=(nodes[a].name, nodes[b].name))
        hw_res = res.input_shape[2:] if res is not None else None
        name = nodes[pos].name
        shape = base.values[name].shape
        res_value = res.values.get(name) if res is not None else None
        b2_value = fit[1].values.get(name)
        raster = unrolled is None or pos <= unrolled[0] or len(shape) != 3 or shape[1] == unrolled[1]
        return infer_spec(shape, res_value.shape if isinstance(res_value, TensorShape) else None, hw, hw_res,
                          prefix_hint, raster=raster,
                          batch2_shape=b2_value.shape if isinstance(b2_value, TensorShape) else None)

    specs = {p: spec_of(p, res, pairs) for p in valid}
    node_macs = [base.flops.get(n.name, 0) // 2 for n in nodes]  # counter FLOPs -> MACs
    cum, total = [], 0
    for m in node_macs:
        total += m
        cum.append(total)
    cut_points = [C.CutPoint(nodes[p].name, p, specs[p], cum[p], p / len(nodes)) for p in candidates]
    out_pos = _output_producer(nodes)
    out_value = base.values[nodes[out_pos].name] if out_pos is not None else None
    input_spec = infer_spec((1, *input_size), None, hw, None) if len(input_size) == 3 else TensorSpec(
        "other", input_size[0], shape=(1, *input_size))

    single_layer = [is_simple(path.split(".")[0] if path else None) for path in module_path]
    block_bounds = C.prune_block_boundaries([p for p in candidates if p in block_level], specs, single_layer)
    if flat_stages and len(block_bounds) < 3:
        # a flat sequence of layers (VGG) is one run with no block boundary: cut it where the grid changes
        extra = C.flat_stage_boundaries(valid, specs, module_path, _is_container(model), is_simple)
        extra = {p for p in extra if specs[p].layout != "NC"} - set(block_bounds)
        extra &= set(C.drop_empty_blocks(sorted(set(block_bounds) | extra), extra, cum, total))
        if extra:
            candidates, block_level = C.run_candidates(runs, out_pos, at_boundary | extra)
            block_bounds = sorted(set(block_bounds) | extra)
            cut_points = [C.CutPoint(nodes[p].name, p, specs[p], cum[p], p / len(nodes)) for p in candidates]
    if pair_cuts and len(block_bounds) < 3:
        # Two-stream models (CrossViT, TNT, NASNet cells taking the previous two cells' outputs): exactly
        # two tensors cross between blocks, so there are almost no single-tensor cuts. Cut where two
        # tensors cross too, when that gives at least 4 blocks (a model that stays below keeps its
        # single-tensor blocks); at the traced resolution only (constants kept, not resizable) when
        # that gives more blocks, as for MViTv2 above.
        best = None
        for probes, r in [(fit, res), (fit[:2], None)] if res is not None else [(fit[:2], None)]:
            v, cands, level, _, _, prs = analyse(probes, with_pairs=True)
            if not prs:
                continue
            sp = {p: spec_of(p, r, prs) for p in v}
            pooled = {p for p, pr in prs.items() if all(len(base.values[nodes[j].name].shape) == 2 for j in pr)}
            bb = C.prune_block_boundaries([p for p in cands if p in level and p not in pooled], sp, single_layer)
            if len(bb) >= 3 and len(bb) > len(block_bounds if best is None else best[4]):
                best = (v, cands, sp, r, bb, prs)
        if best is not None:
            valid, candidates, specs, res, block_bounds, pairs = best
            cut_points = [C.CutPoint(nodes[p].name, p, specs[p], cum[p], p / len(nodes)) for p in candidates]
    output_spec = spec_of(out_pos, res, {}) if isinstance(out_value, TensorShape) else TensorSpec("other", 0)
    if len(candidates) < 2:
        raise TraceError(f"{name}: only {len(candidates)} cut point(s) where a single tensor crosses; "
                         "cannot be cut into blocks")
    if granularity == "node":
        bounds = list(candidates)
    else:
        bounds = block_bounds
        if granularity == "stage":
            bounds = C.stage_boundaries(bounds, [specs[p] for p in bounds])
    if min_macs_fraction > 0:
        bounds = C.merge_small_blocks(bounds, [cum[p] for p in bounds], total, min_macs_fraction)

    dissection = Dissection(
        name=name, input_size=input_size, granularity=granularity, min_macs_fraction=min_macs_fraction,
        graph_module=gm, nodes=nodes, valid_cuts=valid, specs=specs, node_macs=node_macs,
        params=count_params(model), cut_points=cut_points, input_spec=input_spec, output_spec=output_spec,
        resizable=res is not None, pairs=pairs,
    )
    dissection.set_boundaries([nodes[p].name for p in bounds])
    if verify:
        _verify(model, dissection, device)
    return dissection


def _verify(model: nn.Module, dissection: Dissection, device) -> None:
    """Check on a random batch of 2 that the chained blocks reproduce the model (eval mode; modes restored)."""
    params = list(model.parameters())
    if params and params[0].device.type == "meta":
        return  # structure only: nothing to compare
    device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    with modes_kept(model, *dissection.blocks), torch.no_grad():
        model.eval()
        for block in dissection.blocks:
            block.eval()
        x = torch.randn(2, *dissection.input_size, device=device)
        expected, got = model(x), dissection.run_blocks(x)
    flat_e, flat_g = torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)
    ok = len(flat_e) == len(flat_g) and all(
        torch.allclose(e, g, rtol=1e-4, atol=1e-5) for e, g in zip(flat_e, flat_g, strict=True)
        if isinstance(e, torch.Tensor))
    if not ok:
        raise TraceError(f"{dissection.name}: chained blocks do not reproduce the model output")
