"""Tests of surgery.count: MACs match timm's published figures, attention is counted exactly once, and a
count does not depend on the device it runs on (CPU fused kernels / fast paths == the meta device)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from surgery.count import count_macs, count_params, flop_counter, frozen_parameters

torch.set_num_threads(2)

# timm model-card GMACs at 224x224 (1 FLOP = 1 MAC), as printed (strings keep their precision)
PUBLISHED_GMACS = [
    ("resnet50", "4.1"),
    ("swin_tiny_patch4_window7_224", "4.5"),
    ("vit_small_patch16_224", "4.6"),
    ("convnext_tiny", "4.5"),
    ("efficientnet_b0", "0.4"),  # we count 0.386: within the card's rounding, 3.5% under the rounded figure
    ("mobilenetv3_large_100", "0.22"),
]


def _meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False).eval()


@pytest.mark.parametrize(("name", "gmacs"), PUBLISHED_GMACS)
def test_macs_match_published(name, gmacs):
    model = _meta_model(name)
    macs = count_macs(model, torch.randn(1, 3, 224, 224, device="meta"))
    # within 2%, or within the rounding of the printed figure (half a unit of its last digit)
    half_unit = 0.5 * 10.0 ** -len(gmacs.split(".")[1])
    assert macs / 1e9 == pytest.approx(float(gmacs), rel=0.02, abs=half_unit)


def test_cpu_attention_counted_once():
    # on CPU tensors timm's fused attention runs aten._scaled_dot_product_flash_attention_for_cpu; on
    # meta it takes the math path (bmm). Both must give the same count: counted, and counted once.
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    cpu = count_macs(model, torch.randn(1, 3, 224, 224))
    meta = count_macs(_meta_model("vit_tiny_patch16_224"), torch.randn(1, 3, 224, 224, device="meta"))
    assert cpu == meta
    # and the unfused path (explicit q @ k^T) agrees too
    for block in model.blocks:
        block.attn.fused_attn = False
    assert count_macs(model, torch.randn(1, 3, 224, 224)) == cpu
    attention = 12 * 2 * 197 * 197 * 192  # depth x (QK^T + AV) x N^2 x dim
    assert cpu > attention


def test_macs_scale_with_batch_and_params():
    model = _meta_model("resnet18")
    one = count_macs(model, torch.randn(1, 3, 224, 224, device="meta"))
    assert count_macs(model, torch.randn(4, 3, 224, 224, device="meta")) == 4 * one
    assert count_params(model) == 11_689_512


def test_shared_parameters_counted_once():
    lin = torch.nn.Linear(8, 8)
    tied = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)
    assert count_params(tied) == 8 * 8 + 8


@pytest.mark.slow
def test_vit_huge_structure_only_memory():
    # a 632M-parameter model dissected on the meta device must not allocate its weights (2.5 GB)
    script = textwrap.dedent("""
        import resource, torch, timm
        from surgery.dissection import dissect
        torch.set_num_threads(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.device("meta"):
            model = timm.create_model("vit_huge_patch14_224", pretrained=False)
        d = dissect(model, (3, 224, 224), name="vit_huge_patch14_224")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(after - before, len(d.blocks), d.params, d.macs)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    delta_kib, blocks, params, macs = (int(v) for v in out.stdout.split())
    assert delta_kib < 2 * 1024 * 1024
    assert blocks == 32 + 2
    assert params == pytest.approx(632e6, rel=0.01)
    assert macs / 1e9 == pytest.approx(167.4, rel=0.02)


# --- the same count on every device -------------------------------------------------------------------
# Each case: a module factory, an input factory (device -> positional inputs), and the fused aten op that
# eager CPU runs for it in eval mode under no_grad (None: no fused kernel on CPU, checked for the count
# anyway). The op check keeps the CPU == meta test from passing vacuously should a torch upgrade drop
# the fast path.


def _self_attention(shape):
    def make(device):
        x = torch.randn(*shape, device=device)
        return x, x, x  # the same tensor three times: nn.MultiheadAttention's fast path needs `query is key`
    return make


def _padded(shape, lengths):
    def make(device):
        pad = torch.arange(shape[1]).expand(shape[0], -1) >= torch.tensor(lengths)[:, None]
        return torch.randn(*shape, device=device), None, pad.to(device)  # (src, mask, src_key_padding_mask)
    return make


def _inputs(*shapes):
    return lambda device: tuple(torch.randn(*s, device=device) for s in shapes)


TORCH_CASES = {
    "encoder_layer": (lambda: nn.TransformerEncoderLayer(512, 4, 512, batch_first=True), _inputs((1, 64, 512)),
                      "aten._transformer_encoder_layer_fwd"),
    "encoder_layer_norm_first_gelu": (
        lambda: nn.TransformerEncoderLayer(64, 4, 96, norm_first=True, activation="gelu", batch_first=True),
        _inputs((2, 10, 64)), "aten._transformer_encoder_layer_fwd"),
    "encoder_layer_seq_first": (lambda: nn.TransformerEncoderLayer(64, 4, 96), _inputs((10, 2, 64)),
                                "aten._scaled_dot_product_flash_attention_for_cpu"),  # no fast path
    # with a padding mask the encoder's fast path packs the batch into a nested tensor
    "encoder_padded_nested": (
        lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 96, batch_first=True), 2),
        _padded((2, 10, 64), [10, 6]), "aten._nested_tensor_from_mask"),
    "decoder_layer": (lambda: nn.TransformerDecoderLayer(64, 4, 96, batch_first=True),
                      _inputs((2, 10, 64), (2, 12, 64)), "aten._native_multi_head_attention"),
    "transformer": (lambda: nn.Transformer(64, 4, 2, 1, 96, batch_first=True),
                    _inputs((2, 10, 64), (2, 7, 64)), "aten._transformer_encoder_layer_fwd"),
    "mha_self": (lambda: nn.MultiheadAttention(64, 4, batch_first=True), _self_attention((2, 10, 64)),
                 "aten._native_multi_head_attention"),
    "mha_cross_kdim": (lambda: nn.MultiheadAttention(64, 4, kdim=32, vdim=48),
                       _inputs((10, 2, 64), (7, 2, 32), (7, 2, 48)), None),
    "lstm_2layer_bidirectional": (lambda: nn.LSTM(16, 32, num_layers=2, bidirectional=True, batch_first=True),
                                  _inputs((3, 7, 16)), "aten.mkldnn_rnn_layer"),
    "lstm_no_bias": (lambda: nn.LSTM(16, 32, bias=False), _inputs((7, 3, 16)), "aten.mkldnn_rnn_layer"),
    "lstm_proj": (lambda: nn.LSTM(16, 32, proj_size=8), _inputs((7, 3, 16)), None),
    "gru_bidirectional": (lambda: nn.GRU(16, 32, num_layers=2, bidirectional=True), _inputs((7, 3, 16)), None),
    "rnn_relu": (lambda: nn.RNN(16, 32, nonlinearity="relu"), _inputs((7, 3, 16)), None),
    "lstm_cell": (lambda: nn.LSTMCell(16, 32), _inputs((3, 16)), None),
}


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func._overloadpacket))
        return func(*args, **(kwargs or {}))


