"""Benchmark: how much of timm's registry ``surgery.dissect`` cuts into verified blocks.

For every architecture in ``timm.list_models()`` (or a seeded random sample of it), with random weights:

1. build the model on the ``meta`` device to count its parameters cheaply and read its data config
   (default input size);
2. if it has at most ``--max-params`` (200M) parameters, build it for real on CPU, ``dissect`` it at
   ``granularity="block"`` and verify the chaining invariant: in eval mode, on a seeded random batch of 2
   at the default input size, the blocks chained reproduce ``model(x)`` within
   ``torch.allclose(rtol=1e-4, atol=1e-5)`` (every output leaf);
3. bigger models are dissected structure-only on the meta device (nothing computed, nothing verified)
   and counted separately as "dissected structure-only".

A model succeeds when it dissects into at least 4 blocks and (real models) the invariant holds. Each
model runs in its own subprocess, forked from a server that has already imported torch/timm/surgery
(so the ~10 s import is paid once), with a wall-clock timeout and an RSS ceiling. Per model we record
the status, the failure reason (normalised to a class and a short detail), the seconds spent (build,
dissect, verify, total; the import is excluded), the block count and the peak RSS of the subprocess
(``ru_maxrss`` read in the child, or the highest ``VmRSS`` polled by the parent when it had to be killed).

Outputs: ``benchmarks/results/dissect_coverage.jsonl`` (one JSON object per model, appended as it goes;
models already in it are skipped, so a run can be resumed or extended) and
``benchmarks/results/dissect_coverage.md`` (summary table, failures grouped by reason with model names),
rewritten from the whole JSONL file after every run.

Usage::

    .venv/bin/python benchmarks/dissect_coverage.py --sample 250 --seed 0      # quick seeded sample
    .venv/bin/python benchmarks/dissect_coverage.py --sample 600 --seed 0      # extends the first 250
    .venv/bin/python benchmarks/dissect_coverage.py                            # whole registry
    .venv/bin/python benchmarks/dissect_coverage.py --filter 'resnet*' --out /tmp/cov
    .venv/bin/python benchmarks/dissect_coverage.py --report-only              # rewrite the markdown
    .venv/bin/python benchmarks/dissect_coverage.py --shard 0/4 --out /tmp/cov0  # machine 1 of 4, etc.

Every record carries the code version it was measured with (the commit, ``-dirty`` when the code had
uncommitted changes; changes under ``benchmarks/results`` do not count); records from another version
are re-run unless ``--keep-old`` is given, so a report never mixes code versions silently.
``--shard K/N`` takes every N-th model of the shuffled list starting at K (several machines, or
several sessions, each resumable; ``--report-only --out`` on a folder holding the concatenated JSONL
files reports the union).

The registry is shuffled with ``--seed`` and ``--sample N`` takes the first N, so a bigger N with the same
seed extends a smaller sample. One progress line per model is printed as it finishes.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "results"
STEM = "dissect_coverage"
MIN_BLOCKS = 4
RTOL, ATOL = 1e-4, 1e-5
BATCH = 2
_PRELOAD = ["torch", "timm", "surgery.dissection", "zoo.entries"]
_ACTIVE: set = set()  # running child processes, killed when the run is interrupted
_STOP = threading.Event()


# --- child side ------------------------------------------------------------------------------------

def _rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def _classify_exception(exc: BaseException, stage: str) -> tuple[str, str]:
    """(reason class, detail) for an exception raised while building or dissecting."""
    from surgery.errors import SurgeryError, TraceError

    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in msg:
        return "out of memory", f"{type(exc).__name__}"
    if stage == "build":
        return "build failure", f"{type(exc).__name__}: {msg}"
    if isinstance(exc, TraceError):
        body = msg.split(": ", 1)[1] if ": " in msg else msg  # drop the leading model name
        if body.startswith("cannot be traced with torch.fx"):
            return "trace: torch.fx tracing failed", body[len("cannot be traced with torch.fx"):].strip(" ()")
        if body.startswith("forward pass on input"):
            inner = re.sub(r"^forward pass on input \([^)]*\) failed \(?", "", body).rstrip(")")
            return "trace: forward probe failed", inner
        if "cut point(s) where a single tensor crosses" in body:
            return "trace: fewer than 2 single-tensor cut points", body
        if "chained blocks do not reproduce" in body:
            return "chain mismatch", body
        if "only one input tensor is supported" in body:
            return "trace: extra forward() arguments", body
        return "trace: other TraceError", body
    if isinstance(exc, SurgeryError):
        return "surgery error (other)", f"{type(exc).__name__}: {msg}"
    return f"{stage} crashed with an unexpected exception", f"{type(exc).__name__}: {msg}"


def _verify(model, dissection, input_size, seed: int) -> tuple[bool, float | None, str]:
    """Chained blocks vs model(x) in eval mode on a seeded random batch; (ok, max abs error, note)."""
    import torch
    from torch.utils._pytree import tree_leaves

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *input_size, generator=gen)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        got = dissection.run_blocks(x)
    flat_e, flat_g = tree_leaves(expected), tree_leaves(got)
    if len(flat_e) != len(flat_g):
        return False, None, f"output structure differs ({len(flat_e)} vs {len(flat_g)} leaves)"
    ok, worst = True, 0.0
    for e, g in zip(flat_e, flat_g, strict=True):
        if not isinstance(e, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or e.shape != g.shape:
            return False, None, "output shapes differ"
        worst = max(worst, float((e.float() - g.float()).abs().max()) if e.numel() else 0.0)
        ok = ok and bool(torch.allclose(e, g, rtol=RTOL, atol=ATOL))
    return ok, worst, ""


def run_one(name: str, conn, max_params: int, threads: int, seed: int, log_path: str) -> None:
    """Child process: build, dissect, verify ``name``; send one result dict through ``conn``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import warnings

    warnings.simplefilter("ignore")
    import torch

    from surgery.dissection import dissect
    from zoo.entries import ZooEntry, build_model, data_config

    torch.set_num_threads(threads)
    rec: dict[str, Any] = {"model": name}
    t0 = time.perf_counter()
    stage = "build"
    try:
        entry = ZooEntry(name=name, random_init=True)
        meta = build_model(entry, structure_only=True)
        params = sum(p.numel() for p in meta.parameters())
        rec["params"] = int(params)
        input_size = tuple(int(v) for v in data_config(entry, meta)["input_size"])
        rec["input_size"] = list(input_size)
        structure_only = params > max_params
        rec["structure_only"] = structure_only
        if structure_only:
            model = meta
        else:
            del meta
            model = build_model(entry)
        t1 = time.perf_counter()
        rec["build_s"] = round(t1 - t0, 3)
        stage = "dissect"
        d = dissect(model, input_size, name=name, granularity="block", verify=False)
        t2 = time.perf_counter()
        rec["dissect_s"] = round(t2 - t1, 3)
        rec["blocks"] = len(d.blocks)
        rec["cut_points"] = len(d.cut_points)
        rec["macs"] = int(d.macs)
        if len(d.blocks) < MIN_BLOCKS:
            rec["status"] = "fail"
            rec["reason"] = f"fewer than {MIN_BLOCKS} blocks"
            rec["detail"] = f"{len(d.blocks)} block(s) from {len(d.cut_points)} cut point(s)"
        elif structure_only:
            rec["status"] = "structure_only"
        else:
            stage = "verify"
            ok, err, note = _verify(model, d, input_size, seed)
            rec["verify_s"] = round(time.perf_counter() - t2, 3)
            rec["max_abs_err"] = err
            if ok:
                rec["status"] = "ok"
            else:
                rec["status"] = "fail"
                rec["reason"] = "chain mismatch"
                rec["detail"] = note or f"max abs error {err:.3g} (rtol={RTOL}, atol={ATOL})"
    except BaseException as exc:  # noqa: BLE001 - any failure is a data point
        rec["status"] = "fail"
        rec["reason"], rec["detail"] = _classify_exception(exc, stage)
        rec["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["peak_rss_mib"] = round(_rss_kib() / 1024, 1)
    conn.send(rec)
    conn.close()


# --- parent side -------------------------------------------------------------------------------------

def _vmrss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tail(path: str, n: int = 3) -> list[str]:
    try:
        lines = [x for x in Path(path).read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return []
    return lines[-n:]


def supervise(ctx, name: str, args) -> dict[str, Any]:
    """Run one model in a forked child with a timeout and an RSS ceiling; always returns a record."""
    recv, send = ctx.Pipe(duplex=False)
    fd, log_path = tempfile.mkstemp(prefix=f"dissect_{name}_", suffix=".log")
    os.close(fd)
    proc = ctx.Process(target=run_one, args=(name, send, args.max_params, args.threads, args.seed, log_path),
                       daemon=True)
    t0 = time.perf_counter()
    proc.start()
    _ACTIVE.add(proc)
    send.close()
    limit_kib = int(args.mem_limit_gb * 1024 * 1024)
    peak = 0
    rec = None
    killed = None
    while True:
        peak = max(peak, _vmrss_kib(proc.pid))
        if recv.poll(0.25):
            try:
                rec = recv.recv()
            except (EOFError, OSError):
                rec = None
            break
        if not proc.is_alive():
            break
        if time.perf_counter() - t0 > args.timeout:
            killed = "timeout"
            break
        if peak > limit_kib:
            killed = "out of memory"
            break
    wall = time.perf_counter() - t0
    if killed or proc.is_alive():
        proc.kill()
    proc.join(10)
    _ACTIVE.discard(proc)
    if rec is None:
        rec = {"model": name, "status": "fail", "seconds": round(wall, 3)}
        if killed == "timeout":
            rec["reason"], rec["detail"] = "timeout", f"killed after {args.timeout:g} s"
        elif killed == "out of memory":
            rec["reason"], rec["detail"] = "out of memory", f"RSS above {args.mem_limit_gb:g} GiB, killed"
        else:
            code = proc.exitcode
            if code is not None and code < 0 and -code == 9:
                rec["reason"], rec["detail"] = "out of memory", "killed by SIGKILL (likely the kernel OOM killer)"
            else:
                rec["reason"] = "child crashed"
                rec["detail"] = f"exit code {code}"
            rec["traceback_tail"] = _tail(log_path)
        rec["peak_rss_mib"] = round(peak / 1024, 1)
    else:
        rec["peak_rss_mib"] = max(rec.get("peak_rss_mib", 0.0), round(peak / 1024, 1))
    rec["wall_s"] = round(wall, 3)
    try:
        os.unlink(log_path)
    except OSError:
        pass
    return rec


def load_records(path: Path) -> list[dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
            records[rec["model"]] = rec
    return list(records.values())


def code_version() -> str:
    """Commit of this checkout, ``-dirty`` when the code (not the results folder) has uncommitted changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "describe", "--always"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "surgery", "solvers", "zoo",
                                "benchmarks/dissect_coverage.py"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    version = head.stdout.strip() or "unknown"
    return f"{version}-dirty" if dirty.stdout.strip() else version


def _shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must look like K/N (e.g. 0/4), not {text!r}") from None
    if not 0 <= k < n:
        raise SystemExit(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def select_models(args) -> tuple[list[str], int]:
    import timm

    registry = sorted(timm.list_models())
    names = [n for n in registry if fnmatch.fnmatchcase(n, args.filter)] if args.filter else list(registry)
    random.Random(args.seed).shuffle(names)
    if args.sample:
        names = names[: args.sample]
    k, n = _shard(args.shard)
    return names[k::n], len(registry)


# --- report ------------------------------------------------------------------------------------------

def _normalise(detail: str) -> str:
    """Collapse numbers, quoted names and shapes so that similar messages group together."""
    s = detail or ""
    s = re.sub(r"'[^']*'", "'…'", s)
    s = re.sub(r'"[^"]*"', '"…"', s)
    s = re.sub(r"\[[\d, ]+\]", "[…]", s)
    s = re.sub(r"\(\s*[\d, ]+\)", "(…)", s)
    s = re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "N", s)
    s = re.sub(r"<[^>]*>", "<…>", s)
    return s[:140] + ("…" if len(s) > 140 else "")


def _wilson(k: int, n: int, z: float = 1.96) -> str:
    """``k/n`` with its 95% Wilson score interval: the models run are a seeded random sample of the registry."""
    if n == 0:
        return "n/a"
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return f"{100 * p:.1f}% ({100 * (centre - half):.1f}-{100 * (centre + half):.1f}%)"


def _fmt_mib(v: float) -> str:
    return f"{v / 1024:.2f} GiB" if v >= 1024 else f"{v:.0f} MiB"


def write_report(records: list[dict[str, Any]], path: Path, registry_size: int, args, jsonl: Path,
                 selected: list[str]) -> None:
    import timm
    import torch

    n = len(records)
    counts = Counter(r["status"] for r in records)
    ok, so, fail = counts.get("ok", 0), counts.get("structure_only", 0), counts.get("fail", 0)
    secs = [r["seconds"] for r in records if "seconds" in r]
    dsecs = [r["dissect_s"] for r in records if "dissect_s" in r]
    rss = [r["peak_rss_mib"] for r in records if r.get("peak_rss_mib")]
    pct = (lambda k: f"{100 * k / n:.1f}%") if n else (lambda k: "n/a")
    worst = max(records, key=lambda r: r.get("seconds", 0)) if records else None
    worst_rss = max(records, key=lambda r: r.get("peak_rss_mib", 0)) if records else None
    verified_err = [r["max_abs_err"] for r in records if r.get("status") == "ok" and r.get("max_abs_err") is not None]

    lines = [
        "# Dissection coverage of timm's registry",
        "",
        "Generated by `benchmarks/dissect_coverage.py` (random init, `granularity=\"block\"`, CPU). Success: "
        f"at least {MIN_BLOCKS} blocks and the chained blocks reproduce `model(x)` in eval mode "
        f"(`torch.allclose(rtol={RTOL:g}, atol={ATOL:g})`, batch {BATCH}, default input size from the data "
        f"config). Models over {args.max_params / 1e6:.0f}M params are dissected structure-only on the meta "
        "device (not verified) and counted separately.",
        "",
        f"- timm {timm.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch threads per model: {args.threads}",
        f"- per-model timeout {args.timeout:g} s, RSS ceiling {args.mem_limit_gb:g} GiB, seed {args.seed}; "
        f"selection: {f'first {args.sample} of' if args.sample else 'all of'} the registry shuffled with the seed"
        f"{f', filter {args.filter!r}' if args.filter else ''} (the report covers every model in the JSONL)",
        f"- raw data: `{jsonl.relative_to(ROOT) if jsonl.is_relative_to(ROOT) else jsonl}` "
        "(one JSON object per model)",
        "",
        "## Summary",
        "",
        "| measure | value |",
        "|---|---|",
        f"| models measured | {n} of {registry_size} in `timm.list_models()` ({100 * n / registry_size:.1f}%) |",
        f"| of the current selection | {len(set(selected) & {r['model'] for r in records})} of {len(selected)} |",
        f"| code versions measured (commit) | "
        f"{', '.join(f'{v}: {c}' for v, c in Counter(r.get('code', 'unrecorded') for r in records).most_common())} |",
        f"| success (verified or structure-only), 95% Wilson interval | {_wilson(ok + so, n)} |",
        f"| **dissected and verified (>= {MIN_BLOCKS} blocks, chain invariant holds)** | **{ok} ({pct(ok)})** |",
        f"| dissected structure-only (> {args.max_params / 1e6:.0f}M params, meta, not verified) | {so} ({pct(so)}) |",
        f"| success incl. structure-only | {ok + so} ({pct(ok + so)}) |",
        f"| failed | {fail} ({pct(fail)}) |",
    ]
    if secs:
        lines += [
            "| seconds per model, median (build + dissect + verify, import excluded) | "
            f"{statistics.median(secs):.2f} |",
            f"| seconds per model, worst | {worst['seconds']:.1f} (`{worst['model']}`) |",
        ]
    if dsecs:
        lines.append(f"| `dissect()` seconds, median / worst | {statistics.median(dsecs):.2f} / {max(dsecs):.1f} |")
    if rss:
        lines += [
            f"| peak RSS per model subprocess, median | {_fmt_mib(statistics.median(rss))} |",
            f"| peak RSS per model subprocess, worst | {_fmt_mib(worst_rss['peak_rss_mib'])} "
            f"(`{worst_rss['model']}`) |",
        ]
    if verified_err:
        lines.append(f"| max abs error over verified models, worst | {max(verified_err):.2g} |")
    blocks = [r["blocks"] for r in records if r.get("status") in ("ok", "structure_only")]
    if blocks:
        lines.append(f"| blocks per successful model, median (min-max) | {statistics.median(blocks):g} "
                     f"({min(blocks)}-{max(blocks)}) |")
    lines.append("")

    failures = [r for r in records if r["status"] == "fail"]
    if failures:
        by_reason: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in failures:
            by_reason[r.get("reason", "unknown")].append(r)
        ordered = sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        lines += ["## Failures by reason", "", "| reason | models | share of measured | examples |",
                  "|---|---|---|---|"]
        for reason, rs in ordered:
            ex = ", ".join(f"`{r['model']}`" for r in sorted(rs, key=lambda r: r["model"])[:3])
            lines.append(f"| {reason} | {len(rs)} | {pct(len(rs))} | {ex} |")
        lines.append("")
        for reason, rs in ordered:
            lines += [f"### {reason} ({len(rs)})", ""]
            sub: dict[str, list[str]] = defaultdict(list)
            for r in rs:
                sub[_normalise(r.get("detail", ""))].append(r["model"] + (" (meta)" if r.get("structure_only") else ""))
            for detail, models in sorted(sub.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                detail_md = detail.replace("|", "\\|").replace("`", "'") or "(no detail)"
                lines.append(f"- `{detail_md}` ({len(models)}): " + ", ".join(sorted(models)))
            lines.append("")
        lines += ["(meta): a model over the parameter limit, dissected structure-only.", ""]

    slow = sorted(records, key=lambda r: -r.get("seconds", 0))[:10]
    if slow:
        lines += ["## Slowest models", "", "| model | status | params (M) | seconds | dissect s | peak RSS |",
                  "|---|---|---|---|---|---|"]
        for r in slow:
            params = f"{r['params'] / 1e6:.1f}" if "params" in r else "?"
            lines.append(f"| `{r['model']}` | {r['status']} | {params} | {r.get('seconds', 0):.1f} | "
                         f"{r.get('dissect_s', float('nan')):.1f} | {_fmt_mib(r.get('peak_rss_mib', 0))} |")
        lines.append("")
    if so:
        names = sorted(r["model"] for r in records if r["status"] == "structure_only")
        lines += ["## Dissected structure-only (not verified)", "", ", ".join(f"`{m}`" for m in names), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# --- main --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", type=int, default=0, help="first N of the seeded shuffle (0: all)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed, also seeds the verification input")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per model (default 120)")
    p.add_argument("--workers", type=int, default=1, help="models in parallel (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per model (default cores // workers)")
    p.add_argument("--filter", default=None, help="fnmatch pattern on timm names, e.g. 'vit_*'")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    p.add_argument("--max-params", type=float, default=200e6, help="above: structure-only on meta (200e6)")
    p.add_argument("--mem-limit-gb", type=float, default=12.0, help="kill a model above this RSS (12)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the markdown from the JSONL")
    p.add_argument("--shard", default=None, help="K/N: run every N-th selected model from K (several machines)")
    p.add_argument("--keep-old", action="store_true",
                   help="count records measured with another code version as done (default: re-run them)")
    args = p.parse_args(argv)
    if args.threads <= 0:
        args.threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))

    jsonl = args.out / f"{STEM}.jsonl"
    report = args.out / f"{STEM}.md"
    args.out.mkdir(parents=True, exist_ok=True)
    names, registry_size = select_models(args)
    version = code_version()
    done = {r["model"] for r in load_records(jsonl) if args.keep_old or r.get("code") == version}
    todo = [m for m in names if m not in done]
    print(f"{len(names)} selected, {len(names) - len(todo)} already in {jsonl}, {len(todo)} to run "
          f"(workers={args.workers}, threads={args.threads}, timeout={args.timeout:g}s)", flush=True)

    if todo and not args.report_only:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        lock = threading.Lock()
        counter = [len(names) - len(todo)]
        start = time.perf_counter()

        def work(name: str) -> None:
            if _STOP.is_set():
                return
            rec = supervise(ctx, name, args)
            rec["code"] = version
            with lock:
                if _STOP.is_set():
                    return  # killed by the interruption: not a data point
                with jsonl.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                counter[0] += 1
                what = rec["status"] if rec["status"] != "fail" else f"FAIL {rec.get('reason')}: " \
                    f"{(rec.get('detail') or '')[:100]}"
                blocks = f" {rec['blocks']} blocks" if "blocks" in rec else ""
                print(f"[{counter[0]}/{len(names)} {time.perf_counter() - start:6.0f}s] {name}: {what}{blocks} "
                      f"{rec.get('seconds', 0):.1f}s {_fmt_mib(rec.get('peak_rss_mib', 0))}", flush=True)

        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        pool = ThreadPoolExecutor(max_workers=max(1, args.workers))
        try:
            for fut in [pool.submit(work, m) for m in todo]:
                fut.result()
        except KeyboardInterrupt:
            _STOP.set()
            for proc in list(_ACTIVE):
                proc.kill()
            print("interrupted: the models finished so far are kept; run again to resume", flush=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    records = load_records(jsonl)
    write_report(records, report, registry_size, args, jsonl, names)
    counts = Counter(r["status"] for r in records)
    print(f"wrote {report}: {len(records)} models, {dict(counts)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
