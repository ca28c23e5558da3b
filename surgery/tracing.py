"""Symbolic tracing of models with torch.fx, and shape probes over the traced graph.

The tracer follows timm's own recipe (``timm/layers/_fx.py`` and timm's ``test_model_forward_fx``): treat
the modules timm registers as "no-trace" as leaves, auto-wrap the functions it registers (window
partitioning, position-embedding resampling, ...), and keep parameter shapes constant. With those
registries timm's tracer handles every model of our 50-model sample where plain ``symbolic_trace``
fails on six (``research/feasibility.md`` §3). The tracer is written here rather than borrowed from
``torchvision.models.feature_extraction`` because we need the whole graph, one trace in eval mode,
and the module path of every node (``node.meta['module_path']``) for block granularity.

Train mode. The graph is traced once, in eval mode, so any code that branches on ``self.training`` is
resolved at trace time: stochastic depth (timm ``DropPath``, torchvision ``StochasticDepth``) and
attention dropout (``dropout_p=... if self.training else 0.``) would vanish from the graph, and a model's
blocks in ``train()`` would silently run without the regularisation the user configured. Two rules keep
the graph mode-following (issue 9): every non-root module whose own code reads ``self.training`` stays a
leaf (the real module runs and follows ``train()``/``eval()``), see :func:`reads_training`; and a
dropout-family call in code that cannot be a leaf (the root's ``forward_head``: ``F.dropout(x, p,
training=self.training)``) is rewritten into a ``call_module`` of the matching ``torch.nn`` dropout module,
see :func:`follow_mode`. Not handled: other functional forms written directly in the root's own code
(``F.batch_norm(training=...)``, ``F.scaled_dot_product_attention(dropout_p=...)``), which no model of our
sample has; their eval-mode value stays baked in.

A *probe* runs the traced graph once on a given input and records, for every node, an abstract value:
the shape of each tensor it produced and the plain Python value of everything else (ints, sizes, ...).
Probes run on the ``meta`` device whenever the graph allows it, so probing costs no compute and no
memory even for huge models; they fall back to real execution on the model's own device.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Interpreter, Node, Tracer

from surgery.errors import TraceError

__all__ = ["SurgeryTracer", "trace_model", "TensorShape", "Probe", "run_probe", "has_tensor", "one_line",
           "reads_training", "follow_mode", "modes_kept", "adopt_mode"]


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

# methods whose reads of self.training never reach forward: construction, the mode switch itself, and
# text for printing
_NOT_FORWARD = frozenset({"__init__", "train", "eval", "extra_repr", "__repr__", "__setstate__"})
_READS_TRAINING: dict[type, bool] = {}


def _reads_training_source(klass: type) -> bool:
    """Whether the methods defined in ``klass`` itself read ``self.training`` (see :func:`reads_training`)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):  # built-in or generated class: no source to read
        return False
    cls_def = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if cls_def is None:
        return False
    for method in cls_def.body:
        if not isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) or method.name in _NOT_FORWARD:
            continue
        passed_on = set()  # `child.train(self.training)` (timm's reset_classifier) only copies the flag
        for n in ast.walk(method):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "train":
                passed_on.update(id(a) for a in n.args)
        for n in ast.walk(method):
            if (isinstance(n, ast.Attribute) and n.attr == "training" and isinstance(n.value, ast.Name)
                    and n.value.id == "self" and id(n) not in passed_on):
                return True
    return False


def reads_training(cls: type[nn.Module]) -> bool:
    """Whether a module class's behaviour depends on ``self.training`` (its own code or a base class's).

    Reads the source of every class in the MRO except ``nn.Module`` and ``object`` (``inspect.getsource``,
    parsed with ``ast``; cached per class) and looks for ``self.training`` in any method but ``__init__``,
    ``train``/``eval`` and ``extra_repr``; ``child.train(self.training)`` does not count. Catches timm's
    ``DropPath``, ``PatchDropout`` and attention modules (``dropout_p=p if self.training else 0.``),
    torchvision's ``StochasticDepth`` and ``ShiftedWindowAttention``, and ``_BatchNorm`` subclasses defined
    outside ``torch.nn``. A class without readable source counts as not reading it.
    """
    if cls not in _READS_TRAINING:
        _READS_TRAINING[cls] = any(_reads_training_source(k) for k in cls.__mro__
                                   if k is not nn.Module and k is not object)
    return _READS_TRAINING[cls]


