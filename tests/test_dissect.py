"""Tests of surgery.dissect (surgery/dissection.py): blocks reproduce their model, counts add up, granularities behave.

Fast tests run over all of timm's tiny ``test_*`` models; ``slow`` ones over ~45 real architectures
(random init, default input size). Every model is built and dissected once per module (cached).
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from surgery.count import count_macs, count_params
from surgery.dissection import dissect
from surgery.errors import SurgeryError, TraceError

torch.set_num_threads(2)

TEST_MODELS = timm.list_models("test_*")
VIT_LIKE = [n for n in TEST_MODELS if n.startswith("test_vit")]
# models whose graph accepts a second input resolution (checked: dissection.resizable)
RESIZABLE = ["test_resnet", "test_byobnet", "test_convnext", "test_efficientnet", "test_nfnet"]

_CACHE: dict[tuple[str, str], tuple[nn.Module, object]] = {}


def _input_size(model: nn.Module) -> tuple[int, ...]:
    return tuple(model.pretrained_cfg["input_size"])


def get(name: str, granularity: str = "block"):
    """Model and dissection, built once per (name, granularity); the model itself once per name."""
    key = (name, granularity)
    if key not in _CACHE:
        model = next((m for (n, _), (m, _) in _CACHE.items() if n == name), None)
        if model is None:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval()
        _CACHE[key] = (model, dissect(model, _input_size(model), name=name, granularity=granularity))
    return _CACHE[key]


def _assert_chain(model: nn.Module, d, batch: int = 3, size: tuple[int, ...] | None = None, blocks=None):
    size = size or d.input_size
    x = torch.randn(batch, *size)
    with torch.no_grad():
        expected = model(x)
        got = d.run_blocks(x, blocks)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_blocks_reproduce_model_other_batch(name):
    model, d = get(name)
    assert len(d.blocks) >= 2
    _assert_chain(model, d, batch=3)  # probes ran at batch 1 and 2


@pytest.mark.parametrize("name", TEST_MODELS)
def test_node_granularity_reproduces_model(name):
    model, d_node = get(name, "node")
    _, d_block = get(name)
    assert len(d_node.blocks) >= len(d_block.blocks)
    assert set(d_block.boundaries) <= {c.name for c in d_node.cut_points}
    _assert_chain(model, d_node, batch=3)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_block_params_and_macs_add_up(name):
    model, d = get(name)
    assert sum(b.params for b in d.block_info) == d.params == sum(p.numel() for p in model.parameters())
    assert sum(b.macs for b in d.block_info) == d.macs
    # independent count: each block run on its own input, and the model in one go
    x = torch.randn(1, *d.input_size)
    per_block = []
    with torch.no_grad():
        for block in d.blocks:
            per_block.append(count_macs(block, x))
            x = block(x)
    model_macs = count_macs(model, torch.randn(1, *d.input_size))
    assert sum(per_block) == pytest.approx(model_macs, rel=0.01)
    assert d.macs == pytest.approx(model_macs, rel=0.01)
    for info, macs in zip(d.block_info, per_block, strict=True):
        assert info.macs == pytest.approx(macs, rel=0.01, abs=1000)


@pytest.mark.parametrize("name", VIT_LIKE)
def test_vit_cut_per_transformer_block(name):
    model, d = get(name)
    depth = len(model.blocks)
    assert len(d.blocks) == depth + 2  # stem (patch embedding) + one per block + norm/pool/head
    middle = d.block_info[1:-1]
    assert all(b.in_spec.layout == "NLC" and b.out_spec.layout == "NLC" for b in middle)
    assert all(b.out_spec.channels == model.embed_dim for b in middle)
    assert all(b.out_spec.prefix_tokens == model.num_prefix_tokens for b in middle)


@pytest.mark.parametrize("name", RESIZABLE)
def test_other_resolution(name):
    model, d = get(name)
    assert d.resizable
    c, h, w = d.input_size
    _assert_chain(model, d, batch=2, size=(c, h + 32, w + 64))


def test_stage_granularity_and_specs():
    model, d = get("test_resnet", "stage")
    _, d_block = get("test_resnet")
    assert 3 <= len(d.blocks) <= len(d_block.blocks)
    specs = [b.out_spec for b in d.block_info]
    assert [s.layout for s in specs[:-1]] == ["NCHW"] * (len(specs) - 1)
    assert specs[-1].layout == "NC" and specs[-1].channels == 1000
    strides = [s.stride for s in specs[:-1]]
    assert strides == sorted(strides) and strides[-1] == 32
    _assert_chain(model, d)


def test_min_macs_fraction_merges_small_blocks():
    model, _ = get("test_vit")
    d = dissect(model, _input_size(model), name="test_vit", min_macs_fraction=0.2)
    assert all(b.macs >= 0.2 * d.macs for b in d.block_info) or len(d.blocks) == 1
    assert sum(b.macs for b in d.block_info) == d.macs
    _assert_chain(model, d)


def test_split_any_subset_and_to_dict():
    model, d = get("test_convnext", "node")
    names = [c.name for c in d.cut_points]
    subset = names[1::3]
    blocks = d.split(list(reversed(subset)))  # order does not matter
    assert len(blocks) == len(subset) + 1
    _assert_chain(model, d, blocks=blocks)
    assert d.split([])[0] is not None
    with pytest.raises(SurgeryError):
        d.split(["no_such_node"])
    data = json.loads(json.dumps(d.to_dict()))
    assert data["name"] == "test_convnext" and data["granularity"] == "node"
    assert len(data["cut_points"]) == len(d.cut_points) and len(data["blocks"]) == len(d.blocks)
    assert [b["index"] for b in data["blocks"]] == list(range(len(d.blocks)))
    depths = [c["depth"] for c in data["cut_points"]]
    assert depths == sorted(depths) and 0 < depths[0] and depths[-1] < 1
    macs = [c["macs"] for c in data["cut_points"]]
    assert macs == sorted(macs) and macs[-1] <= d.macs


def test_meta_model_structure_only():
    with torch.device("meta"):
        model = timm.create_model("test_vit", pretrained=False).eval()
    d = dissect(model, _input_size(model), name="test_vit", verify=True)  # verify is skipped on meta
    _, d_cpu = get("test_vit")
    assert d.macs == d_cpu.macs and d.params == d_cpu.params
    assert d.boundaries == d_cpu.boundaries
    assert [b.to_dict() for b in d.block_info] == [b.to_dict() for b in d_cpu.block_info]


def test_verify_passes():
    model, _ = get("test_efficientnet")
    dissect(model, _input_size(model), name="test_efficientnet", verify=True)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a traced value: torch.fx cannot trace this
            return self.a(x)
        return self.b(x)


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)  # no single-tensor cut before the output


def test_errors_are_one_line_trace_errors():
    with pytest.raises(TraceError, match="untraceable_net") as info:
        dissect(_DataDependent(), (4,), name="untraceable_net")
    assert "\n" not in str(info.value)
    with pytest.raises(TraceError, match="two_branches.*cut point"):
        dissect(_TwoBranches(), (4,), name="two_branches")
    with pytest.raises(SurgeryError):
        dissect(_TwoBranches(), (4,), granularity="layer")


class _TableBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, table):
        return x + self.fc2(torch.relu(self.fc1(x * table)))


class _SharedTable(nn.Module):
    """A toy RoPE: a table built once from a buffer and the token grid, handed to every block."""

    def __init__(self, dim: int = 8, depth: int = 4):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.register_buffer("freqs", torch.linspace(0.1, 1.0, dim))
        self.blocks = nn.ModuleList(_TableBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        _, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        positions = torch.arange(h * w, device=x.device, dtype=x.dtype)
        table = torch.sin(positions[:, None] * self.freqs[None, :])  # (h*w, c): no input values in it
        for block in self.blocks:
            x = block(x, table)
        return self.head(x.mean(1))


def test_table_built_from_parameters_and_shapes_is_recomputed_per_block():
    torch.manual_seed(0)
    model = _SharedTable().eval()
    d = dissect(model, (3, 16, 16), name="shared_table", verify=True)
    # without recomputation the table crosses every block: only the stem/head cuts would exist
    assert len(d.blocks) >= 5
    _assert_chain(model, d, batch=2)
    # the table depends on the grid, rebuilt from each block's input size: other resolutions chain too
    assert d.resizable
    x = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(d.run_blocks(x), model(x), rtol=0, atol=0)


# --- flat sequences of layers (VGG-like bodies) ---------------------------------------------------

def _flat_cnn() -> nn.Sequential:
    """A plain CNN written as one flat ``nn.Sequential`` of layers: every node is a cut, one run."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _stage_grids(d) -> list:
    return [b.out_spec.grid for b in d.block_info if b.out_spec.layout != "NC"]