def _ops_run(module, inputs) -> set[str]:
    """The aten ops a plain (uncounted) forward pass dispatches."""
    log = _OpLog()
    with frozen_parameters(module), torch.no_grad(), log:
        module(*inputs)
    return log.ops


def _cpu_and_meta(make_module, make_inputs, train=False):
    torch.manual_seed(0)
    cpu_module = make_module().train(train)
    with torch.device("meta"):
        meta_module = make_module().train(train)
    return (cpu_module, make_inputs("cpu")), (meta_module, make_inputs("meta"))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_count_same_on_cpu_and_meta(case, train):
    make_module, make_inputs, fused_op = TORCH_CASES[case]
    (cpu_module, cpu_inputs), (meta_module, meta_inputs) = _cpu_and_meta(make_module, make_inputs, train)
    if fused_op is not None and not train:
        if fused_op == "aten.mkldnn_rnn_layer" and not torch.backends.mkldnn.is_available():
            pytest.skip("no oneDNN in this torch build")
        assert fused_op in _ops_run(cpu_module, cpu_inputs)  # the fast path really runs on CPU ...
    meta = count_macs(meta_module, *meta_inputs)
    assert meta > 0
    assert count_macs(cpu_module, *cpu_inputs) == meta  # ... and is counted as on meta


