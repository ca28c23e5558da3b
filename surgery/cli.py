"""The ``surgery`` command.

Every command follows the same conventions (DESIGN.md, Conventions): ``--help`` with an example, a
progress display on long work that degrades to plain lines when output is not a terminal, ``--json``
for machine-readable output, exit code 0 on success and 2 on bad input with a one-line reason.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from surgery.errors import USER_ERRORS
from surgery.workspace import DEFAULT_WORKSPACE, json_text

app = typer.Typer(
    name="surgery",
    help="Model surgery: dissect pretrained networks into blocks, find equivalent blocks, reassemble them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)  # notes and warnings; silent on ranks other than 0 under torchrun
_error_console = Console(stderr=True)  # error lines, from every rank

WorkdirArg = Annotated[Path, typer.Argument(help="Workspace folder written by 'surgery dissect'.")]


def error_line(message: str) -> None:
    """Print ``error: MESSAGE`` on one line of stderr (the message is shown as is, never as markup)."""
    lines = str(message).strip().splitlines()
    _error_console.print(f"[bold red]error:[/] {escape(lines[0] if lines else message)}", highlight=False,
                         soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (code 2 = bad input)."""
    error_line(message)
    raise typer.Exit(code)


def fmt_sig(value: float, decimals: int, digits: int = 4, up: bool = False) -> str:
    """``value`` with at least ``decimals`` decimals and at least ``digits`` significant figures.

    Tiny blocks keep their size (``0.000003456``, not ``0.000``) and a shown cost never reads as
    equal to a budget it exceeds; ``up`` rounds up (for "over budget" rows and "the smallest needs").
    """
    if value == 0 or not math.isfinite(value):
        return f"{value:.{decimals}f}"
    places = max(decimals, digits - 1 - math.floor(math.log10(abs(value))))
    if up:
        value = math.ceil(value * 10 ** places - 1e-9) / 10 ** places
    return f"{value:.{places}f}"


def fmt_m(n: int | float, up: bool = False) -> str:
    """Parameters in millions."""
    return fmt_sig(n / 1e6, 2, up=up)


def fmt_g(n: int | float, up: bool = False) -> str:
    """MACs in GFLOPs (= GMACs)."""
    return fmt_sig(n / 1e9, 3, up=up)


def check_budgets(max_gflops: float | None, max_params: float | None) -> None:
    """Refuse a budget that is not a positive finite number (nan, inf, 0, negative)."""
    for flag, value in (("--max-gflops", max_gflops), ("--max-params", max_params)):
        if value is not None and not (math.isfinite(value) and value > 0):
            fail(f"{flag} must be a positive number (got {value})")


class StepProgress:
    """A per-item progress display: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, label: str, quiet: bool = False):
        self.total, self.label, self.quiet = total, label, quiet
        self.done = 0
        self._finished: set[str] = set()  # an item reported done twice is counted once
        self._progress = None
        if not quiet and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=console, transient=True)
            self._task = self._progress.add_task(label, total=total)

    def __enter__(self):
        if self._progress:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress:
            self._progress.__exit__(*exc)

    def update(self, item: str, phase: str) -> None:
        if phase == "done":
            if item in self._finished:
                return
            self._finished.add(item)
        if self._progress:
            if phase == "done":
                self._progress.advance(self._task)
            self._progress.update(self._task, description=f"{self.label}: {item} ({phase})")
        elif not self.quiet and phase == "done":
            self.done += 1
            print(f"[{self.done}/{self.total}] {item}", file=sys.stderr, flush=True)


@app.command(epilog="Example: surgery dissect --zoo timm --models 'resnet*,vit_small*' --random-init")
def dissect(
    zoo: Annotated[str, typer.Option(help="'timm' (the curated default zoo) or a zoo YAML file.")] = "timm",
    models: Annotated[str | None, typer.Option(help="Comma-separated timm wildcards, e.g. 'resnet*,vit_s*'.")
                      ] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Random weights (structure-only work).")
                           ] = False,
    weights: Annotated[Path | None, typer.Option(help="Checkpoint (safetensors/.pth) for a single model.")
                       ] = None,
    input_size: Annotated[int | None, typer.Option(min=1, help="Square input size (default: each model's own).")
                          ] = None,
    granularity: Annotated[str, typer.Option(help="block | stage | node.")] = "block",
    structure_only: Annotated[bool, typer.Option("--structure-only",
                                                 help="Build on the meta device: counts only, no weights.")
                              ] = False,
    out: Annotated[Path, typer.Option(help="Workspace folder.")] = Path(DEFAULT_WORKSPACE),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Cut every zoo model into runnable blocks and write the block library to a workspace."""
    if granularity not in ("block", "stage", "node"):
        fail(f"--granularity must be block, stage or node (got {granularity!r})")
    if not random_init and not structure_only:
        _offline_guard()
    from surgery.library import dissect_zoo
    from surgery.workspace import Workspace
    from zoo.entries import resolve_zoo

    entries = resolve_zoo(zoo, models, random_init=random_init, weights=str(weights) if weights else None)
    ws = Workspace(out)
    ws.read_index()  # a corrupt index is reported before any work
    with StepProgress(len(entries), "dissect", quiet=as_json) as progress:
        results = dissect_zoo(entries, ws, input_size=input_size, granularity=granularity,
                              structure_only=structure_only, on_model=progress.update)
    if as_json:
        print(json_text({"workspace": str(out), "models": [r.to_dict() for r in results]}))
    else:
        table = Table(title=f"block library: {out}")
        for col in ("model", "cut points", "blocks", "params (M)", "GFLOPs", "status"):
            table.add_column(col, justify="right" if col not in ("model", "status") else "left")
        for r in results:
            status = r.status if r.status != "failed" else f"[red]failed[/]: {r.reason}"
            table.add_row(r.name, str(r.cut_points), str(r.blocks), fmt_m(r.params), fmt_g(r.macs), status)
        console.print(table)
        console.print("GFLOPs = GMACs at batch 1 (1 FLOP = 1 multiply-accumulate, as in timm's cards).")
    if results and all(r.status == "failed" for r in results):
        raise typer.Exit(2)


