"""Plain descriptions of tensors crossing a cut and of blocks.

These dataclasses are what the workspace manifests store, what the solvers read (through plain
dicts) and what the stitcher uses to build adapters between blocks of different models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor crossing a cut point looks like (batch dimension excluded).

    Attributes:
        layout: ``"NCHW"`` feature map, ``"NHWC"`` channels-last map (e.g. Swin stages), ``"NLC"``
            tokens, ``"NC"`` vector (pooled features or logits), or ``"other"``.
        channels: channels (maps) or embedding width (tokens, vectors).
        grid: spatial grid ``(H, W)`` of a map, or the patch grid of tokens when it can be derived;
            ``None`` for vectors or when unknown.
        stride: input pixels per grid cell (``input_size // H``); ``None`` when there is no grid.
        prefix_tokens: number of class/distillation/register tokens before the patch tokens (``NLC``).
        shape: the full shape at batch size 1 as traced, e.g. ``(1, 64, 56, 56)``.
    """

    layout: str
    channels: int
    grid: tuple[int, int] | None = None
    stride: int | None = None
    prefix_tokens: int = 0
    shape: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["grid"] = list(self.grid) if self.grid is not None else None
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            layout=d["layout"],
            channels=int(d["channels"]),
            grid=tuple(d["grid"]) if d.get("grid") is not None else None,
            stride=d.get("stride"),
            prefix_tokens=int(d.get("prefix_tokens", 0)),
            shape=tuple(d.get("shape", ())),
        )


@dataclass
class BlockInfo:
    """Metadata of one block: the part of a model between two consecutive cut points.

    Attributes:
        model: name of the source model (zoo entry name).
        index: position of the block in its model (0 = the block holding the stem).
        start: name of the graph node whose output is the block's input (``None``: the model input).
        end: name of the graph node whose output is the block's output (``None``: the model output).
        params: number of parameters (exact integer).
        macs: multiply-accumulates at batch size 1 at the traced input size (1 FLOP = 1 MAC).
        in_spec: spec of the block's input tensor.
        out_spec: spec of the block's output tensor.
        depth: relative depth ``(start, end)`` in ``[0, 1]``, by position in the model's graph.
    """

    model: str
    index: int
    start: str | None
    end: str | None
    params: int
    macs: int
    in_spec: TensorSpec
    out_spec: TensorSpec
    depth: tuple[float, float] = (0.0, 1.0)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "model": self.model,
            "index": self.index,
            "start": self.start,
            "end": self.end,
            "params": int(self.params),
            "macs": int(self.macs),
            "in_spec": self.in_spec.to_dict(),
            "out_spec": self.out_spec.to_dict(),
            "depth": list(self.depth),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(
            model=d["model"],
            index=int(d["index"]),
            start=d.get("start"),
            end=d.get("end"),
            params=int(d["params"]),
            macs=int(d["macs"]),
            in_spec=TensorSpec.from_dict(d["in_spec"]),
            out_spec=TensorSpec.from_dict(d["out_spec"]),
            depth=tuple(d.get("depth", (0.0, 1.0))),
            extra=dict(d.get("extra", {})),
        )