class SurgeryTracer(Tracer):
    """``torch.fx.Tracer`` with timm's leaf modules and auto-wrapped functions.

    Besides timm's registry and timm's activation modules, every module whose code reads ``self.training``
    (:func:`reads_training`) is a leaf, so that the graph follows ``train()``/``eval()`` like the model.

    Args:
        leaf_modules: extra module classes to keep as single ``call_module`` nodes.
        autowrap_functions: extra free functions to record as single ``call_function`` nodes.
        mode_leaves: keep modules that read ``self.training`` as leaves (default ``True``; ``False`` gives
            the old eval-only graph, which drops stochastic depth and attention dropout in train mode).
    """

    def __init__(self, leaf_modules: Iterable[type[nn.Module]] = (), autowrap_functions: Iterable[Callable] = (),
                 mode_leaves: bool = True):
        timm_leaves, timm_functions = _timm_registries()
        super().__init__(
            autowrap_functions=tuple(timm_functions) + tuple(autowrap_functions),
            param_shapes_constant=True,
        )
        self.leaf_types = tuple(timm_leaves) + tuple(leaf_modules)
        self.mode_leaves = mode_leaves
        self.mode_leaf_names: set[str] = set()  # qualified names kept as leaves by the self.training rule

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        # timm's activation modules (GELU, Swish, ...) live outside torch.nn, so fx would inline
        # them into bare function calls; kept as modules, the blocks keep hookable activations
        # (NASWOT counts activation patterns through forward hooks).
        if type(m).__module__.startswith(_TIMM_ACTIVATION_MODULES):
            return True
        if super().is_leaf_module(m, module_qualified_name):
            return True
        # traced in eval mode, code reading self.training would be frozen in its eval branch
        if self.mode_leaves and reads_training(type(m)):
            self.mode_leaf_names.add(module_qualified_name)
            return True
        return False


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


# Dropout-family functions -> (mode-following module, names of the positional arguments). The module's
# forward calls the same kernel with the same arguments, so it draws the same random numbers.
_F_ARGS = ("input", "p", "training", "inplace")
_T_ARGS = ("input", "p", "train")
_DROPOUTS: dict[Callable, tuple[type[nn.Module], tuple[str, ...]]] = {
    F.dropout: (nn.Dropout, _F_ARGS), F.dropout1d: (nn.Dropout1d, _F_ARGS), F.dropout2d: (nn.Dropout2d, _F_ARGS),
    F.dropout3d: (nn.Dropout3d, _F_ARGS), F.alpha_dropout: (nn.AlphaDropout, _F_ARGS),
    F.feature_alpha_dropout: (nn.FeatureAlphaDropout, _F_ARGS),
    torch.dropout: (nn.Dropout, _T_ARGS), torch.alpha_dropout: (nn.AlphaDropout, _T_ARGS),
    torch.feature_alpha_dropout: (nn.FeatureAlphaDropout, _T_ARGS),
}
_DEFAULTS = {"p": 0.5, "training": True, "inplace": False}


