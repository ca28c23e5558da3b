"""Parameter and MAC counting.

MACs are counted with torch's own ``torch.utils.flop_counter.FlopCounterMode`` (``research/ecosystem.md``
§4) and reported in the field's unit: 1 FLOP = 1 multiply-accumulate, as in timm's model cards and the
DeRy paper (ResNet-50 = 4.1 GMACs at 224). The counter reports 2 FLOPs per multiply-add, so MACs are
its total divided by two.

A count must not depend on the device it runs on: budgets are counted on the ``meta`` device, while the
figures shown after reassembly and in ``surgery evaluate`` come from CPU runs. The counter sees only the
aten ops that reach the dispatcher and counts an op without a formula as 0, so a fused kernel that a
device runs instead of the plain matmuls vanishes (``research/feasibility.md`` §4 measured the first
case). The meta device always runs the plain composite ops, so it is the reference, and each fused kernel
is handled one of two ways:

* Switched off while counting, where torch has a switch: the fast path of ``nn.MultiheadAttention``,
  ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` (``aten._native_multi_head_attention``,
  ``aten._transformer_encoder_layer_fwd``, and the encoder's nested-tensor path), taken in eval mode
  without grad on CPU and CUDA. It counted 0 for a ``TransformerEncoderLayer(512, 4, 512)`` on 64 tokens
  (right: 104,857,600 MACs) and 11.27 GMACs for torchvision's ``vit_b_16`` (right: 17.56).
  :func:`flop_counter` turns ``torch.backends.mha`` fastpath off while it is active and restores the
  previous setting on exit, exception or not, so these modules run the same ops as on meta. A switch
  rather than only a formula: with a padding mask the encoder's fast path packs the batch into nested
  tensors and would count only the unpadded tokens, not what was budgeted.
* Given a formula, where the kernel cannot be avoided, or only by slowing every count down:
  fused attention (CPU flash, MPS math, XPU/PrivateUse1 "overrideable", CUDA's varlen cuDNN kernel;
  torch itself knows CUDA's flash, efficient and cuDNN SDPA kernels); fused RNNs (``nn.LSTM`` on CPU
  runs oneDNN's ``aten.mkldnn_rnn_layer`` and vanished entirely; on GPUs LSTM/GRU/RNN run
  ``aten._cudnn_rnn``, ``aten.miopen_rnn`` or ``aten._lstm_mps``); ``aten._addmm_activation`` (addmm
  with a fused activation); the ops of modules converted with ``torch.utils.mkldnn.to_mkldnn``
  (``aten.mkldnn_convolution``, ``aten.mkldnn_linear``). The two transformer fast-path ops get
  formulas too, for where the switch has no effect (TorchScript always takes the fast path).

Formulas go on fused kernels only, never on the composites that call them, so whichever path runs is
counted exactly once, as the plain path's matmuls (biases excluded, as torch does for ``addmm``).
Backward kernels of the fused RNNs have no formula (this project counts forward passes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from math import prod

import torch
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
)

__all__ = ["count_macs", "count_params", "flop_counter", "frozen_parameters"]

_aten = torch.ops.aten


def _register(name: str, get_raw: bool = False):
    """Decorator: register a formula for ``aten.<name>`` if this torch has the op and no formula for it."""

    def decorate(formula):
        op = getattr(_aten, name, None)
        if op is not None and op not in flop_registry:  # idempotent; newer torch may know the op
            register_flop_formula(op, get_raw=get_raw)(formula)
        return formula

    return decorate


def _attention_flops(query_shape, key_shape, value_shape) -> int:
    """FLOPs of softmax(Q K^T) V: (..., L, E) x (..., S, E) -> scores, then x (..., S, Ev).

    The batch (and head) count is the query's, which also covers grouped-query attention (fewer key/value
    heads, broadcast): torch's math path expands them and multiplies per query head.
    """
    *batch, length, dim = query_shape
    source = key_shape[-2]
    return 2 * prod(batch) * length * source * (dim + value_shape[-1])


# --- fused attention kernels ------------------------------------------------------------------------
# CPU: F.scaled_dot_product_attention runs this one (timm's fused attention, vit_small: 4.24 instead of
# 4.6 GMACs without it); MPS and XPU/PrivateUse1 have their own. Backward as torch counts its CUDA ones.


@_register("_scaled_dot_product_flash_attention_for_cpu")
@_register("_scaled_dot_product_attention_math_for_mps")
@_register("_scaled_dot_product_fused_attention_overrideable")
def _fused_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


@_register("_cudnn_attention_forward", get_raw=True)
def _cudnn_attention_flop(query, key, value, attn_bias, cum_seq_q, cum_seq_k, *args, out_val=None, **kwargs) -> int:
    # CUDA's nested-tensor SDPA and torch.nn.attention.varlen call this directly (torch counts the
    # flash/efficient equivalents itself): packed (tokens, heads, dim) with sequence i at
    # cum_seq[i]:cum_seq[i + 1]. Paged key/value caches (seqused_k, block_table) are not modelled.
    if cum_seq_q is None:
        return _attention_flops(query.shape, key.shape, value.shape)
    heads, dim, value_dim = query.shape[-2], query.shape[-1], value.shape[-1]
    lengths = zip(cum_seq_q.diff().tolist(), cum_seq_k.diff().tolist(), strict=True)
    return sum(2 * heads * length * source * (dim + value_dim) for length, source in lengths)


@_register("_scaled_dot_product_flash_attention_for_cpu_backward")
@_register("_scaled_dot_product_fused_attention_overrideable_backward")
def _fused_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                              out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# --- transformer fast path --------------------------------------------------------------------------
# flop_counter() switches the fast path off, so these run only where the switch is ignored (TorchScript)
# or when called directly. They count what the plain path counts: the projections as linears, attention
# as two matmuls per sequence. Raw tensors, not shapes: the encoder's fast path passes nested tensors
# (a padded batch packed without its padding), which have no single shape; each sequence is counted at
# its own length, i.e. the work that path does.


def _sequences(t: torch.Tensor) -> list[tuple[int, int]]:
    """``(batch, length)`` groups of a (batch, length, dim) tensor, or one ``(1, length)`` per nested row."""
    if t.is_nested:
        return [(1, int(size[0])) for size in t._nested_tensor_size().tolist()]
    *batch, length, _ = t.shape
    return [(prod(batch), length)]


@_register("_native_multi_head_attention", get_raw=True)
def _native_mha_flop(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias,
                     *args, out_val=None, **kwargs) -> int:
    in_proj = qkv_weight.numel() // 3  # one of the q, k, v projections, each E x E
    total = 0
    for (batch, length), (_, source) in zip(_sequences(query), _sequences(key), strict=True):
        total += 2 * batch * (length * in_proj + 2 * source * in_proj + length * proj_weight.numel())
        total += 2 * batch * length * source * 2 * embed_dim
    return total


@_register("_transformer_encoder_layer_fwd", get_raw=True)
def _transformer_encoder_layer_flop(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                    use_gelu, norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2,
                                    norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2,
                                    *args, out_val=None, **kwargs) -> int:
    linears = qkv_weight.numel() + proj_weight.numel() + ffn_weight_1.numel() + ffn_weight_2.numel()
    return sum(2 * batch * (length * linears + length * length * 2 * embed_dim)
               for batch, length in _sequences(src))


# --- fused RNN kernels ------------------------------------------------------------------------------
# The plain path (meta, and CPU for GRU/RNN) multiplies every token by each layer's input weight and its
# recurrent weight (and projection, LSTM with proj_size): 2 x tokens x the size of every weight matrix.
# nn.LSTM on CPU runs oneDNN's kernel, one call per layer and direction; its weight2/weight3 are the
# biases (or same-shaped dummies without bias), so only weight0 and weight1 count. There is no switch for
# it but torch.backends.mkldnn, which would also take oneDNN away from every CPU convolution.


@_register("mkldnn_rnn_layer")
def _mkldnn_rnn_layer_flop(input_shape, weight_ih_shape, weight_hh_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * prod(input_shape[:-1]) * (prod(weight_ih_shape) + prod(weight_hh_shape))


def _rnn_weights_flop(input_shape, weight_shapes) -> int:
    """All layers at once: the weight list holds every matrix (2-D) and bias (1-D) of the module."""
    return 2 * prod(input_shape[:-1]) * sum(prod(w) for w in weight_shapes if len(w) == 2)


@_register("_cudnn_rnn")
@_register("miopen_rnn")
def _gpu_rnn_flop(input_shape, weight_shapes, *args, out_shape=None, **kwargs) -> int:
    # input is (seq, batch, in) or (batch, seq, in), or (sum(batch_sizes), in) when packed: tokens either way
    return _rnn_weights_flop(input_shape, weight_shapes)


@_register("_lstm_mps")
def _mps_lstm_flop(input_shape, hx_shapes, weight_shapes, *args, out_shape=None, **kwargs) -> int:
    return _rnn_weights_flop(input_shape, weight_shapes)


# --- other fused or layout-specific kernels ---------------------------------------------------------


@_register("_addmm_activation")
def _addmm_activation_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    m, k = a_shape
    return 2 * m * k * b_shape[1]


@_register("mkldnn_linear")
def _mkldnn_linear_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * prod(input_shape[:-1]) * prod(weight_shape)


@_register("mkldnn_convolution")
def _mkldnn_convolution_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(input_shape, weight_shape, out_shape)


class _DeviceIndependentCounter(FlopCounterMode):
    """``FlopCounterMode`` with the transformer fast path switched off while it is active (see module doc)."""

    _fastpath_before: bool | None = None

    def __enter__(self):
        self._fastpath_before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return super().__enter__()
        except BaseException:
            self._restore_fastpath()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._restore_fastpath()

    def _restore_fastpath(self) -> None:
        if self._fastpath_before is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath_before)
            self._fastpath_before = None


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that counts the same on every device (see the module docstring).

    Use it as a context manager (not reentrant, like ``FlopCounterMode``). While active, the
    ``torch.backends.mha`` fast path is off process-wide; the previous setting is restored on exit.
    """
    return _DeviceIndependentCounter(display=False)


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

    Works on any device, including ``meta`` (module and inputs both on meta: no compute, no memory), and
    gives the same count on each (fused kernels are counted as the plain ops they replace, or switched
    off; see the module docstring). The count scales with the batch size of ``inputs``; pass batch 1 for
    the per-image figure.

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