def test_transformer_encoder_layer_exact():
    # 64 tokens x (q, k, v, out projections + two 512x512 FFN linears) + QK^T and AV (64 x 64 x 512 each)
    expected = 64 * 6 * 512 * 512 + 2 * 64 * 64 * 512
    assert expected == 104_857_600
    (cpu_module, cpu_inputs), (meta_module, meta_inputs) = _cpu_and_meta(*TORCH_CASES["encoder_layer"][:2])
    assert count_macs(cpu_module.eval(), *cpu_inputs) == expected
    assert count_macs(meta_module.eval(), *meta_inputs) == expected


@pytest.mark.slow
def test_torchvision_vit_b_16_matches_docs():
    # torchvision's docs give 17.56 GFLOPS (its unit is our MACs); the weights' meta has 17.564
    models = pytest.importorskip("torchvision.models")
    vit_b_16, weights = models.vit_b_16, models.ViT_B_16_Weights.IMAGENET1K_V1

    (cpu_module, cpu_inputs), (meta_module, meta_inputs) = _cpu_and_meta(
        lambda: vit_b_16(weights=None).eval(), _inputs((1, 3, 224, 224)))
    assert "aten._native_multi_head_attention" in _ops_run(cpu_module, cpu_inputs)
    cpu = count_macs(cpu_module, *cpu_inputs)
    assert cpu == count_macs(meta_module, *meta_inputs)
    assert round(cpu / 1e9, 2) == 17.56
    assert cpu / 1e9 == pytest.approx(weights.meta["_ops"], abs=5e-4)


TIMM_CASES = [
    # timm's fused attention: F.scaled_dot_product_attention -> CPU flash kernel
    pytest.param("vit_tiny_patch16_224", {}, "aten._scaled_dot_product_flash_attention_for_cpu", id="vit_tiny"),
    # relative position bias passed to the fused attention as attn_mask
    pytest.param("beit_base_patch16_224", {"depth": 2}, None, id="beit_base_depth2"),
    # nn.LSTM inside a real model (oneDNN kernel on CPU); 8.4 GFLOPs in the Sequencer paper at full depth
    pytest.param("sequencer2d_s", {"layers": (1, 1, 1, 1)}, "aten.mkldnn_rnn_layer", id="sequencer2d_s_shallow",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "kwargs", "fused_op"), TIMM_CASES)
def test_timm_count_same_on_cpu_and_meta(name, kwargs, fused_op):
    (cpu_module, cpu_inputs), (meta_module, meta_inputs) = _cpu_and_meta(
        lambda: timm.create_model(name, pretrained=False, **kwargs).eval(), _inputs((1, 3, 224, 224)))
    if fused_op is not None:
        assert fused_op in _ops_run(cpu_module, cpu_inputs)
    assert count_macs(cpu_module, *cpu_inputs) == count_macs(meta_module, *meta_inputs)


# --- the fast-path switch -----------------------------------------------------------------------------


class _Probe(nn.Module):
    def __init__(self, fail=False):
        super().__init__()
        self.fail = fail
        self.seen = None

    def forward(self, x):
        self.seen = torch.backends.mha.get_fastpath_enabled()
        if self.fail:
            raise RuntimeError("boom")
        return x