@pytest.mark.parametrize("granularity", ["block", "node"])
def test_vgg_flat_body_is_cut_per_stage(granularity):
    torch.manual_seed(0)
    model = timm.create_model("vgg11", pretrained=False).eval()
    old = dissect(model, (3, 64, 64), name="vgg11", granularity=granularity, flat_stages=False)
    assert len(old.blocks) < 4  # the whole body is one run of single-tensor cuts: one block
    d = dissect(model, (3, 64, 64), name="vgg11", granularity=granularity, verify=True)
    assert len(d.blocks) >= 4
    assert set(old.boundaries) <= set(d.boundaries)
    # one block per conv stage: each ends before its max-pool, so every stage block keeps one grid
    stages = [b for b in d.block_info if b.start is None or b.start.startswith("features")]
    stages = [b for b in stages if b.end is not None and b.end.startswith("features")]
    assert len(stages) == 5
    assert all(b.macs > 0 for b in d.block_info)
    _assert_chain(model, d, batch=2)


def test_flat_sequential_cnn_is_cut_where_the_grid_changes():
    torch.manual_seed(0)
    model = _flat_cnn().eval()
    with pytest.raises(TraceError, match="flat_cnn"):  # one run, one candidate: cannot be cut at all
        dissect(model, (3, 32, 32), name="flat_cnn", flat_stages=False)
    d = dissect(model, (3, 32, 32), name="flat_cnn", verify=True)
    assert len(d.blocks) >= 4
    assert all(b.macs > 0 for b in d.block_info)  # no block is a lone pooling layer
    grids = [b.out_spec.grid for b in d.block_info[:-1]]
    assert grids == sorted(set(grids), reverse=True)  # each block ends where the grid is about to shrink
    assert {b.name for b in d.cut_points} >= set(d.boundaries)
    _assert_chain(model, d, batch=2)
    _assert_chain(model, dissect(model, (3, 32, 32), name="flat_cnn", granularity="node"), batch=2)