@app.command(epilog="Example: surgery inspect surgery-workspace resnet18")
def inspect(
    workdir: WorkdirArg = Path(DEFAULT_WORKSPACE),
    model: Annotated[str | None, typer.Argument(help="A model to show block by block.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the block library of a workspace, or one model's blocks."""
    from surgery.errors import WorkspaceError
    from surgery.workspace import Workspace

    ws = Workspace(workdir).require()
    index = ws.read_index()
    if model is None:
        if as_json:
            print(json_text(index))
            return
        table = Table(title=f"block library: {workdir}")
        for col in ("model", "cut points", "blocks", "params (M)", "GFLOPs", "input"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for name, s in index["models"].items():
            size = "x".join(str(v) for v in s["settings"]["input_size"])
            table.add_row(name, str(s["cut_points"]), str(s["blocks"]), fmt_m(s["params"]), fmt_g(s["macs"]),
                          size)
        for name, reason in index["failed"].items():
            table.add_row(name, "-", "-", "-", "-", f"[red]failed[/]: {reason}")
        console.print(table)
        return
    if model not in index["models"]:
        raise WorkspaceError(f"{model!r} is not in {workdir} (has: {', '.join(index['models'])})")
    manifest = ws.read_dissection(model)
    if as_json:
        print(json_text(manifest))
        return
    table = Table(title=f"{model}: {len(manifest['blocks'])} blocks, {len(manifest['cut_points'])} cut points")
    for col in ("#", "from", "to", "params (M)", "GFLOPs", "input", "output", "depth"):
        table.add_column(col)
    for b in manifest["blocks"]:
        table.add_row(str(b["index"]), b["start"] or "(input)", b["end"] or "(output)", fmt_m(b["params"]),
                      fmt_g(b["macs"]), _spec_text(b["in_spec"]), _spec_text(b["out_spec"]),
                      f"{b['depth'][0]:.2f}-{b['depth'][1]:.2f}")
    console.print(table)


@app.command(epilog="Example: surgery similarity surgery-workspace --data fashion-mnist --samples 2000")
def similarity(
    workdir: WorkdirArg = Path(DEFAULT_WORKSPACE),
    data: Annotated[str, typer.Option(help="Probe data: fashion-mnist, digits, an image folder, IDX files.")
                    ] = "fashion-mnist",
    samples: Annotated[int, typer.Option(min=4, help="Number of probe images.")] = 2000,
    batch_size: Annotated[int, typer.Option(min=4, help="Images per batch (64+ recommended).")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the probe draw.")] = 0,
    prefix: Annotated[str, typer.Option(help="Class tokens when pooling tokens: exclude | include | cls.")
                      ] = "exclude",
    estimator: Annotated[str, typer.Option(help="CKA estimator: unbiased | biased.")] = "unbiased",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not keep pooled features on disk.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Compute the CKA similarity of every cut point of every workspace model on probe data."""
    from surgery.similarity import compute_similarity

    if estimator not in ("unbiased", "biased"):
        fail(f"--estimator must be unbiased or biased (got {estimator!r})")
    if prefix not in ("exclude", "include", "cls"):
        fail(f"--prefix must be exclude, include or cls (got {prefix!r})")
    with StepProgress(0, "similarity", quiet=as_json) as progress:
        def on_batch(done: int, total: int) -> None:
            if progress._progress:
                progress._progress.update(progress._task, total=total, completed=done,
                                          description=f"similarity: batch {done}/{total}")
            elif not as_json and (done == total or done % 5 == 0):
                err_console.print(f"similarity: batch {done}/{total}", highlight=False)  # rank 0's share only

        result = compute_similarity(workdir, data, samples=samples, batch_size=batch_size, seed=seed,
                                    prefix=prefix, estimator=estimator, cache=not no_cache, on_batch=on_batch)
    summary = {"workspace": str(workdir), **result["settings"],
               "models": {m: len(result["nodes"][m]) for m in result["models"]}}
    if as_json:
        print(json_text(summary))
        return
    table = Table(title=f"similarity ({result['settings']['estimator']} CKA, {summary['samples']} images of "
                        f"{data})")
    table.add_column("model")
    # the block boundaries (what partition cuts at), not every cut point `surgery inspect` lists
    table.add_column("boundaries", justify="right")
    table.add_column("mean CKA to other models", justify="right")
    matrix = result["matrix"]
    for m in result["models"]:
        lo = result["offsets"][m]
        hi = lo + len(result["nodes"][m])
        others = [i for i in range(matrix.shape[0]) if i < lo or i >= hi]
        mean = float(matrix[lo:hi][:, others].mean()) if others else float("nan")
        table.add_row(m, str(hi - lo), f"{mean:.3f}")
    console.print(table)


@app.command(epilog="Example: surgery partition surgery-workspace --stages 4")
def partition(
    workdir: WorkdirArg = Path(DEFAULT_WORKSPACE),
    stages: Annotated[int, typer.Option(min=2, help="K: blocks per model = number of equivalence sets.")] = 4,
    eps: Annotated[float | None, typer.Option(
        help="Balance: each block <= (1+eps) * model MACs / K, strict for every model. Default: 0.2, relaxed "
             "per model to its smallest feasible eps where 0.2 cannot be met (reported).")] = None,
    restarts: Annotated[int, typer.Option(min=1, help="Random restarts of the alternation.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the restarts.")] = 0,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG pictures.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Cut every model into K stages so that the k-th blocks of all models are functionally equivalent."""
    from surgery.equivalence import run_partition

    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        fail(f"--eps must be a number >= 0 (got {eps})")
    result = run_partition(workdir, stages, eps=eps, restarts=restarts, seed=seed, plots=not no_plots)
    if as_json:
        print(json_text(result))
        return
    table = Table(title=f"{stages} equivalence sets (objective {result['objective']:.3f}; random partitions "
                        f"{result['random_partition_objective']['mean']:.3f})")
    table.add_column("model")
    for k in range(stages):
        table.add_column(f"stage {k} GFLOPs", justify="right")
    table.add_column("eps", justify="right")
    relaxed = {n: m["eps_used"] for n, m in result["models"].items() if m["eps_relaxed"]}
    for name, m in result["models"].items():
        table.add_row(name, *[fmt_g(b["macs"]) for b in m["stage_blocks"]],
                      f"{m['eps_used']:.3f}" + ("*" if name in relaxed else ""))
    if relaxed:
        table.caption = "* relaxed to the model's smallest feasible eps"
    console.print(table)
    for name, e in relaxed.items():
        console.print(f"eps relaxed for {name}: {e:.3f} ({result['eps']:g} cannot be met)", highlight=False)
    if relaxed:
        console.print("(set --eps to hold every model to one strict limit)")
    console.print(f"written: {Path(workdir) / 'partition.json'}" + ("" if no_plots else
                  f", pictures in {Path(workdir) / 'partition'}/"))


@app.command(epilog="Example: surgery reassemble surgery-workspace --max-gflops 10 --data digits --out my-model")
def reassemble(
    workdir: WorkdirArg = Path(DEFAULT_WORKSPACE),
    max_gflops: Annotated[float | None, typer.Option(help="MAC budget in GFLOPs (= GMACs), stitches and head included.")
                          ] = None,
    max_params: Annotated[float | None, typer.Option(help="Parameter budget in millions.")] = None,
    data: Annotated[str | None, typer.Option(help="Target data (stitch/head fitting, quality, proxy).")] = None,
    stages: Annotated[int, typer.Option(min=2, help="K, when the workspace has no partition yet.")] = 4,
    top: Annotated[int, typer.Option(min=1, help="Chains solved for and re-ranked by the proxy.")] = 5,
    proxy: Annotated[str, typer.Option(help="linear | logme | naswot | params (linear: the best predictor of "
                                       "fine-tuned accuracy in the README's transfer benchmark).")] = "linear",
    solver: Annotated[str, typer.Option(help="cbc (bundled) | highs.")] = "cbc",
    unlabeled: Annotated[int, typer.Option(min=0, help=(
        "Fit the stitches on up to N training images of --data with labels ignored (all of them before a "
        "train_per_class cap); 0: on the labelled images only."))] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of every random draw.")] = 0,
    out: Annotated[Path, typer.Option(help="Model folder to write.")] = Path("reassembled"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Pick one block per equivalence set under budgets, stitch them, rank by a proxy, save the best."""
    from surgery.reassembly import reassemble as run

    if proxy not in ("logme", "linear", "naswot", "params"):
        fail(f"--proxy must be logme, linear, naswot or params (got {proxy!r})")
    check_budgets(max_gflops, max_params)
    # notes (steps run, models left out, chains skipped) go to stderr in both modes: --json keeps stdout clean
    log = (lambda msg: err_console.print(msg, highlight=False))
    if data is None:  # the README's two-command session relies on this default: say which target it is
        data_note = _default_target(workdir)
        log(f"no --data: the target is {data_note} (the head keeps its classes); pass --data for your task")
    result = run(workdir, max_gflops=max_gflops, max_params_m=max_params, data=data, stages=stages, top=top,
                 proxy=proxy, solver=solver, seed=seed, unlabeled=unlabeled, out_dir=out, log=log)
    single = result.best_single
    if as_json:
        print(json_text({"out": str(out), "proxy": proxy, "timings": result.timings,
                          "ranked": [r.summary() for r in result.ranked], "zoo": result.zoo_points,
                          "best_single": single.summary() if single else None, "skipped": result.skipped}))
        return
    best = result.ranked[0]
    table = Table(title=f"chosen chain (proxy {proxy} = {best.proxy:.4f})")
    for col in ("stage", "source model", "block", "params (M)", "GFLOPs"):
        table.add_column(col)
    for k, plan in enumerate(best.stages):
        p, m = best.stage_costs[k]
        table.add_row(str(k), plan.model, f"{plan.start or '(input)'} -> {plan.end or '(pre-logits)'}", fmt_m(p),
                      fmt_g(m))
    table.add_row("total (stitches, head)", "", "", fmt_m(best.params), fmt_g(best.macs))
    console.print(table)
    if len(result.ranked) > 1:
        runners = Table(title="runners-up")
        for col in ("rank", "models", "params (M)", "GFLOPs", "proxy", "program objective"):
            runners.add_column(col)
        for i, r in enumerate(result.ranked[1:], start=2):
            runners.add_row(str(i), " > ".join(s.model for s in r.stages), fmt_m(r.params), fmt_g(r.macs),
                            f"{r.proxy:.4f}", f"{r.objective:.3f}")
        console.print(runners)
    for skip in result.skipped:  # chains the solver picked that could not be built or scored
        console.print(f"skipped (could not be built): {' > '.join(skip['models'])}: {skip['reason']}",
                      markup=False, highlight=False, soft_wrap=True)
    versus = Table(title=f"chosen chain vs the best single zoo model within the same budget ({proxy} proxy)")
    for col in ("", "models", "params (M)", "GFLOPs", "proxy"):
        versus.add_column(col)
    versus.add_row("reassembled", " > ".join(s.model for s in best.stages), fmt_m(best.params), fmt_g(best.macs),
                   f"{best.proxy:.4f}")
    if single:
        versus.add_row("best single", single.model, fmt_m(single.params), fmt_g(single.macs), f"{single.proxy:.4f}")
    else:
        versus.add_row("best single", "(no zoo model fits the budget)", "", "", "")
    console.print(versus)
    console.print(f"written: {out}/ (config.json, model.safetensors, README.md, pareto.png)")
    if single:
        budget = (f" --max-gflops {max_gflops}" if max_gflops is not None else "") + (
            f" --max-params {max_params}" if max_params is not None else "")
        console.print(f"the best single model, to fine-tune and compare: surgery baseline {workdir} {single.model} "
                      f"--data {data or '<target>'}{budget} --out single", highlight=False, soft_wrap=True)


@app.command(epilog="Example: surgery baseline surgery-workspace --data digits --max-gflops 0.01 --out single")
def baseline(
    workdir: WorkdirArg = Path(DEFAULT_WORKSPACE),
    model: Annotated[str | None, typer.Argument(help="One workspace model (default: every model within the budget)."
                                                )] = None,
    data: Annotated[str | None, typer.Option(help="Target data (the new head's classes, its fitting, the proxy).")
                    ] = None,
    max_gflops: Annotated[float | None, typer.Option(help="MAC budget in GFLOPs (= GMACs), new head included.")
                          ] = None,
    max_params: Annotated[float | None, typer.Option(help="Parameter budget in millions, new head included.")] = None,
    proxy: Annotated[str, typer.Option(help="linear | logme | naswot | params (as in reassemble).")] = "linear",
    seed: Annotated[int, typer.Option(help="Seed of the target image draw.")] = 0,
    out: Annotated[Path, typer.Option(help="Model folder to write the best one to.")] = Path("single"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The honest baseline: the best single zoo model within the budget, with a new head, saved as a model folder.

    Every dissected model whose cost with the new head fits --max-gflops/--max-params is ranked by the
    proxy on target images (models over the budget are never loaded); the best one gets its head fitted
    and is written to --out, ready for 'surgery finetune' and 'surgery evaluate' like a reassembled model.
    With MODEL, that model alone.
    """
    from surgery.baseline import baseline as run

    if data is None:
        fail("--data is required: the target data the new head is fitted on (e.g. --data digits)")
    if proxy not in ("logme", "linear", "naswot", "params"):
        fail(f"--proxy must be linear, logme, naswot or params (got {proxy!r})")
    check_budgets(max_gflops, max_params)
    log = (lambda msg: None) if as_json else (lambda msg: err_console.print(msg, highlight=False))
    result = run(workdir, model, data=data, max_gflops=max_gflops, max_params_m=max_params, proxy=proxy, seed=seed,
                 out_dir=out, log=log)
    if as_json:
        print(json_text(result.summary()))
        return
    best = result.best
    table = Table(title=f"single zoo models with a new head for {data}, ranked by the {proxy} proxy")
    for col in ("rank", "model", "params (M)", "GFLOPs", "proxy", ""):
        table.add_column(col)
    for i, s in enumerate(result.singles, start=1):
        note = "best: written" if s.model == best.stages[0].model else ("" if s.fits else "over budget")
        up = not s.fits  # an over-budget cost rounds up: it never reads as equal to the budget
        table.add_row(str(i) if s.fits else "-", s.model, fmt_m(s.params, up=up), fmt_g(s.macs, up=up),
                      "" if s.proxy is None else f"{s.proxy:.4f}", note)
    console.print(table)
    console.print(f"written: {out}/ (config.json, model.safetensors, README.md); next: surgery finetune {out} "
                  f"--data {data}", highlight=False, soft_wrap=True)


@app.command(epilog="Example: surgery finetune reassembled --data digits --epochs 10 --freeze none")
def finetune(
    model_dir: Annotated[Path, typer.Argument(
        help="Model folder written by 'surgery reassemble', 'baseline' or 'incubate'.")],
    data: Annotated[str, typer.Option(help="Target data (same classes as the model's head).")],
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 5,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up + cosine).")] = 1e-3,
    freeze: Annotated[str, typer.Option(help="none (DeRy FT) | blocks (DeRy FZ: stitches and head only).")
                      ] = "none",
    ema: Annotated[bool, typer.Option("--ema", help="Keep an EMA of the weights and save it.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the data order and splits.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from MODEL_DIR/finetune.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Fine-tune a reassembled model on target data; the weights in MODEL_DIR are replaced when done."""
    from surgery.training.finetune import finetune_model_dir

    if freeze not in ("none", "blocks"):
        fail(f"--freeze must be none or blocks (got {freeze!r})")
    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr must be a positive number (got {lr})")
    summary = finetune_model_dir(model_dir, data, epochs=epochs, batch_size=batch_size, lr=lr, freeze=freeze,
                                 ema=ema, seed=seed, resume=resume, quiet=as_json)
    if as_json:
        print(json_text(summary))
        return
    console.print(f"fine-tuned {model_dir} on {data} for {epochs} epochs (freeze={freeze}): "
                  f"best val top-1 {summary['best_val_acc']:.4f}, held-out test top-1 {summary['test_top1']:.4f}")


@app.command(epilog="Example: surgery evaluate reassembled --data digits")
def evaluate(
    model_dir: Annotated[Path, typer.Argument(
        help="Model folder written by 'surgery reassemble', 'baseline', 'incubate', 'cotrain' or 'grow'.")],
    data: Annotated[str, typer.Option(help="Data to evaluate on.")],
    split: Annotated[str, typer.Option(help="test | val | train.")] = "test",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Top-1, loss, params, GFLOPs and images/s of a saved model."""
    from surgery.training.finetune import evaluate_model_dir

    if split not in ("test", "val", "train"):
        fail(f"--split must be test, val or train (got {split!r})")
    out = evaluate_model_dir(model_dir, data, split=split, batch_size=batch_size, seed=seed)
    if as_json:
        print(json_text(out))
        return
    table = Table(title=f"{model_dir} on {data} ({split})")
    for col in ("top-1", "loss", "params (M)", "GFLOPs", "images/s"):
        table.add_column(col, justify="right")
    table.add_row(f"{out['top1']:.4f}", f"{out['loss']:.4f}", fmt_m(out["params"]), fmt_g(out["macs"]),
                  f"{out['images_per_s']:.0f}")
    console.print(table)
    if "member_top1" in out:
        console.print("members' top-1: " + ", ".join(f"{a:.4f}" for a in out["member_top1"])
                      + f"; images/s with the members one by one {out['images_per_s']:.0f}, concurrently "
                      f"{out['images_per_s_concurrent']:.0f}")


@app.command(epilog="Example: surgery cotrain resnet18 --ways 2 --data fashion-mnist --input-size 32 --epochs 10 "
             "--out cotrained")
def cotrain(
    model: Annotated[str, typer.Argument(help="timm architecture to divide (random init).")],
    data: Annotated[str, typer.Option(help="Target data (digits, fashion-mnist, a folder, ...).")],
    out: Annotated[Path, typer.Option(help="Run folder; also the ensemble's model folder. Rerun to resume.")],
    ways: Annotated[int, typer.Option(help="S: members the model is divided into (1 = the model alone).")] = 2,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 10,
    model_kwargs: Annotated[str | None, typer.Option(
        help="JSON timm.create_model kwargs of the undivided model, e.g. '{\"drop_path_rate\": 0.1}'.")] = None,
    input_size: Annotated[int | None, typer.Option(min=1, help="Square input side (default: the model's own).")
                          ] = None,
    match: Annotated[str, typer.Option(help="params | macs: what the members' total keeps.")] = "params",
    batch_size: Annotated[int, typer.Option(min=2, help="Images per batch (every member sees each).")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(min=0, help="AdamW weight decay.")] = 0.05,
    divide_wd: Annotated[bool, typer.Option(help="Weight decay x exp(1/S - 1) (the paper's Eq. 6).")] = False,
    lam: Annotated[float, typer.Option(min=0, help="Weight of the JSD co-training term.")] = 0.5,
    warmup: Annotated[float, typer.Option(min=0, max=1, help="Fraction of the steps over which the JSD weight "
                                          "ramps up.")] = 0.13,
    views: Annotated[bool, typer.Option(help="Each member its own augmented view (crop + flip).")] = True,
    mixup: Annotated[float, typer.Option(min=0, help="Mixup alpha, drawn once for all views (0: off).")] = 0.0,
    members: Annotated[str, typer.Option(help="auto (batched under vmap when faster here) | stacked | looped.")
                       ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the members' init, the data split and order.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (the run manifest).")] = False,
) -> None:
    """Divide a model into S narrower members and co-train them into an ensemble (Divide-and-Co-training).

    Zhao et al., IEEE TIP 2022: the members' widths are solved so that S of them hold the original's parameters (or MACs); each member sees its own augmented view; the loss is the members' cross-entropies plus a Jensen-Shannon agreement term; the ensemble averages the members' logits. The result is a model folder (surgery evaluate reports the ensemble, each member, and images/s with the members run one by one and concurrently).
    """  # noqa: E501  (one paragraph: the help text keeps the docstring's line breaks)
    from surgery.training.cotrain_run import cotrain as run_cotrain

    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr must be a positive number (got {lr})")
    if ways < 1:
        fail(f"--ways must be at least 1 (got {ways})")
    if match not in ("params", "macs"):
        fail(f"--match must be params or macs (got {match!r})")
    if members not in ("auto", "stacked", "looped"):
        fail(f"--members must be auto, stacked or looped (got {members!r})")
    kwargs = _json_kwargs(model_kwargs, "--model-kwargs")
    manifest = run_cotrain({"arch": model, "model_kwargs": kwargs}, data, out=out, ways=ways, epochs=epochs,
                           input_size=input_size, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                           match=match, lam=lam, warmup=warmup, views=views, mixup=mixup,
                           divide_weight_decay=divide_wd, members=members, quiet=as_json)
    if as_json:
        print(json_text(manifest))


@app.command(epilog="Example (under a minute on 2 cores): surgery grow vit_tiny_patch16_224 --model-kwargs "
             "'{\"patch_size\": 4, \"embed_dim\": 96, \"depth\": 6}' --data digits --input-size 16 --epochs 8 "
             "--stages 3 --resolution-start 1 --out grown")
def grow(
    model: Annotated[str, typer.Argument(help="timm architecture (random init): the full model it grows into.")],
    data: Annotated[str, typer.Option(help="Target data (digits, fashion-mnist, a folder, ...).")],
    out: Annotated[Path, typer.Option(help="Run folder; also the result's model folder. Rerun to resume.")],
    epochs: Annotated[int, typer.Option(help="The whole budget, AutoProg's search epochs included.")] = 12,
    stages: Annotated[int, typer.Option(help="K stages of equal length (1 = plain training); the last trains the "
                                        "full model at full resolution; each stage must be deeper than the one "
                                        "before, so K is at most about half the blocks plus one.")] = 4,
    schedule: Annotated[str, typer.Option(help="manual (depth and resolution ramped linearly) | auto (AutoProg "
                                          "picks each stage's by a supernet search).")] = "manual",
    init: Annotated[str, typer.Option(help="New blocks: mogrow (the grown model from the EMA) | copy (live "
                                      "weights) | zero (copies with a zeroed residual: function-preserving) | "
                                      "random.")] = "mogrow",
    mode: Annotated[str, typer.Option(help="interleave (each block followed by its copy) | stack.")] = "interleave",
    model_kwargs: Annotated[str | None, typer.Option(
        help="JSON timm.create_model kwargs of the full model, e.g. '{\"depth\": 12}'.")] = None,
    input_size: Annotated[int | None, typer.Option(min=1, help="Full square input side (default: the model's own).")
                          ] = None,
    depth_start: Annotated[float, typer.Option(help="First stage's depth, a fraction of the full one.")] = 0.5,
    resolution_start: Annotated[float, typer.Option(help="First stage's resolution, a fraction of the full one.")
                                ] = 0.6,
    drop_path: Annotated[float, typer.Option(min=0, max=0.99, help="Full model's drop-path rate (ramped from 0).")
                         ] = 0.0,
    carry_optimizer: Annotated[bool, typer.Option(help="AdamW moments follow their parameters across a growth "
                                                  "(off: reset, as AutoProg's code).")] = True,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay (default: a horizon of 8% of a stage).")] = None,
    search_epochs: Annotated[int, typer.Option(min=1, help="AutoProg: supernet epochs per stage.")] = 1,
    search_batches: Annotated[int, typer.Option(min=1, help="AutoProg: training batches each candidate's loss is "
                                                "measured on.")] = 10,
    batch_size: Annotated[int, typer.Option(min=2, help="Images per batch.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, one warm-up + cosine over all stages).")
                  ] = 1e-3,
    weight_decay: Annotated[float, typer.Option(min=0, help="AdamW weight decay.")] = 0.05,
    label_smoothing: Annotated[float, typer.Option(min=0, max=0.99, help="Of the training cross-entropy.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation, the data split and order.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (the run manifest).")] = False,
) -> None:
    """Train a model while it grows in depth and input resolution (AutoProg, MoGrow).

    Li et al., CVPR 2022: training starts shallow at a low resolution and grows stage by stage to the full model; new blocks start from the EMA (MoGrow) or as copies; the learning-rate schedule runs on across growths. With --schedule auto each stage but the last trains an elastic supernet briefly and continues with the sub-network of the best loss-time trade-off measured on this machine. The result is a model folder (surgery evaluate, surgery export).
    """  # noqa: E501  (one paragraph: the help text keeps the docstring's line breaks)
    from surgery.training.grow_run import grow as run_grow

    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr must be a positive number (got {lr})")
    kwargs = _json_kwargs(model_kwargs, "--model-kwargs")
    manifest = run_grow({"arch": model, "model_kwargs": kwargs}, data, out=out, epochs=epochs, stages=stages,
                        schedule=schedule, init=init, mode=mode, input_size=input_size, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, drop_path=drop_path, depth_start=depth_start,
                        resolution_start=resolution_start, carry_optimizer=carry_optimizer, ema_decay=ema_decay,
                        search_epochs=search_epochs, search_batches=search_batches, label_smoothing=label_smoothing,
                        seed=seed, quiet=as_json)
    if as_json:
        print(json_text(manifest))


@app.command(epilog="Example: surgery export cotrained --out member0.pt2 --member 0")
def export(
    model_dir: Annotated[Path, typer.Argument(help="Any model folder (reassemble, baseline, incubate, cotrain).")],
    out: Annotated[Path, typer.Option(help="The exported program (.pt2, torch.export.save).")],
    member: Annotated[int | None, typer.Option(help="Of an ensemble: export member I alone.")] = None,
    batch: Annotated[int, typer.Option(min=2, help="Example batch size (the batch dimension stays dynamic).")] = 2,
) -> None:
    """Export a saved model (or one member of an ensemble) with torch.export, for deployment without surgery."""
    from surgery.export import export_model_dir

    path = export_model_dir(model_dir, out, member=member, batch=batch)
    console.print(f"exported {model_dir}{'' if member is None else f' member {member}'} to {path}")


@app.command(epilog="Example: surgery incubate vit_tiny_patch16_224 --data fashion-mnist --input-size 32 "
             "--modules 4 --epochs 3,1,1 --jobs 2 --out incubated")
def incubate(
    model: Annotated[str, typer.Argument(help="timm architecture (random init), or an entry name of --zoo.")],
    data: Annotated[str, typer.Option(help="Target data (digits, fashion-mnist, a folder, ...).")],
    out: Annotated[Path, typer.Option(help="Run folder; also the result's model folder. Rerun to resume.")],
    modules: Annotated[int, typer.Option(min=1, help="K: modules trained independently.")] = 4,
    epochs: Annotated[str, typer.Option(help="PT,MT,FT epochs: meta pre-training, each module, fine-tuning.")
                      ] = "3,1,1",
    jobs: Annotated[int, typer.Option(min=1, help="MT jobs run as this many parallel processes.")] = 1,
    executor: Annotated[str | None, typer.Option(
        help="How the MT jobs run: serial | process (--jobs processes) | torchrun (under torchrun, rank r trains "
             "jobs r, r+W, ... alone). Default: torchrun under torchrun, else process if --jobs > 1, else serial. "
             "Under torchrun, serial trains each MT job with all ranks (data parallel), as PT and FT always are.")
                        ] = None,
    zoo: Annotated[Path | None, typer.Option(help="Zoo YAML file in which MODEL names an entry.")] = None,
    model_kwargs: Annotated[str | None, typer.Option(help="JSON timm.create_model kwargs, e.g. '{\"depth\": 12}'.")
                            ] = None,
    meta: Annotated[str, typer.Option(help="auto (reduced from the target), a timm name or an entry of --zoo.")
                    ] = "auto",
    meta_kwargs: Annotated[str | None, typer.Option(
        help="JSON kwargs of a shallow meta of the target's architecture, e.g. '{\"depth\": 4}'.")] = None,
    input_size: Annotated[int | None, typer.Option(min=1, help="Square input side (default: the model's own).")
                          ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch, every phase.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate of every phase (AdamW, cosine).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation, the data split and order.")] = 0,
    init: Annotated[str, typer.Option(
        help="random (the paper) | meta: modules start from the trained meta model (better at short schedules).")
                    ] = "random",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (the run manifest).")] = False,
) -> None:
    """Train a model as K modules incubated in a shallow frozen meta model, then assemble and fine-tune.

    Deep Incubation (Ni et al., ICCV 2023): PT pre-trains the meta model, MT_k trains module k inside it (independent jobs), the assembled model is evaluated before fine-tuning (the compatibility check), FT fine-tunes it end to end. Every phase resumes after an interruption.
    """  # noqa: E501  (one paragraph: the help text keeps the docstring's line breaks)
    from surgery.training.incubation_run import incubate as run_incubation
    from surgery.training.incubation_run import parse_epochs

    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr must be a positive number (got {lr})")
    if init not in ("random", "meta"):
        fail(f"--init must be random or meta (got {init!r})")
    from surgery.executor import BACKENDS

    if executor is not None and executor not in BACKENDS:
        fail(f"--executor must be one of {', '.join(BACKENDS)} (got {executor!r})")
    phases = parse_epochs(epochs)
    target = _incubation_entry(model, zoo, _json_kwargs(model_kwargs, "--model-kwargs"), "MODEL")
    if meta_kwargs is not None and meta != "auto":
        fail("give either --meta NAME or --meta-kwargs, not both")
    meta_spec = (None if meta == "auto" and meta_kwargs is None
                 else _json_kwargs(meta_kwargs, "--meta-kwargs") if meta_kwargs is not None
                 else _incubation_entry(meta, zoo, {}, "--meta"))
    manifest = run_incubation(target, data, out=out, modules=modules, epochs=phases, meta=meta_spec,
                              input_size=input_size, batch_size=batch_size, lr=lr, seed=seed, jobs=jobs,
                              init=init, quiet=as_json, executor=executor)
    if as_json:
        print(json_text(manifest))


@app.command(epilog="Example: surgery align my-model --data digits:train_per_class=10 --epochs 3,27 "
             "--teacher best-single")
def align(
    model_dir: Annotated[Path, typer.Argument(help="A model folder of 'surgery reassemble' (or 'baseline').")],
    data: Annotated[str, typer.Option(help="Target data; its classes must be the model's.")],
    epochs: Annotated[str, typer.Option(
        help="MT,FT epochs: each stage inside the meta model (0: skip), then end to end.")
                      ] = "2,4",
    meta: Annotated[str, typer.Option(help="truncated (donor blocks cut down, no training) | pretrain (the same, "
                                           "trained end to end first for MT epochs).")] = "truncated",
    train: Annotated[str, typer.Option(help="What MT trains: stitches | norms (also norm weights) | "
                                            "blocks (everything; blocks at --block-lr-scale).")] = "stitches",
    block_lr_scale: Annotated[float, typer.Option(help="Learning-rate multiplier of block weights (--train blocks).")
                              ] = 0.1,
    teacher: Annotated[str | None, typer.Option(help="Distil from this model folder or zoo model of the workspace: "
                                                     "(1 - alpha) CE + alpha KL at --temperature (m2mKD).")] = None,
    alpha: Annotated[float, typer.Option(help="Weight of the distillation term (with --teacher).")] = 0.5,
    temperature: Annotated[float, typer.Option(help="Distillation temperature (with --teacher).")] = 1.0,
    kd_unlabeled: Annotated[int, typer.Option(min=0, help=(
        "Unlabelled target images added to each step's distillation term (with --teacher; their labels "
        "are never read; 0: the labelled batch only)."))] = 64,
    frozen_warmup: Annotated[int, typer.Option(min=0, help="First FT epochs with the blocks frozen.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch, every phase.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the data split and order.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (the run manifest).")] = False,
) -> None:
    """Align a reassembled model's stitches by module incubation, then fine-tune it; the folder is updated in place.

    Each stage (a donor block and the stitch after it) trains on its own inside a frozen meta model made of the other stages' donor blocks cut down to their interfaces; the stages are assembled (batch-norm statistics that MT changed re-estimated on unlabelled target images) and the chain fine-tuned end to end. With --teacher (e.g. the fine-tuned best single model) the loss distils its logits, also on unlabelled target images: in the README's transfer benchmark that is what lifted a few-label chain above the best single model; MT alone did not help. The model card records each step's accuracy; every phase resumes after an interruption (rerun the same command).
    """  # noqa: E501  (one paragraph: the help text keeps the docstring's line breaks)
    from surgery.training.align_run import align as run_align
    from surgery.training.align_run import parse_epochs

    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr must be a positive number (got {lr})")
    if meta not in ("truncated", "pretrain"):
        fail(f"--meta must be truncated or pretrain (got {meta!r})")
    if train not in ("stitches", "norms", "blocks"):
        fail(f"--train must be stitches, norms or blocks (got {train!r})")
    say = (lambda msg: err_console.print(msg, highlight=False))
    try:
        manifest = run_align(model_dir, data, epochs=parse_epochs(epochs), meta=meta, train=train,
                             block_lr_scale=block_lr_scale, teacher=teacher, alpha=alpha, temperature=temperature,
                             kd_unlabeled=kd_unlabeled, frozen_warmup=frozen_warmup, batch_size=batch_size, lr=lr,
                             seed=seed, quiet=as_json, log=say)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: rerun the same command to resume from {model_dir / 'align'}")
        raise typer.Exit(130) from None
    if as_json:
        print(json_text(manifest))
        return
    p = manifest["phases"]
    table = Table(title=f"{model_dir}: alignment on {data} (val top-1 %)")
    table.add_column("step")
    table.add_column("val", justify="right")
    pct = (lambda x: f"{100 * x:.1f}" if isinstance(x, (int, float)) else "-")
    table.add_row("reassembled", pct(p["start"]["val_acc"]))
    table.add_row("meta model", pct(p["meta"].get("val_acc", p["meta"].get("val_acc_closed_form"))))
    for k in range(manifest["stages"]):
        rec = p[f"mt_{k}"]
        table.add_row(f"MT: stage {k}", f"skipped ({rec['skipped']})" if "skipped" in rec else pct(rec.get("val_acc")))
    table.add_row("assembled", pct(p["assemble"]["val_acc"]))
    if p["assemble"].get("norm_layers_recalibrated"):
        kept = "kept" if p["assemble"].get("recalibration_kept") else "not kept: val fell"
        table.add_row(f"norms re-estimated ({kept})", pct(p["assemble"]["val_acc_recalibrated"]))
    table.add_row("fine-tuned", pct(p["final"]["val_acc"]))
    console.print(table)
    if p["final"]["val_acc"] < p["start"]["val_acc"]:
        err_console.print(f"note: validation accuracy fell ({pct(p['start']['val_acc'])} -> "
                          f"{pct(p['final']['val_acc'])} %); the previous weights are in "
                          f"{model_dir / 'align' / 'start.safetensors'}", highlight=False)
    console.print(f"test top-1 {pct(p['final']['test_acc'])} %; written: {model_dir}/ (model.safetensors, "
                  "config.json, README.md); run in align/", highlight=False)


def _json_kwargs(text: str | None, flag: str) -> dict:
    import json

    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{flag} must be a JSON object ({e.msg} at column {e.colno})")
    if not isinstance(value, dict):
        fail(f"{flag} must be a JSON object, e.g. '{{\"depth\": 4}}'")
    return value


def _incubation_entry(name: str, zoo: Path | None, extra: dict, flag: str) -> dict:
    """A timm name, or the entry of that name in a zoo file, with extra model kwargs."""
    if zoo is None:
        return {"name": name, "arch": name, "model_kwargs": extra}
    from zoo.entries import load_zoo_file

    entries = {e.name: e for e in load_zoo_file(zoo)}
    if name not in entries:
        fail(f"{flag}: no entry {name!r} in {zoo} (entries: {', '.join(sorted(entries)[:6])})")
    entry = entries[name].model_dump(mode="json", exclude_none=True)
    entry["model_kwargs"] = {**entry.get("model_kwargs", {}), **extra}
    return entry


zoo_app = typer.Typer(help="Model zoos: build the small pretrained mini-zoo.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build-mini", epilog="Example: surgery zoo build-mini --out ./mini-zoo")
def zoo_build_mini(
    out: Annotated[Path | None, typer.Option(help="Folder (default: the XDG cache, ~/.cache/surgery/mini-zoo).")
                   ] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if cached.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Train the small heterogeneous zoo of really pretrained models (Fashion-MNIST source tasks)."""
    from surgery.minizoo import build_mini_zoo

    path = build_mini_zoo(out, force=force, quiet=as_json)
    if as_json:
        print(json_text({"zoo": str(path)}))
        return
    console.print(f"mini-zoo: {path} (model cards in {path.parent / 'README.md'})")
    console.print(f"next: surgery dissect --zoo {path}")


@app.command(epilog="Example: surgery demo")
def demo(
    out: Annotated[Path, typer.Option(help="Demo folder (workspace and models).")] = Path("surgery-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A much smaller run (smoke test).")] = False,
    epochs: Annotated[int | None, typer.Option(
        min=1, help="Fine-tuning epochs for every contender (default: 6; 1 with --quick).")] = None,
    stages: Annotated[int, typer.Option(min=2, help="Equivalence sets (stages) K.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of every split, draw and fine-tuning.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The whole pipeline on the mini-zoo: reassemble for an unseen task, compare with the best single model.

    Mini-zoo (built once, cached) -> dissect -> similarity on Fashion-MNIST -> partition -> reassemble
    for scikit-learn's digits under the median zoo model's FLOPs -> every single zoo model within the
    same budget gets a new head -> all fine-tuned with one recipe -> one table on the held-out test
    split. Finished steps in OUT are reused.
    """
    from surgery.demo import run_demo

    run_demo(out, quick=quick, as_json=as_json, console=console, epochs=epochs, stages=stages, seed=seed)


def _offline_guard(host: str = "huggingface.co", timeout: float = 2.0) -> None:
    """Without a route to the hub, switch huggingface_hub to offline mode before it is imported.

    Otherwise every uncached pretrained model waits through the hub client's retries (about 50 s each)
    before failing; offline mode makes it fail at once with our one-line message, and cached
    checkpoints still load.
    """
    import os
    import socket

    if "HF_HUB_OFFLINE" in os.environ or "huggingface_hub" in sys.modules:
        return
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"


def _default_target(workdir: Path) -> str:
    """What ``reassemble`` uses as its target without ``--data``: the similarity step's probe data."""
    import json

    try:
        return json.loads((Path(workdir) / "similarity" / "similarity.json").read_text())["settings"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return "the similarity probe data (fashion-mnist, or digits where it is not available)"


def _spec_text(spec: dict) -> str:
    grid = "x".join(str(g) for g in spec["grid"]) if spec.get("grid") else ""
    text = f"{spec['layout']} {spec['channels']}"
    if grid:
        text += f" @{grid}"
    if spec.get("prefix_tokens"):
        text += f" +{spec['prefix_tokens']}cls"
    return text


def _usage_error(e: Exception) -> int | None:
    """Show a click/typer error (usage, missing or bad parameter, abort) on one error line.

    Returns the exit code, or None when ``e`` is not such an error. Typer vendors click
    (``typer._click``), so both its exceptions and click's own are recognised.
    """
    errors: tuple[type, ...] = (typer.exceptions.TyperException,)
    aborts: tuple[type, ...] = (typer.Abort,)
    try:
        import click

        errors += (click.exceptions.ClickException,)
        aborts += (click.exceptions.Abort,)
    except ImportError:  # pragma: no cover - typer without click
        pass
    if isinstance(e, aborts):
        err_console.print("aborted", highlight=False)
        return 130
    if not isinstance(e, errors):
        return None
    if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as click shows it
        e.show()
        return int(getattr(e, "exit_code", 2))
    ctx = getattr(e, "ctx", None)
    if ctx is not None:  # click's usage line and hint, then our one error line
        print(ctx.get_usage(), file=sys.stderr)
        if ctx.command.get_help_option(ctx) is not None:
            print(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.", file=sys.stderr)
    error_line(" ".join(e.format_message().split()))
    return int(getattr(e, "exit_code", 2) or 2)


def _validation_error(e: Exception) -> bool:
    """Show a pydantic ValidationError of a config (e.g. ``lr=-1``) as one line naming the field."""
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(e, ValidationError):
        return False
    errs = e.errors()
    first = errs[0] if errs else {}
    field = ".".join(str(p) for p in first.get("loc", ())) or e.title
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    error_line(f"invalid {field} = {first.get('input')!r}: {first.get('msg', 'invalid value')}{more}")
    return True


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, turning bad input into one error line and exit code 2.

    Under torchrun (``torchrun --nproc-per-node N -m surgery ...``) every rank runs the command; the
    process group is created first, and ranks other than 0 print nothing but error lines (each
    rank that hits an error reports it).
    """
    from surgery import distributed

    try:
        if distributed.launched_by_torchrun() and distributed.init_from_env() and not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
            err_console.quiet = True
        # standalone_mode=False: click returns the code of typer.Exit instead of raising it, and usage
        # errors reach us (handled below) instead of click's own display
        code = app(args=argv, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()
        error_line(msg[0] if msg else type(e).__name__)
        sys.exit(2)
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:  # a path given where a folder/file goes
        error_line(f"{e.strerror}: {e.filename}")
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as e:
        code = _usage_error(e)
        if code is not None:
            sys.exit(code)
        if _validation_error(e):
            sys.exit(2)
        raise
    finally:
        if distributed.active():
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    main()
