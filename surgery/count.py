"""Parameter and MAC counting.

MACs are counted with torch's own ``torch.utils.flop_counter.FlopCounterMode`` (``research/ecosystem.md``
§4) and reported in the field's unit: 1 FLOP = 1 multiply-accumulate, as in timm's model cards and the
DeRy paper (ResNet-50 = 4.1 GMACs at 224). The counter reports 2 FLOPs per multiply-add, so MACs are
its total divided by two.

One gap is filled here (measured in ``research/feasibility.md`` §4): on CPU tensors
``F.scaled_dot_product_attention`` dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which the counter does not know and counts as 0, so a ViT's attention matmuls vanish (vit_small: 4.24
instead of 4.6 GMACs). We register the standard SDPA formula (two batched matmuls) for that op and its
backward. Only the fused kernels carry a formula; the composite ``scaled_dot_product_attention`` does
not, so whichever path runs (fused CPU/CUDA kernel, or the math path of explicit ``bmm``s on the meta
device) is counted exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

__all__ = ["count_macs", "count_params", "flop_counter", "frozen_parameters"]

_aten = torch.ops.aten


def _register_cpu_sdpa_formulas() -> None:
    """Teach the counter the CPU fused attention kernels (idempotent; newer torch may know them)."""
    forward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if forward is not None and forward not in flop_registry:

        @register_flop_formula(forward)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    backward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if backward is not None and backward not in flop_registry:

        @register_flop_formula(backward)
        def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                    out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_sdpa_formulas()


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` with the CPU attention formulas registered."""
    return FlopCounterMode(display=False)


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter of ``module`` (restored on exit).

    Counting runs without autograd. ``torch.no_grad()`` is not enough: the counter's module tracker
    hooks every module input that requires grad, and a view of a parameter made under ``no_grad`` (timm's
    attention-pool ``latent.expand(B, -1, -1)``) requires grad but has no grad_fn, which makes it fail.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``module`` on ``inputs``.

    Works on any device, including ``meta`` (module and inputs both on meta: no compute, no memory).
    The count scales with the batch size of ``inputs``; pass batch 1 for the per-image figure.

    Args:
        module: the module to run (run as is: call ``.eval()`` first for inference figures).
        *inputs: positional inputs of ``module``.

    Returns:
        MACs as an exact integer (1 FLOP = 1 MAC, timm's convention).
    """
    counter = flop_counter()
    with frozen_parameters(module), torch.no_grad(), counter:
        module(*inputs)
    return counter.get_total_flops() // 2


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module``, each shared parameter counted once (meta tensors too)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():  # parameters() already skips duplicates; the id check is for clarity
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