_SMALL_CONFIGS = [
    ("resnet18", {}, (3, 64, 64)),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4}, (3, 32, 32)),
    ("convnext_atto", {"dims": [16, 32, 64, 128], "depths": [1, 1, 2, 1]}, (3, 64, 64)),
]


@pytest.mark.parametrize(("name", "kwargs", "size"), _SMALL_CONFIGS, ids=[n for n, _, _ in _SMALL_CONFIGS])
def test_flat_stage_rule_leaves_block_models_unchanged(name, kwargs, size):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    for granularity in ("block", "node", "stage"):
        d = dissect(model, size, name=name, granularity=granularity)
        old = dissect(model, size, name=name, granularity=granularity, flat_stages=False)
        assert d.boundaries == old.boundaries
        assert [c.name for c in d.cut_points] == [c.name for c in old.cut_points]
    d = dissect(model, size, name=name)
    if name == "resnet18":  # one boundary per residual block, plus stem and head
        ends = [b for b in d.boundaries if b.startswith("layer")]
        assert len(ends) == sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))


# --- two-stream models: two tensors cross between blocks (CrossViT, TNT, NASNet) ------------------

@pytest.mark.parametrize("name", TEST_MODELS)
def test_pair_fallback_not_reached_for_block_models(name):
    _, d = get(name)  # models with >= 4 blocks (or no pair cut) keep their single-tensor boundaries
    assert not any(c.spec.parts for c in d.cut_points)
    assert all(not b.in_spec.parts and not b.out_spec.parts for b in d.block_info)


class _Cell(nn.Module):
    """A NAS-style cell: takes the previous two cells' outputs."""

    def __init__(self, c: int):
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.bn, self.drop = nn.BatchNorm2d(c), nn.Dropout(0.3)

    def forward(self, x, x_prev):
        return self.drop(self.bn(torch.relu(self.conv_a(x)) + self.conv_b(x_prev)))


