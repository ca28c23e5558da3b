"""torch.distributed on CPU: 2 gloo processes spawned in-process and meeting through a ``file://``
rendezvous (surgery.distributed.launch_local), plus one real torchrun launch of the CLI.

What must hold: DDP ranks stay identical and equal one process fed the same global batches; a
frozen-meta hybrid trains with only its module synchronised; a killed run resumes exactly, and with
another number of processes; the sharded similarity pass equals the single-process one; the
executor's backends give the same outputs and resume by skipping finished jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from surgery import distributed
from surgery.errors import SurgeryError
from surgery.executor import run_jobs
from surgery.training import train

CFG = {"epochs": 3, "lr": 1e-2, "warmup_epochs": 0, "seed": 3, "log_every": 0}


def _data(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _mlp(seed: int = 1, norm: bool = False, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16) if norm else nn.Identity(), nn.GELU(),
                         nn.Dropout(dropout), nn.Linear(16, 3))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- rank functions (spawned)


def _rank_train(out: str | None) -> dict:
    model = _mlp()
    res = train(model, DataLoader(_data(), batch_size=16, shuffle=True), DataLoader(_data(40, 1), batch_size=16),
                CFG, out_dir=out, quiet=True)
    return {"state": _state(model), "history": res.history, "rank": distributed.rank(),
            "world": distributed.world_size()}


def _rank_hybrid() -> dict:
    from surgery.training.incubation import IncubationHybrid

    torch.manual_seed(0)
    meta = [nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
            nn.Linear(8, 3)]
    module = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU())
    hybrid = IncubationHybrid(meta, module, 1)
    before, flags = _state(hybrid), [p.requires_grad for p in hybrid.parameters()]
    train(hybrid, DataLoader(_data(), batch_size=16, shuffle=True), None, {**CFG, "epochs": 2},
          trainable=hybrid.trainable_parameters(), quiet=True)
    kept = flags == [p.requires_grad for p in hybrid.parameters()]
    return {"before": before, "after": _state(hybrid), "flags_kept": kept,
            "ignore_left": hasattr(hybrid, "_ddp_params_and_buffers_to_ignore")}


class _Killed(Exception):
    pass


def _rank_resumable(out: str, kill_at_step: int | None, resume: bool) -> dict:
    """Conv-free net with batch norm and dropout (per-rank randomness), killed at a step if asked."""
    calls = {"n": 0}
    ce = nn.CrossEntropyLoss()

    def task(model, x, y):
        calls["n"] += 1
        if kill_at_step is not None and calls["n"] == kill_at_step:
            raise _Killed
        logits = model(x)
        return {"loss": ce(logits, y), "output": logits}

    model = _mlp(seed=11 if resume else 1, norm=True, dropout=0.3)  # resumed: weights come from the checkpoint
    try:
        res = train(model, DataLoader(_data(), batch_size=16, shuffle=True), None, {**CFG, "ema": True},
                    out_dir=out, resume=resume, task=task, quiet=True)
    except _Killed:
        return {"killed": True}
    return {"killed": False, "state": _state(model), "ema": _state(res.ema_model),
            "losses": [h["train_loss"] for h in res.history]}


def _rank_similarity(ws: str) -> dict:
    from surgery.similarity import compute_similarity

    res = compute_similarity(ws, "digits", samples=96, batch_size=32, seed=1)
    return {"matrix": res["matrix"]}


def _write_job(folder: str, i: int, fail_on: int | None = None) -> dict:
    """A pure job of (folder, i): writes out_i.json, deterministic in i; optionally fails on one i."""
    if fail_on is not None and i == fail_on:
        raise RuntimeError(f"job {i} failed")
    g = torch.Generator().manual_seed(i)
    value = torch.randn(3, generator=g).sum().item()
    Path(folder, f"out_{i}.json").write_text(json.dumps({"i": i, "value": value}))
    return {"i": i, "value": value}


def _rank_jobs(folder: str, n: int, fail_on: int | None) -> dict:
    try:
        results = run_jobs(_write_job, [(folder, i, fail_on) for i in range(n)], backend="torchrun",
                           done=lambda i: Path(folder, f"out_{i}.json").exists())
    except SurgeryError as e:
        return {"error": str(e)}
    return {"results": results}


# ---------------------------------------------------------------------------- tests


def test_ddp_ranks_agree_and_equal_one_process_with_the_same_global_batch():
    ranks = distributed.launch_local(_rank_train, 2, (None,))
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # One process seeing the same global batch at every step: the sampler DDP's ranks split.
    model = _mlp()
    ds = _data()
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=CFG["seed"], drop_last=True)
    single = train(model, DataLoader(ds, batch_size=16, sampler=sampler), DataLoader(_data(40, 1), batch_size=16),
                   CFG, quiet=True)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, a[k], atol=1e-5), k
    assert not torch.equal(a["0.weight"], _mlp().state_dict()["0.weight"])  # it did train
    # epoch figures are reduced over the ranks: the same as one process's (val over all 40 samples)
    for mine, ref in zip(ranks[0]["history"], single.history, strict=True):
        assert mine["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert mine["train_acc"] == pytest.approx(ref["train_acc"])
        assert mine["val_acc"] == pytest.approx(ref["val_acc"]) and mine["val_loss"] == pytest.approx(ref["val_loss"])
    def figures(history):
        return [{k: v for k, v in h.items() if k not in ("images_per_s", "epoch_time_s")} for h in history]

    assert figures(ranks[1]["history"]) == figures(ranks[0]["history"])


def test_frozen_meta_hybrid_trains_under_ddp_with_only_its_module_synchronised():
    ranks = distributed.launch_local(_rank_hybrid, 2)
    for r in ranks:
        changed = {k for k in r["before"] if not torch.equal(r["before"][k], r["after"][k])}
        assert changed and all(k.startswith("parts.1.") for k in changed), changed  # the meta model is untouched
        assert not r["ignore_left"]  # DDP's ignore list does not outlive the run
        assert r["flags_kept"]  # requires_grad as it was
    assert all(torch.equal(ranks[0]["after"][k], ranks[1]["after"][k]) for k in ranks[0]["after"])


def test_killed_ddp_run_resumes_exactly_and_with_another_world_size(tmp_path):
    full = distributed.launch_local(_rank_resumable, 2, (str(tmp_path / "full"), None, False))
    # 6 steps per epoch (96 samples, global batch 16): killed in epoch 2, after epoch 1's checkpoint
    killed = distributed.launch_local(_rank_resumable, 2, (str(tmp_path / "part"), 9, False))
    assert all(r["killed"] for r in killed)
    shutil.copytree(tmp_path / "part", tmp_path / "part1")
    resumed = distributed.launch_local(_rank_resumable, 2, (str(tmp_path / "part"), None, True))
    for key in ("state", "ema"):
        ref = full[0][key]
        for k, v in resumed[0][key].items():
            assert torch.allclose(v.float(), ref[k].float(), atol=1e-6), (key, k)
    assert resumed[0]["losses"] == pytest.approx(full[0]["losses"])
    assert all(torch.equal(resumed[0]["state"][k], resumed[1]["state"][k]) for k in resumed[0]["state"])
    lines = [json.loads(s) for s in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]  # rank 0 alone wrote the log, once per epoch

    # the same checkpoint, continued by one process: it says so, and finishes
    with pytest.warns(UserWarning, match="processes 2 -> 1"):
        one = _rank_resumable(str(tmp_path / "part1"), None, True)
    assert not one["killed"] and len(one["losses"]) == 3
    assert one["losses"][0] == pytest.approx(full[0]["losses"][0])  # epoch 1 came from the checkpoint


def test_sharded_similarity_equals_single_process(tiny_workspace, tmp_path):
    from surgery.similarity import compute_similarity

    single_ws, sharded_ws = tmp_path / "single", tmp_path / "sharded"
    shutil.copytree(tiny_workspace, single_ws)
    shutil.copytree(tiny_workspace, sharded_ws)
    shutil.rmtree(sharded_ws / "features", ignore_errors=True)
    ref = compute_similarity(single_ws, "digits", samples=96, batch_size=32, seed=1)["matrix"]
    ranks = distributed.launch_local(_rank_similarity, 2, (str(sharded_ws),))  # 3 batches: ranks run 2 and 1
    for r in ranks:
        assert r["matrix"].shape == ref.shape
        assert torch.allclose(torch.from_numpy(r["matrix"]), torch.from_numpy(ref), atol=1e-9, equal_nan=True)
    # the ranks' cached batches together form a complete cache a single process reuses
    again = compute_similarity(sharded_ws, "digits", samples=96, batch_size=32, seed=1)
    assert torch.allclose(torch.from_numpy(again["matrix"]), torch.from_numpy(ref), atol=1e-9, equal_nan=True)
    metas = list((sharded_ws / "features").glob("*/meta.json"))
    assert metas and all(json.loads(m.read_text())["complete"] for m in metas)


def test_executor_backends_give_identical_outputs_and_skip_finished_jobs(tmp_path):
    outputs = {}
    for backend in ("serial", "process"):
        folder = tmp_path / backend
        folder.mkdir()
        results = run_jobs(_write_job, [(str(folder), i) for i in range(5)], backend=backend, workers=2,
                           done=lambda i, f=folder: (f / f"out_{i}.json").exists())
        outputs[backend] = results
    folder = tmp_path / "torchrun"
    folder.mkdir()
    ranks = distributed.launch_local(_rank_jobs, 2, (str(folder), 5, None))
    assert ranks[0]["results"] == ranks[1]["results"] == outputs["serial"] == outputs["process"]
    assert sorted(p.name for p in folder.iterdir()) == [f"out_{i}.json" for i in range(5)]

    # finished jobs are skipped (their result is None); the others run
    (tmp_path / "serial" / "out_3.json").unlink()
    again = run_jobs(_write_job, [(str(tmp_path / "serial"), i) for i in range(5)], backend="serial",
                     done=lambda i: (tmp_path / "serial" / f"out_{i}.json").exists())
    assert again == [None, None, None, outputs["serial"][3], None]
    with pytest.raises(SurgeryError, match="unknown executor"):
        run_jobs(_write_job, [], backend="ray")
    with pytest.raises(SurgeryError, match="needs a torchrun launch"):
        run_jobs(_write_job, [(str(folder), 0)], backend="torchrun")


def test_killed_sharded_jobs_resume(tmp_path):
    folder = tmp_path / "jobs"
    folder.mkdir()
    # job 3 fails on rank 1: every rank raises (none waits forever), the finished outputs stay
    ranks = distributed.launch_local(_rank_jobs, 2, (str(folder), 6, 3))
    assert all("job 3 failed" in r["error"] for r in ranks)
    done_before = {p.name for p in folder.iterdir()}
    assert "out_3.json" not in done_before and "out_0.json" in done_before
    stamps = {name: (folder / name).stat().st_mtime_ns for name in done_before}
    ranks = distributed.launch_local(_rank_jobs, 2, (str(folder), 6, None))
    assert sorted(p.name for p in folder.iterdir()) == [f"out_{i}.json" for i in range(6)]
    assert all((folder / name).stat().st_mtime_ns == t for name, t in stamps.items())  # not redone
    assert [r is None for r in ranks[0]["results"]] == [f"out_{i}.json" in done_before for i in range(6)]


def test_rank_failure_is_reported_by_launch_local(tmp_path):
    with pytest.raises(SurgeryError, match=r"rank \d failed: RuntimeError: job 0 failed"):
        distributed.launch_local(_write_job, 2, (str(tmp_path), 0, 0))


@pytest.mark.slow
def test_torchrun_incubate_then_evaluate(tmp_path):
    """The command as a user launches it: torchrun -m surgery (2 CPU processes, a localhost rendezvous)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    out = tmp_path / "inc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "surgery", "incubate", "test_vit", "--data", "digits",
         "--modules", "2", "--epochs", "1,1,1", "--input-size", "32", "--batch-size", "128", "--model-kwargs",
         '{"depth": 4}', "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: test top-1") == 1  # rank 0 alone prints
    assert "dealt to 2 processes" in proc.stdout
    manifest = json.loads((out / "incubation.json").read_text())
    assert all(manifest["phases"][p] is not None for p in ("pt", "mt_0", "mt_1", "assemble", "ft"))
    ev = run_cli("evaluate", str(out), "--data", "digits", "--json").json()
    assert ev["top1"] == pytest.approx(manifest["phases"]["ft"]["test_acc"], abs=1e-9)

    bad = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "surgery", "finetune",
                          str(tmp_path / "missing"), "--data", "digits"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    # each rank exits 2 with surgery's one-line error (torchrun then reports the failed ranks itself)
    assert bad.returncode != 0 and "error: no reassembled model" in bad.stderr
    assert "exitcode  : 2" in bad.stderr
    ours = bad.stderr.split("torch/distributed/elastic")[0]  # what the ranks printed before torchrun's report
    assert "Traceback" not in ours
