"""Pooled features at every cut point of a model, in one forward pass per batch.

The traced graph of a model is rewritten so that its outputs are the pooled outputs of the chosen
cut points (everything after the last one is dropped by dead-code elimination): one forward pass
per batch records all of them, never one pass per block. DeRy's released code instead stored
about 59 GB of features before computing CKA (research/dery.md §2.1); here features stream.

Pooling (DESIGN.md, Features): maps by spatial mean, tokens by token mean. The treatment of
class/prefix tokens is an option: ``"exclude"`` (default: mean over patch tokens only, so a ViT's
representation compares like a CNN's spatial mean), ``"include"`` (mean over all tokens) or
``"cls"`` (the first token only).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn

from surgery.spec import TensorSpec

PREFIX_MODES = ("exclude", "include", "cls")


def pool_tensor(x: torch.Tensor, layout: str, prefix_tokens: int = 0, prefix: str = "exclude",
                channels: int = 0) -> torch.Tensor:
    """Pool one cut point's output to a (batch, features) matrix.

    Args:
        x: the tensor crossing the cut.
        layout: its :class:`~surgery.spec.TensorSpec` layout.
        prefix_tokens: class/register tokens in front of the patch tokens (``NLC``).
        prefix: treatment of the prefix tokens, one of :data:`PREFIX_MODES`.
        channels: the spec's ``channels``; for ``"other"`` tensors it names the feature dim (the last
            when ``x.shape[-1] == channels``, e.g. NesT's blockified ``(B, T, N, C)`` or Hiera's unrolled
            tokens), and every other non-batch dim is averaged. 0: unknown, average dims 2 and up.
    """
    if layout == "NCHW" and x.dim() == 4:
        return x.mean(dim=(2, 3))
    if layout == "NHWC" and x.dim() == 4:
        return x.mean(dim=(1, 2))
    if layout == "NLC" and x.dim() == 3:
        if prefix == "cls" and prefix_tokens > 0:
            return x[:, 0]
        if prefix == "exclude" and 0 < prefix_tokens < x.shape[1]:
            return x[:, prefix_tokens:].mean(dim=1)
        return x.mean(dim=1)
    if x.dim() == 2:
        return x
    if x.dim() > 2 and channels and x.shape[-1] == channels:  # channels last, positions in any order
        return x.flatten(1, -2).mean(dim=1)
    if x.dim() > 2:  # unknown layout, or channels first: average everything but the first non-batch axis
        return x.flatten(2).mean(dim=2)
    return x.reshape(x.shape[0], -1)


def pool_parts(batch_of: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
    """Pool a two-tensor cut (a spec with ``parts``: CrossViT's two token streams, TNT's pixel and patch
    tokens, NASNet's last two cell outputs): each tensor pooled on its own, features concatenated.

    Maps (4-d) by spatial mean (``NCHW``), tokens (3-d) by mean over all tokens, vectors as they are; a
    tensor whose first dim folds the batch with positions (TNT's ``(B * N, 16, C)`` pixel tokens) is
    averaged over all its positions, channels last. ``batch_of``: any tensor with the batch size (the
    model input).
    """
    b = batch_of.shape[0]
    feats = []
    for x in parts:
        if x.shape[0] != b:
            feats.append(x.reshape(b, -1, x.shape[-1]).mean(dim=1))
        elif x.dim() == 4:
            feats.append(x.mean(dim=(2, 3)))
        elif x.dim() == 3:
            feats.append(x.mean(dim=1))
        elif x.dim() == 2:
            feats.append(x)
        else:
            feats.append(x.reshape(b, -1) if x.dim() < 2 else x.flatten(2).mean(dim=2))
    return torch.cat(feats, dim=1)


fx.wrap("pool_tensor")
fx.wrap("pool_parts")


def feature_extractor(
    graph_module: fx.GraphModule,
    nodes: Sequence[str],
    specs: Sequence[TensorSpec],
    *,
    prefix: str = "exclude",
) -> fx.GraphModule:
    """A copy of ``graph_module`` whose output is the tuple of pooled outputs of ``nodes``.

    Parameters are shared with ``graph_module`` (no copy of weights); the part of the graph after the
    last requested node is removed, so the head is not computed.

    Args:
        graph_module: a traced model (e.g. ``Dissection.graph_module``).
        nodes: names of cut-point nodes, in any order.
        specs: the :class:`TensorSpec` of each node (for pooling); a spec with ``parts`` (two tensors
            cross) pools both with :func:`pool_parts`.
        prefix: treatment of class tokens, see :func:`pool_tensor`.
    """
    if prefix not in PREFIX_MODES:
        raise ValueError(f"prefix must be one of {PREFIX_MODES}, got {prefix!r}")
    graph = copy.deepcopy(graph_module.graph)
    by_name = {n.name: n for n in graph.nodes}
    missing = [n for n in nodes if n not in by_name]
    if missing:
        raise KeyError(f"nodes not in the graph: {missing[:5]}")
    output = next(n for n in graph.nodes if n.op == "output")
    first_input = next(n for n in graph.nodes if n.op == "placeholder")
    pooled = []
    for name, spec in zip(nodes, specs, strict=True):
        src = by_name[name]
        if spec.parts:  # two tensors cross: pool both (the cut node is the later one)
            with graph.inserting_after(src):
                pooled.append(graph.call_function(pool_parts, (first_input, *(by_name[p] for p in spec.parts))))
            continue
        # pool right after the cut point, so the full-size map can be freed as soon as the graph is done with it
        with graph.inserting_after(src):
            pooled.append(graph.call_function(pool_tensor, (src, spec.layout, spec.prefix_tokens, prefix,
                                                                spec.channels)))
    with graph.inserting_before(output):
        new_out = graph.output(tuple(pooled))
    graph.erase_node(output)
    del new_out
    gm = fx.GraphModule(graph_module, graph)
    gm.graph.eliminate_dead_code()  # drops the head and anything after the last requested node
    gm.recompile()
    gm.eval()
    return gm


@torch.inference_mode()
def extract_pooled(extractor: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Run the extractor on one batch; returns one float32 (batch, d_i) matrix per cut point."""
    outs = extractor(x)
    return [o.float() for o in outs]