class _NasToy(nn.Module):
    def __init__(self, c: int = 8, cells: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.stem_cell = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        for i in range(cells):
            self.add_module(f"cell_{i}", _Cell(c))
        self.cells = cells
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        pp = self.stem(x)
        p = self.stem_cell(pp)
        for i in range(self.cells):
            p, pp = getattr(self, f"cell_{i}")(p, pp), p
        return self.head(torch.relu(p).mean((2, 3)))


def _assert_pair_blocks(d, min_blocks: int = 4):
    assert len(d.blocks) >= min_blocks
    assert any(b.out_spec.parts for b in d.block_info)
    for b in d.block_info:
        for spec in (b.in_spec, b.out_spec):
            if spec.parts:
                assert len(spec.parts) == 2 and spec.tensors == 2 and spec.layout == "other"
                assert not spec.known and not spec.problems()
                assert type(spec).from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert sum(b.params for b in d.block_info) == d.params
    assert sum(b.macs for b in d.block_info) == d.macs


def test_nas_cells_taking_two_inputs_are_cut_per_cell():
    torch.manual_seed(0)
    model = _NasToy().eval()
    d = dissect(model, (3, 16, 16), name="nas_toy", verify=True)
    _assert_pair_blocks(d, 5)
    ends = [b.end for b in d.block_info]
    # a two-tensor block interface is a tuple (prev, prev_prev), chained by run_blocks unchanged
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        mid = d.blocks[1](d.blocks[0](x))
    assert isinstance(mid, tuple) and len(mid) == 2
    assert ends[-1] is None
    _assert_chain(model, d, batch=2)
    assert d.resizable  # every crossing shape recomputed from the tensors: other resolutions chain too
    _assert_chain(model, d, batch=2, size=(3, 24, 32))
    assert len(dissect(model, (3, 16, 16), name="nas_toy", pair_cuts=False).blocks) < 4  # the fallback cuts it
    _assert_chain(model, dissect(model, (3, 16, 16), name="nas_toy", granularity="node"), batch=2)


def test_nas_cells_in_train_mode():
    torch.manual_seed(0)
    model = _NasToy()
    d = dissect(model.eval(), (3, 16, 16), name="nas_toy")
    assert len(d.blocks) >= 4
    x = torch.randn(4, 3, 16, 16)
    model.train()
    for block in d.blocks:
        block.train()

    def run(fn, seed):
        torch.manual_seed(seed)
        return fn(x)

    got = run(d.run_blocks, 1)
    torch.testing.assert_close(got, run(model, 1))
    other = run(d.run_blocks, 2)
    assert not torch.allclose(other, got, atol=1e-4)
    torch.testing.assert_close(other, run(model, 2))
    model.eval()
    for block in d.blocks:
        block.eval()
    _assert_chain(model, d, batch=2)


@pytest.mark.parametrize(("name", "size"), [("crossvit_tiny_240", (3, 240, 240)), ("tnt_s_patch16_224", (3, 224, 224))])
def test_two_stream_transformers_are_cut_per_block(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    if name.startswith("crossvit"):  # the two streams only merge at the head: one cut point
        with pytest.raises(TraceError, match=name) as info:
            dissect(model, size, name=name, pair_cuts=False)
        assert "\n" not in str(info.value)
    else:  # TNT: a single tensor crosses only after the last block
        assert len(dissect(model, size, name=name, pair_cuts=False).blocks) < 4
    d = dissect(model, size, name=name, verify=True)
    _assert_pair_blocks(d, 12)
    _assert_chain(model, d, batch=2)


# --- real architectures (slow) -------------------------------------------------------------------

# (name, minimum number of blocks at granularity="block"); fewer than 4 only with a reason.
SLOW_MODELS = [
    ("resnet18", 4), ("resnet50", 4), ("resnext50_32x4d", 4), ("regnety_004", 4), ("regnetx_002", 4),
    ("efficientnet_b0", 4), ("tf_efficientnetv2_b0", 4), ("mobilenetv3_large_100", 4), ("mobilenetv2_100", 4),
    ("mobilenetv4_conv_small", 4), ("ghostnet_100", 4), ("rexnet_100", 4), ("repvit_m0_9", 4),
    ("convnext_atto", 4), ("convnextv2_atto", 4), ("vit_tiny_patch16_224", 4), ("deit_tiny_patch16_224", 4),
    ("deit_tiny_distilled_patch16_224", 4), ("eva02_tiny_patch14_224", 4), ("pit_ti_224", 4),
    ("cait_xxs24_224", 4), ("swin_tiny_patch4_window7_224", 4), ("swinv2_tiny_window8_256", 4),
    ("maxvit_nano_rw_256", 4), ("coat_lite_tiny", 4), ("levit_128s", 4), ("efficientformer_l1", 4),
    ("edgenext_xx_small", 4), ("fastvit_t8", 4), ("tiny_vit_5m_224", 4), ("mobilevit_xxs", 4),
    ("poolformer_s12", 4), ("mixer_s16_224", 4), ("resmlp_12_224", 4), ("densenet121", 4),
    ("inception_v3", 4), ("xception41", 4), ("dla34", 4), ("cspresnet50", 4), ("dpn68", 4),
    ("ese_vovnet19b_dw", 4), ("hrnet_w18_small", 4),
    ("vit_small_patch16_dinov3", 12),  # RoPE table rebuilt in every block (fixed resolution)
    ("nasnetalarge", 12), ("pnasnet5large", 12),  # cells take the previous two cells' outputs: two-tensor cuts
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "min_blocks"), SLOW_MODELS, ids=[n for n, _ in SLOW_MODELS])
def test_real_architecture(name, min_blocks):
    model, d = get(name)
    assert len(d.blocks) >= min_blocks
    # a parameter shared between blocks (CoaT's shared conv position encoding) counts in each block
    assert count_params(nn.ModuleList(d.blocks)) == d.params
    assert sum(b.params for b in d.block_info) >= d.params
    _assert_chain(model, d, batch=3)
    _CACHE.clear()  # real models are large: keep one at a time
