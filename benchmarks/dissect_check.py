"""Dissect a few named timm models and report their blocks (a quick re-check, not the coverage run).

Random init, ``granularity="block"``, the data config's input size; models up to ``--max-params`` are
built on CPU and verified (the chained blocks reproduce the model), larger ones are dissected
structure-only on the meta device, as in ``benchmarks/dissect_coverage.py``.

    .venv/bin/python benchmarks/dissect_check.py vit_small_patch16_dinov3 qwen3_vit_88m
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.count import count_params  # noqa: E402
from surgery.dissection import dissect  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="timm model names")
    ap.add_argument("--max-params", type=float, default=200e6, help="above: structure-only on meta (200e6)")
    args = ap.parse_args(argv)
    failed = 0
    for name in args.models:
        start = time.perf_counter()
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False).eval()
            big = count_params(model) > args.max_params
            if not big:
                model = timm.create_model(name, pretrained=False).eval()
            size = timm.data.resolve_data_config({}, model=model)["input_size"]
            d = dissect(model, size, name=name, verify=not big)
            status = "structure-only" if big else "verified"
            print(f"{name}: {status}, {len(d.blocks)} blocks, {time.perf_counter() - start:.1f} s", flush=True)
        except Exception as exc:  # a report line per model, whatever went wrong
            failed += 1
            print(f"{name}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