def follow_mode(gm: GraphModule) -> list[str]:
    """Rewrite dropout calls frozen in their eval branch into mode-following ``call_module`` nodes, in place.

    A call such as ``F.dropout(x, p=0.5, training=False)`` (or ``dropout1d/2d/3d``, ``alpha_dropout``,
    ``feature_alpha_dropout``, ``torch.dropout``, ...) with a constant ``p > 0`` and ``training`` False is
    what ``F.dropout(x, p, training=self.training)`` in code that could not be a leaf (the root's
    ``forward_head``) becomes when traced in eval mode. Each one becomes a call of the matching ``torch.nn``
    module (``nn.Dropout(p)``, ...) registered on ``gm`` as ``surgery_dropout<i>``, which follows the
    ``train()``/``eval()`` mode of whatever module holds it. Node names and ``meta`` are kept, so cut points
    found before and after the rewrite have the same names.

    A dropout written with a literal ``training=False`` becomes active in train mode too: after an eval-mode
    trace the two cannot be told apart.

    Args:
        gm: a traced graph; modified and recompiled.

    Returns:
        Names of the rewritten nodes.
    """
    rewritten = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _DROPOUTS:
            continue
        module_cls, names = _DROPOUTS[node.target]
        bound = {**_DEFAULTS, **dict(zip(names, node.args, strict=False)), **node.kwargs}
        training = bound.get("train") if "train" in names else bound["training"]
        p = bound["p"]
        if (training is not False or isinstance(p, Node) or not isinstance(bound["input"], Node)
                or isinstance(bound["inplace"], Node) or not 0 < float(p) <= 1):
            continue
        i = len(rewritten)
        while hasattr(gm, f"surgery_dropout{i}"):
            i += 1
        target = f"surgery_dropout{i}"
        gm.add_submodule(target, module_cls(float(p), inplace=bool(bound["inplace"])))
        node.op, node.target, node.args, node.kwargs = "call_module", target, (bound["input"],), {}
        rewritten.append(node.name)
    if rewritten:
        gm.recompile()
    return rewritten


@contextlib.contextmanager
def modes_kept(*modules: nn.Module) -> Iterator[None]:
    """Restore the ``training`` flag of every submodule of ``modules`` on exit (switch modes freely inside)."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def adopt_mode(module: nn.Module, mode: bool, shared: nn.Module) -> None:
    """Set ``training = mode`` on the submodules of ``module`` that are not submodules of ``shared``.

    A ``GraphModule`` built from ``shared`` holds ``shared``'s own modules (their mode is left alone: a block
    never flips its source model's dropout or batch norm) and fresh ones (itself, the empty path holders
    fx creates, the dropouts of :func:`follow_mode`), which take ``mode``.
    """
    own = {id(m) for m in shared.modules()}
    for m in module.modules():
        if id(m) not in own:
            m.training = mode


def trace_model(model: nn.Module, name: str = "model", tracer: SurgeryTracer | None = None) -> GraphModule:
    """Trace ``model`` into a ``GraphModule`` sharing its parameters and modules, following train/eval.

    The trace runs with the model in eval mode; modules whose code reads ``self.training`` stay leaves and
    root-level dropout calls are rewritten (:func:`follow_mode`), so the graph in ``train()`` behaves like
    the model in ``train()``. Every node gets ``node.meta['module_path']``: the dotted path of the innermost
    module that produced it (``''`` for code in the root ``forward``); ``node.meta['mode_leaf']`` marks the
    ``call_module`` nodes of modules kept as leaves only because they read ``self.training``.

    Args:
        model: the model; the train/eval flag of each of its modules is left as it was.
        name: model name used in error messages.
        tracer: a custom tracer; default :class:`SurgeryTracer`.

    Returns:
        The traced ``GraphModule``, in the model's mode (its leaves are the model's own modules: switching
        the graph's mode switches theirs).

    Raises:
        TraceError: when torch.fx cannot trace the model; the message is one line naming the model.
    """
    tracer = tracer or SurgeryTracer()
    mode_leaf_names = getattr(tracer, "mode_leaf_names", set())
    mode_leaf_names.clear()  # a tracer may be reused across models
    with modes_kept(model):
        model.eval()
        try:
            graph = tracer.trace(model, concrete_args=_concrete_defaults(model) or None)
        except TraceError as exc:
            raise TraceError(f"{name}: {exc}") from exc
        except Exception as exc:  # any failure inside user/timm code during symbolic tracing
            raise TraceError(f"{name}: cannot be traced with torch.fx ({one_line(exc)})") from exc
    gm = GraphModule(tracer.root, graph, model.__class__.__name__)
    for node in gm.graph.nodes:
        node.meta["module_path"] = _module_path(node)
        node.meta["mode_leaf"] = node.op == "call_module" and node.target in mode_leaf_names
    follow_mode(gm)
    adopt_mode(gm, model.training, model)
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

    The graph runs in eval mode (batch norm uses its running statistics and updates nothing, dropout is
    off); every module's mode is restored afterwards.

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
        with frozen_parameters(gm), torch.no_grad(), modes_kept(gm):
            gm.eval()
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
