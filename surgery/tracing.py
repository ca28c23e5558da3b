"""Symbolic tracing of models with torch.fx, and shape probes over the traced graph.

The tracer follows timm's own recipe (``timm/layers/_fx.py`` and timm's ``test_model_forward_fx``): treat
the modules timm registers as "no-trace" as leaves, auto-wrap the functions it registers (window
partitioning, position-embedding resampling, ...), and keep parameter shapes constant. With those
registries timm's tracer handles every model of our 50-model sample where plain ``symbolic_trace``
fails on six (``research/feasibility.md`` §3). The tracer is written here rather than borrowed from
``torchvision.models.feature_extraction`` because we need the whole graph, one trace in eval mode,
and the module path of every node (``node.meta['module_path']``) for block granularity.

A *probe* runs the traced graph once on a given input and records, for every node, an abstract value:
the shape of each tensor it produced and the plain Python value of everything else (ints, sizes, ...).
Probes run on the ``meta`` device whenever the graph allows it, so probing costs no compute and no
memory even for huge models; they fall back to real execution on the model's own device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node, Tracer

from surgery.errors import TraceError

__all__ = ["SurgeryTracer", "trace_model", "TensorShape", "Probe", "run_probe", "has_tensor", "one_line"]


def one_line(exc: BaseException) -> str:
    """First line of an exception message, prefixed with its type (for one-line user errors)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _timm_registries() -> tuple[list[type[nn.Module]], list[Callable]]:
    """timm's registered leaf modules and auto-wrapped functions; empty when timm is missing."""
    try:
        from timm.models import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but the tracer works on plain torch models too
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


_TIMM_ACTIVATION_MODULES = ("timm.layers.activations",)


