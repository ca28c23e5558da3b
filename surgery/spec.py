"""Plain descriptions of tensors crossing a cut and of blocks.

These dataclasses are what the workspace manifests store, what the solvers read (through plain
dicts) and what the stitcher uses to build adapters between blocks of different models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# every layout a spec may have; the first four are the ones stitches adapt between
LAYOUTS = ("NCHW", "NHWC", "NLC", "NC", "other")
STITCH_LAYOUTS = LAYOUTS[:4]


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor crossing a cut point looks like (batch dimension excluded).

    Attributes:
        layout: ``"NCHW"`` feature map, ``"NHWC"`` channels-last map (e.g. Swin stages), ``"NLC"``
            tokens in raster order, ``"NC"`` vector (pooled features or logits), or ``"other"``: a
            tensor none of these describe (NesT's blockified ``(B, T, N, C)``, Hiera's unrolled tokens,
            tensors whose first dim is not the batch). ``"other"`` cut points are never stitched.
        channels: channels (maps) or embedding width (tokens, vectors). For ``"other"``, the size of
            the feature dim when it is known (the last dim when ``shape[-1] == channels``, else dim 1),
            else 0; features pool over every other non-batch dim.
        grid: spatial grid ``(H, W)`` of a map, or the patch grid of tokens when it can be derived;
            ``None`` for vectors or when unknown. For ``"other"``, the grid the positions fill when
            their number is known (their order is not).
        stride: input pixels per grid cell (``input_size // H``); ``None`` when there is no grid.
        prefix_tokens: number of class/distillation/register tokens before the patch tokens (``NLC``).
        shape: the full shape at batch size 1 as traced, e.g. ``(1, 64, 56, 56)``. For a two-tensor
            interface, the first tensor's shape.
        parts: empty for a single tensor; for a cut where two tensors cross (two-stream models: CrossViT,
            TNT, NASNet), the graph node names of the two tensors, in graph order: the interface is the
            tuple of their outputs, its layout ``"other"``.
    """

    layout: str
    channels: int
    grid: tuple[int, int] | None = None
    stride: int | None = None
    prefix_tokens: int = 0
    shape: tuple[int, ...] = ()
    parts: tuple[str, ...] = ()

    @property
    def tensors(self) -> int:
        """Number of tensors crossing: 1, or 2 for a two-tensor interface (see ``parts``)."""
        return max(1, len(self.parts))

    @property
    def known(self) -> bool:
        """Whether the spec describes its tensor well enough to stitch it: a stitchable layout, a
        shape, and no :meth:`problems`."""
        return self.layout in STITCH_LAYOUTS and bool(self.shape) and not self.parts and not self.problems()

    def problems(self) -> list[str]:
        """Ways in which the spec contradicts its own ``shape`` (empty when consistent).

        Checked: ``NCHW`` has ``shape == (1, channels, *grid)``, ``NHWC`` ``(1, *grid, channels)``,
        ``NLC`` ``(1, prefix_tokens + grid[0] * grid[1], channels)`` (``prefix_tokens <= N`` when the
        grid is unknown), ``NC`` ``(1, channels)``; ``"other"`` a feature dim of ``channels`` at
        dim 1 or -1 and, with a grid, as many positions as the other dims hold. A spec without a
        shape has nothing to contradict (but is not :attr:`known`).
        """
        s, out = tuple(self.shape), []
        if self.layout not in LAYOUTS:
            return [f"unknown layout {self.layout!r}"]
        if not s:
            return out
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            out.append(f"grid {self.grid} is not two positive sizes")
        if self.layout != "other":
            want = {"NCHW": 4, "NHWC": 4, "NLC": 3, "NC": 2}[self.layout]
            if len(s) != want:
                return [f"{self.layout} needs a {want}-d shape, not {s}"]
            if s[0] != 1:
                out.append(f"shape {s} is not at batch size 1")
        if self.prefix_tokens and self.layout not in ("NLC", "other"):
            out.append(f"{self.layout} has no prefix tokens (got {self.prefix_tokens})")
        if self.layout in ("NCHW", "NHWC"):
            c, grid = (s[1], s[2:4]) if self.layout == "NCHW" else (s[3], s[1:3])
            if self.channels != c or self.grid != tuple(grid):
                out.append(f"{self.layout} shape {s} has {c} channels on {tuple(grid)}, spec says "
                           f"{self.channels} on {self.grid}")
        elif self.layout == "NLC":
            if self.channels != s[2]:
                out.append(f"NLC shape {s} has width {s[2]}, spec says {self.channels}")
            if not 0 <= self.prefix_tokens <= s[1]:
                out.append(f"{self.prefix_tokens} prefix tokens in {s[1]} tokens")
            elif self.grid is not None and self.prefix_tokens + self.grid[0] * self.grid[1] != s[1]:
                out.append(f"{self.prefix_tokens} prefix tokens + grid {self.grid} != {s[1]} tokens")
        elif self.layout == "NC":
            if self.channels != s[1] or self.grid is not None:
                out.append(f"NC shape {s} has {s[1]} features, spec says {self.channels}, grid {self.grid}")
        elif self.channels:
            if len(s) < 2 or self.channels not in (s[1], s[-1]):
                out.append(f"other shape {s} has no dim of {self.channels} features")
            elif self.grid is not None:
                rest = s[1:-1] if s[-1] == self.channels else s[2:]
                if math.prod(rest) != self.grid[0] * self.grid[1]:
                    out.append(f"other shape {s} holds {math.prod(rest)} positions, grid {self.grid}")
        if self.grid is None and self.stride is not None:
            out.append("a stride without a grid")
        if self.parts and (len(self.parts) != 2 or self.layout != "other"):
            out.append(f"a tuple of {len(self.parts)} tensors must have layout 'other' and two parts")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["grid"] = list(self.grid) if self.grid is not None else None
        d["shape"] = list(self.shape)
        if self.parts:
            d["parts"] = list(self.parts)
        else:
            del d["parts"]  # single-tensor specs keep their JSON form
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
            parts=tuple(d.get("parts", ())),
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