@pytest.mark.parametrize("before", [True, False])
def test_fastpath_off_while_counting_and_restored(before):
    torch.backends.mha.set_fastpath_enabled(before)
    try:
        probe = _Probe()
        count_macs(probe, torch.randn(2))
        assert probe.seen is False
        assert torch.backends.mha.get_fastpath_enabled() is before
        with pytest.raises(RuntimeError, match="boom"):
            count_macs(_Probe(fail=True), torch.randn(2))
        assert torch.backends.mha.get_fastpath_enabled() is before
        # tracing.run_probe enters and leaves the counter by hand
        counter = flop_counter()
        counter.__enter__()
        try:
            assert torch.backends.mha.get_fastpath_enabled() is False
        finally:
            counter.__exit__(None, None, None)
        assert torch.backends.mha.get_fastpath_enabled() is before
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


# --- formulas for fused kernels that still run ---------------------------------------------------------


def _plain_count(fn, *args) -> tuple[int, set[str]]:
    """MACs under torch's own FlopCounterMode (fast path left on; our formulas are registered globally)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*args)
    return counter.get_total_flops() // 2, {str(op) for op in counter.get_flop_counts().get("Global", {})}


@pytest.mark.parametrize("case", ["encoder_layer_norm_first_gelu", "mha_self", "transformer"])
def test_transformer_fast_path_formulas(case):
    # where the switch has no effect (direct calls, TorchScript) the fused ops count as the plain path
    make_module, make_inputs, fused_op = TORCH_CASES[case]
    (cpu_module, cpu_inputs), _ = _cpu_and_meta(make_module, make_inputs)
    with frozen_parameters(cpu_module):
        macs, ops = _plain_count(cpu_module, *cpu_inputs)
    assert fused_op in ops
    assert macs == count_macs(cpu_module, *cpu_inputs)


def test_scripted_encoder_layer_counted():
    # TorchScript ignores torch.backends.mha and always takes the fast path: the formula counts it
    make_module, make_inputs, _ = TORCH_CASES["encoder_layer_norm_first_gelu"]
    (cpu_module, cpu_inputs), (meta_module, meta_inputs) = _cpu_and_meta(make_module, make_inputs)
    scripted = torch.jit.script(cpu_module)
    assert count_macs(scripted, *cpu_inputs) == count_macs(meta_module, *meta_inputs)


def test_nested_fast_path_formula_counts_each_sequence():
    # the encoder's nested path computes each sequence at its own length; the formula counts that work
    make_module, make_inputs, _ = TORCH_CASES["encoder_padded_nested"]
    (encoder, (x, _, pad)), _ = _cpu_and_meta(make_module, make_inputs)
    with frozen_parameters(encoder):
        macs, ops = _plain_count(encoder, x, None, pad)
    assert "aten._transformer_encoder_layer_fwd" in ops
    assert macs == count_macs(encoder, x[:1]) + count_macs(encoder, x[1:, :6])
    assert count_macs(encoder, x, None, pad) == 2 * count_macs(encoder, x[:1])  # counted: padded, as budgeted


RNN_KERNELS = {
    # op: how nn.RNNBase calls it, from (input, flat weights, hx)
    "_cudnn_rnn": lambda x, w: (x, w, 4, None, None, None, 0, 0, 0, 0, False, 0.0, False, False, [], None),
    "miopen_rnn": lambda x, w: (x, w, 4, None, None, 0, 0, 0, False, 0.0, False, False, [], None),
    "_lstm_mps": lambda x, w: (x, [], w, True, 0, 0.0, False, False, False),
}
RNN_MODULES = {
    "lstm_proj_bidirectional": lambda: nn.LSTM(16, 32, num_layers=2, bidirectional=True, proj_size=8),
    "gru_batch_first": lambda: nn.GRU(16, 32, num_layers=2, batch_first=True),
    "rnn_no_bias": lambda: nn.RNN(16, 32, bias=False),
}


@pytest.mark.parametrize("module", list(RNN_MODULES))
@pytest.mark.parametrize("kernel", list(RNN_KERNELS))
def test_gpu_rnn_formulas(kernel, module):
    # the GPU kernels cannot run here: check their formulas on the arguments nn.RNNBase passes them
    op = getattr(torch.ops.aten, kernel, None)
    if op is None:
        pytest.skip(f"aten.{kernel} not in this torch")
    assert op in flop_registry
    with torch.device("meta"):
        rnn = RNN_MODULES[module]()
        x = torch.randn(7, 3, 16)
    assert flop_registry[op](*RNN_KERNELS[kernel](x, rnn._flat_weights)) // 2 == count_macs(rnn, x)
    # packed input: (sum of batch sizes, features)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(7, 3, 16), torch.tensor([7, 5, 2]))
    cpu_rnn = RNN_MODULES[module]()
    assert (flop_registry[op](*RNN_KERNELS[kernel](packed.data, cpu_rnn._flat_weights)) // 2
            == count_macs(cpu_rnn, packed))


ATTENTION_KERNELS = ["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math_for_mps",
                     "_scaled_dot_product_fused_attention_overrideable"]


@pytest.mark.parametrize("kernel", ATTENTION_KERNELS)
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_fused_attention_formulas(kernel, kv_heads):
    op = getattr(torch.ops.aten, kernel, None)
    if op is None:
        pytest.skip(f"aten.{kernel} not in this torch")
    assert op in flop_registry
    with torch.device("meta"):
        q, k, v = torch.randn(2, 4, 10, 32), torch.randn(2, kv_heads, 12, 32), torch.randn(2, kv_heads, 12, 48)
    meta, ops = _plain_count(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    assert ops == {"aten.bmm"}  # the math path
    assert meta == 2 * 4 * 10 * 12 * (32 + 48)
    assert flop_registry[op](q, k, v, out_val=None) // 2 == meta


def test_varlen_cudnn_attention_formula():
    # CUDA-only kernel, called with packed sequences: each sequence counts as its own attention
    op = getattr(torch.ops.aten, "_cudnn_attention_forward", None)
    if op is None:
        pytest.skip("aten._cudnn_attention_forward not in this torch")
    assert op in flop_registry
    q, k, v = torch.randn(8, 4, 32), torch.randn(11, 2, 32), torch.randn(11, 2, 48)  # (tokens, heads, dim)
    cum_q, cum_k = torch.tensor([0, 5, 8]), torch.tensor([0, 7, 11])  # sequences of 5 and 3 / 7 and 4 tokens

    def one_sequence(length, source):
        q1, k1, v1 = torch.randn(1, 4, length, 32), torch.randn(1, 2, source, 32), torch.randn(1, 2, source, 48)
        return _plain_count(lambda: F.scaled_dot_product_attention(q1, k1, v1, enable_gqa=True))[0]

    expected = one_sequence(5, 7) + one_sequence(3, 4)
    assert flop_registry[op](q, k, v, None, cum_q, cum_k, 5, 7, False, out_val=None) // 2 == expected


def test_addmm_activation_counted_as_addmm():
    bias, a, b = torch.randn(16), torch.randn(4, 8), torch.randn(8, 16)
    macs, ops = _plain_count(torch._addmm_activation, bias, a, b)
    assert ops == {"aten._addmm_activation"}
    assert macs == _plain_count(torch.addmm, bias, a, b)[0] == 4 * 8 * 16


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_to_mkldnn_model_counted():
    from torch.utils import mkldnn

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    dense = count_macs(model, x)
    assert dense == 8 * 3 * 9 * 36 + 288 * 10
    assert count_macs(mkldnn.to_mkldnn(model), x.to_mkldnn()) == dense  # converts in place