class SurgeryTracer(Tracer):
    """``torch.fx.Tracer`` with timm's leaf modules and auto-wrapped functions.

    Args:
        leaf_modules: extra module classes to keep as single ``call_module`` nodes.
        autowrap_functions: extra free functions to record as single ``call_function`` nodes.
    """

    def __init__(self, leaf_modules: Iterable[type[nn.Module]] = (), autowrap_functions: Iterable[Callable] = ()):
        timm_leaves, timm_functions = _timm_registries()
        super().__init__(
            autowrap_functions=tuple(timm_functions) + tuple(autowrap_functions),
            param_shapes_constant=True,
        )
        self.leaf_types = tuple(timm_leaves) + tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        # timm's activation modules (GELU, Swish, ...) live outside torch.nn, so fx would inline
        # them into bare function calls; kept as modules, the blocks keep hookable activations
        # (NASWOT counts activation patterns through forward hooks).
        if type(m).__module__.startswith(_TIMM_ACTIVATION_MODULES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _concrete_defaults(model: nn.Module) -> dict[str, Any]:
    """Defaults of every ``forward`` argument after the first, so they are not traced as inputs.

    timm ViTs, for instance, take ``forward(x, attn_mask=None, ...)``; left symbolic, such an argument
    becomes a placeholder that "crosses" every node of the graph and hides all cut points.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    concrete = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TraceError(f"forward() argument {p.name!r} has no default; only one input tensor is supported")
        concrete[p.name] = p.default
    return concrete


def _module_path(node: Node) -> str:
    """Dotted path of the innermost module a node was recorded in ('' = the root module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    qualname = list(stack.values())[-1][0]
    return qualname if isinstance(qualname, str) else ""


def trace_model(model: nn.Module, name: str = "model", tracer: SurgeryTracer | None = None) -> GraphModule:
    """Trace ``model`` in eval mode into a ``GraphModule`` sharing its parameters.

    Every node gets ``node.meta['module_path']``: the dotted path of the innermost module that
    produced it (``''`` for code in the root ``forward``).

    Args:
        model: the model; its train/eval mode is restored afterwards.
        name: model name used in error messages.
        tracer: a custom tracer; default :class:`SurgeryTracer`.

    Returns:
        The traced ``GraphModule`` (in eval mode).

    Raises:
        TraceError: when torch.fx cannot trace the model; the message is one line naming the model.
    """
    tracer = tracer or SurgeryTracer()
    was_training = model.training
    model.eval()
    try:
        graph = tracer.trace(model, concrete_args=_concrete_defaults(model) or None)
    except TraceError as exc:
        raise TraceError(f"{name}: {exc}") from exc
    except Exception as exc:  # any failure inside user/timm code during symbolic tracing
        raise TraceError(f"{name}: cannot be traced with torch.fx ({one_line(exc)})") from exc
    finally:
        model.train(was_training)
    gm = GraphModule(tracer.root, graph, model.__class__.__name__)
    gm.eval()
    for node in gm.graph.nodes:
        node.meta["module_path"] = _module_path(node)
    return gm


@dataclass(frozen=True)
class TensorShape:
    """Abstract value of a tensor in a probe: its shape only."""

    shape: tuple[int, ...]


def _abstract(value: Any) -> Any:
    """Replace tensors by their shapes, recursively through lists/tuples/dicts."""
    if isinstance(value, torch.Tensor):
        return TensorShape(tuple(int(s) for s in value.shape))
    if isinstance(value, torch.Size):
        return torch.Size(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_abstract(v) for v in value) if not hasattr(value, "_fields") else tuple(
            _abstract(v) for v in value)
    if isinstance(value, dict):
        return {k: _abstract(v) for k, v in value.items()}
    return value


def has_tensor(value: Any) -> bool:
    """Whether an abstract probe value holds a tensor anywhere."""
    if isinstance(value, TensorShape):
        return True
    if isinstance(value, (list, tuple)):
        return any(has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(has_tensor(v) for v in value.values())
    return False


@dataclass
class Probe:
    """One run of the graph: the abstract value of every node, and FLOPs per node when counted.

    Attributes:
        input_shape: shape of the input tensor, batch included.
        values: node name -> abstract value (:class:`TensorShape` for tensors).
        flops: node name -> counted FLOPs (empty when not counted).
        device: ``'meta'`` or the real device the probe ran on.
    """

    input_shape: tuple[int, ...]
    values: dict[str, Any]
    flops: dict[str, int]
    device: str


class _RecordingInterpreter(Interpreter):
    """Interpreter that records abstract values, and per-node FLOPs from an active counter."""

    def __init__(self, gm: GraphModule, counter=None):
        super().__init__(gm)
        self.values: dict[str, Any] = {}
        self.flops: dict[str, int] = {}
        self.counter = counter

    def run_node(self, n: Node) -> Any:
        before = self.counter.get_total_flops() if self.counter is not None else 0
        out = super().run_node(n)
        if self.counter is not None:
            self.flops[n.name] = self.counter.get_total_flops() - before
        self.values[n.name] = _abstract(out)
        return out


class _ProbeRunner(nn.Module):
    """Holds the graph as a submodule so ``functional_call`` can swap in meta parameters."""

    def __init__(self, gm: GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, x: torch.Tensor, counter=None) -> _RecordingInterpreter:
        interp = _RecordingInterpreter(self.gm, counter)
        interp.run(x)
        return interp


def _model_device(gm: nn.Module) -> torch.device:
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")


def run_probe(gm: GraphModule, input_shape: tuple[int, ...], count_flops: bool = False,
              on_meta: bool | None = None, dtype: torch.dtype = torch.float32) -> Probe:
    """Run the graph once on a random input of ``input_shape`` and record every node's abstract value.

    The run happens on the ``meta`` device (parameters and buffers swapped for meta stand-ins with
    ``torch.func.functional_call``; nothing is computed or allocated). If the graph fails on meta
    (an op without a meta kernel, a plain tensor attribute on another device), it runs for real on the
    model's device under ``torch.no_grad()``.

    Args:
        gm: traced graph.
        input_shape: input shape, batch included.
        count_flops: also record FLOPs per node (``FlopCounterMode``, see :mod:`surgery.count`).
        on_meta: ``True``: meta only; ``False``: real execution only; ``None``: meta, else real.
        dtype: input dtype.

    Returns:
        The :class:`Probe`.

    Raises:
        Exception: whatever the graph raises on this input (e.g. a resolution it does not accept).
    """
    from surgery.count import flop_counter, frozen_parameters  # local: keeps count free of tracing

    runner = _ProbeRunner(gm)
    device = _model_device(gm)
    meta_state = {
        name: torch.empty_like(t, device="meta")
        for name, t in list(runner.named_parameters(remove_duplicate=False))
        + list(runner.named_buffers(remove_duplicate=False))
    }

    def attempt(on_meta: bool) -> Probe:
        dev = torch.device("meta") if on_meta else device
        x = torch.randn(input_shape, dtype=dtype, device=dev)
        counter = flop_counter() if count_flops else None
        with frozen_parameters(gm), torch.no_grad():
            if counter is not None:
                counter.__enter__()
            try:
                if on_meta:
                    interp = torch.func.functional_call(runner, meta_state, (x, counter), strict=False)
                else:
                    interp = runner(x, counter)
            finally:
                if counter is not None:
                    counter.__exit__(None, None, None)
        return Probe(tuple(input_shape), interp.values, interp.flops, str(dev))

    if device.type == "meta" or on_meta is True:
        return attempt(True)
    if on_meta is False:
        return attempt(False)
    try:
        return attempt(True)
    except Exception:  # no meta kernel or mixed-device attribute: pay for a real run
        return attempt(False)
