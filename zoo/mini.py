"""The pretrained mini-zoo, as data: small timm models of different families, each trained here on
its own Fashion-MNIST source task at 32x32.

No model hub is reachable on our machines, so the toolkit's end-to-end runs (dissect, similarity,
partition, reassembly) need real trained weights that can be made locally in minutes. Each
:class:`MiniSpec` names a timm architecture and the ``timm.create_model`` kwargs that shrink it to
0.2-3 M parameters at 32x32, a source task (a :mod:`zoo.data` spec), a seed and a training recipe.
``surgery.minizoo.build_mini_zoo`` trains them and writes a zoo file whose entries rebuild every
model from the file alone (``arch`` + ``model_kwargs`` + ``weights``).

Choices, measured on 2 CPU cores (``research/feasibility.md`` style; figures in the zoo's README):

* Families differ in how they mix information: residual CNN (ResNet), inverted residuals with
  squeeze-excitation (MobileNetV3, EfficientNet), RegNet's grouped bottlenecks, ConvNeXt's 7x7
  depthwise + MLP blocks, a plain ViT (global attention on 4x4 patches) and a hierarchical
  transformer (PVT-v2, spatial-reduction attention). MLP-Mixer and PoolFormer are left out:
  their timm factories fix ``patch_size``/``dims`` before ``**kwargs`` (a duplicate-keyword error),
  so no kwarg can fit them to 32x32 and the zoo file could not rebuild them.
* CNN stems keep timm's stride (4 for ResNet/ConvNeXt/PVT stems, 2 for MobileNet/EfficientNet/
  RegNet) because no kwarg removes a stem pool; ConvNeXt takes ``patch_size=2``, the ViT
  ``patch_size=8`` (a 4x4 token grid: see its entry). Final maps are 1x1, the price of CPU-minute
  training.
* Source tasks differ (classes 0-4 "T-shirt..Coat", classes 5-9 "Sandal..Ankle boot", all ten) and
  so do seeds, so that the zoo's models are not interchangeable copies: similarity between their
  blocks is then a finding, not a tautology.
* Training is short (one pass over 16-24k images at batch 128, two over 20k for the ViT; AdamW,
  warm-up + cosine, zero-initialised head), sized so that the whole zoo trains in under 10 minutes
  on 2 otherwise idle CPU cores.

Provenance: the model list follows DeRy's heterogeneous zoo idea (Yang et al., NeurIPS 2022) at toy
scale; the configs are ours, checked against timm 1.0's factories. Never imports :mod:`surgery`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["MiniSpec", "MINI_ZOO", "MINI_INPUT_SIZE", "MINI_INTERPOLATION", "MINI_THREADS", "mini_spec", "spec_hash"]

#: Input size of every mini-zoo model: Fashion-MNIST's 28x28 grey images, repeated to 3 channels
#: and resized to 32x32 (32 divides by every stride the families use).
MINI_INPUT_SIZE = (3, 32, 32)
#: Resize mode used at train time; it is also :func:`zoo.data.make_transform`'s default, which the
#: feature/similarity steps use, so downstream users see the training distribution.
MINI_INTERPOLATION = "bilinear"
#: Intra-op threads the mini-zoo (and the demo) trains with, on any machine. torch's default is one
#: per core, and the count changes how oneDNN sums convolution gradients: regnetx-fm04 trained with
#: 1 and with 2 threads (same seed, same CPU) ends with different weights (test top-1 85.9% vs 85.5%),
#: so a count that followed the machine made results depend on its core count. Two, not one: it is
#: what the published figures and existing caches were made with (on our 2-core machines), a quiet
#: 2-core machine trains 1.1-1.8x faster with it than with one, and a machine with fewer cores still
#: gets the same weights (the count, not the cores, decides the summation order). The CPU's vector
#: ISA (oneDNN's AVX2 vs AVX-512 kernels) also changes the weights; that is hardware, not ours.
MINI_THREADS = 2
# Bump when the training code changes in a way that changes weights for an unchanged spec.
_RECIPE_VERSION = 1


@dataclass(frozen=True)
class MiniSpec:
    """One mini-zoo model: architecture, source task and training recipe.

    Attributes:
        name: entry name in the zoo file (also the weights file stem).
        family: human-readable architecture family, for the model card.
        arch: timm architecture name.
        model_kwargs: ``timm.create_model`` kwargs, YAML-ready (lists, not tuples); must hold
            ``num_classes`` equal to the source task's class count.
        data: :mod:`zoo.data` spec of the source task (its test split is the held-out evaluation).
        seed: seeds the weight initialisation, the train/val split, the training subset and the
            data order.
        epochs: passes over the training subset.
        train_samples: size of the seeded random training subset (``None``: the whole train split).
        batch_size: training batch size.
        lr: peak AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        warmup_epochs: linear warm-up length, in epochs (fractions allowed).
        label_smoothing: of the training loss.
        zero_head: zero the classifier before training. timm's MobileNet/EfficientNet init scales the
            classifier by ``1/sqrt(num_classes)``, tuned for 1000 classes: with 5-10 classes the first
            logits are ~10x too large (initial loss 5 instead of ln 10 = 2.3) and a one-epoch run
            spends its first hundred steps undoing that. A zero head starts every family at chance.
    """

    name: str
    family: str
    arch: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "fashion-mnist"
    seed: int = 0
    epochs: int = 1
    train_samples: int | None = None
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.1
    label_smoothing: float = 0.1
    zero_head: bool = True

    @property
    def num_classes(self) -> int:
        """Classes of the classifier head (``model_kwargs["num_classes"]``)."""
        return int(self.model_kwargs["num_classes"])

    def train_config(self, **overrides: Any) -> dict[str, Any]:
        """Fields of ``surgery.training.TrainConfig`` for this recipe (a plain dict: zoo never imports surgery)."""
        config = {
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs, "label_smoothing": self.label_smoothing, "seed": self.seed,
            "min_lr": min(1e-5, self.lr),
        }
        config.update(overrides)
        return config

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return asdict(self)


def spec_hash(spec: MiniSpec, **extra: Any) -> str:
    """Short stable hash of everything that decides a mini-zoo model's weights.

    Args:
        spec: the model's spec.
        **extra: further JSON-able settings that change the weights (quick mode, normalisation).

    Returns:
        16 hex digits of a SHA-256 over canonical JSON, stable across processes and machines.
    """
    payload = {"recipe": _RECIPE_VERSION, "spec": spec.to_dict(), **extra}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


_FM_0_4 = "fashion-mnist:classes=0-4"  # T-shirt/top, Trouser, Pullover, Dress, Coat
_FM_5_9 = "fashion-mnist:classes=5-9"  # Sandal, Shirt, Sneaker, Bag, Ankle boot
_FM_ALL = "fashion-mnist"

#: The mini-zoo, in build order. Parameter counts are at 32x32 with the heads given here.
MINI_ZOO: tuple[MiniSpec, ...] = (
    MiniSpec(
        # resnet10t's deep-tiered stem and avg-down shortcuts, at half width (1.3 M).
        "resnet10t-fm04", "ResNet", "resnet10t",
        {"num_classes": 5, "channels": [32, 64, 128, 256]},
        data=_FM_0_4, seed=0, train_samples=24_000,
    ),
    MiniSpec(
        # Hard-swish, squeeze-excitation inverted residuals (1.5 M, most of it in the 1024-wide head).
        "mobilenetv3-fm59", "MobileNetV3", "mobilenetv3_small_100",
        {"num_classes": 5},
        data=_FM_5_9, seed=1, train_samples=24_000,
    ),
    MiniSpec(
        # TinyNet-E: EfficientNet-B0's blocks at width 0.51, depth 0.6 (0.8 M).
        "efficientnet-fmall", "EfficientNet", "tinynet_e",
        {"num_classes": 10},
        data=_FM_ALL, seed=2, train_samples=24_000,
    ),
    MiniSpec(
        # RegNetX-200MF: grouped-conv bottlenecks, stride-2 stem (2.3 M).
        "regnetx-fm04", "RegNet", "regnetx_002",
        {"num_classes": 5},
        data=_FM_0_4, seed=3, train_samples=24_000,
    ),
    MiniSpec(
        # ConvNeXt-Atto layout at dims 32-256, depths 2-2-4-2, 2x2 patch stem (1.9 M).
        "convnext-fm59", "ConvNeXt", "convnext_atto",
        {"num_classes": 5, "dims": [32, 64, 128, 256], "depths": [2, 2, 4, 2], "patch_size": 2},
        data=_FM_5_9, seed=4, train_samples=24_000,
    ),
    MiniSpec(
        # ViT on 8x8 patches (4x4 tokens + class token), width 128, 6 blocks, 4 heads (1.2 M). With
        # 4x4 patches (8x8 tokens, width 96) it learnt far slower per step and cost 2x more per image:
        # 39% test top-1 after 120 steps at lr 2e-3 against 63% with 8x8 patches (measured).
        "vit-fmall", "ViT", "vit_tiny_patch16_224",
        {"num_classes": 10, "img_size": 32, "patch_size": 8, "embed_dim": 128, "depth": 6, "num_heads": 4},
        data=_FM_ALL, seed=5, train_samples=20_000, epochs=2, warmup_epochs=0.25,
    ),
    MiniSpec(
        # PVT-v2-B0 layout at dims 32-192: overlapping patch embeds, spatial-reduction attention (2.3 M).
        "pvtv2-fm04", "PVT-v2", "pvt_v2_b0",
        {"num_classes": 5, "embed_dims": [32, 64, 128, 192], "num_heads": [1, 2, 4, 6]},
        data=_FM_0_4, seed=6, train_samples=16_000, lr=1e-3,
    ),
)


def mini_spec(name: str) -> MiniSpec:
    """The :data:`MINI_ZOO` spec called ``name``.

    Raises:
        KeyError: no spec has that name (the message lists the names).
    """
    for spec in MINI_ZOO:
        if spec.name == name:
            return spec
    raise KeyError(f"no mini-zoo model {name!r}; known: {', '.join(s.name for s in MINI_ZOO)}")
