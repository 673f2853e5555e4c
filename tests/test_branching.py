"""Budget branching (`branching: true`, megaloop/sweep/branch.py): a branch decayed from its trunk's
checkpoint is the same run as a straight warmup-stable-decay run to its token count, bit for bit;
branches survive kills like other runs; the plan reports the FLOPs spent against the grid
unbranched."""
import json
import os
import subprocess

import pytest
import torch
import yaml

from megaloop.cli import main
from megaloop.sweep.plan import read_manifest
from megaloop.sweep.runner import run_sweep
from megaloop.sweep.spec import parse_sweep

from test_sweep import _write_corpus


def _spec(tmp_path, branching: bool) -> str:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        _write_corpus(corpus)
    spec = {"name": "br", "branching": branching,
            "base": {"model": {"vocab_size": 320, "seq_len": 32},
                     "optim": {"name": "muon", "lr": 0.02, "warmup_steps": 1, "schedule": "wsd", "decay_frac": 0.3},
                     "train": {"micro_batch_size": 4, "log_every": 1, "eval_tokens": 256, "save_every": 0,
                               "progress": False},
                     "data": {"corpus": [str(corpus)], "cache_dir": str(tmp_path / "cache"), "workers": 1}},
            "grid": {"head_dim": 16, "n_prelude": 1, "n_coda": 1, "total_recur_depth": 2, "r": [2],
                     "width_multiple": 16, "round_to": 16,
                     "budgets": [{"flops": 6e8, "sizes": [2]}, {"flops": 1.2e9, "sizes": [2]}]}}
    path = tmp_path / f"br_{branching}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _weights(run_dir):
    from megaloop.export import load_pretrained
    model, _, _ = load_pretrained(run_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, f) if "loss" in r]


def test_branching_needs_wsd():
    """branching: true with the linear schedule is refused before anything is planned."""
    from megaloop.config import ConfigError
    with pytest.raises(ConfigError, match="optim.schedule: wsd"):
        parse_sweep({"branching": True, "grid": {"budgets": [{"flops": 1e18, "sizes": [6]}]}})


@pytest.mark.slow
def test_branch_equals_straight_wsd_run_bitwise_and_survives_a_kill(tmp_path, monkeypatch, capsys):
    """The small budget's branch, seeded from the trunk's branch point and killed once during its
    decay, ends with exactly the weights, losses and learning rates of the same run trained
    straight through (no branching). The manifest marks trunk and branch, and the plan reports the
    FLOPs spent against the grid unbranched."""
    branched, straight = str(tmp_path / "branched"), str(tmp_path / "straight")
    assert main(["sweep", "plan", _spec(tmp_path, True), "--out", branched]) == 0
    out = capsys.readouterr().out
    rows = {r["run"]: r for r in read_manifest(branched)["runs"]}
    small, big = sorted(rows, key=lambda n: rows[n]["steps"])
    assert rows[small]["branch_from"] == big and rows[big]["branch_from"] is None
    s_small, s_big = rows[small]["steps"], rows[big]["steps"]
    step = rows[small]["branch_step"]
    assert step == s_small - round(0.3 * s_small) and rows[big]["save_at_steps"] == str(step)
    spent = rows[big]["target_flops"] + rows[small]["target_flops"] * (s_small - step) / s_small
    assert rows[small]["spent_flops"] + rows[big]["spent_flops"] == pytest.approx(spent)
    assert "FLOPs spent" in out and f"{spent:.3g}" in out

    rep = run_sweep(branched, only=big, log=lambda *a: None)
    assert rep.finished == [big]
    assert os.path.isdir(os.path.join(branched, "runs", big, "branch_points", "checkpoints", f"step_{step:08d}"))
    monkeypatch.setenv("MEGALOOP_FAULT", f"step:{step + 2}")  # SIGKILL inside the branch's decay
    rep = run_sweep(branched, log=lambda *a: None)
    assert rep.failed == [small], rep
    monkeypatch.delenv("MEGALOOP_FAULT")
    rep = run_sweep(branched, log=lambda *a: None)
    assert rep.finished == [small] and rep.skipped == [big]

    assert main(["sweep", "plan", _spec(tmp_path, False), "--out", straight]) == 0
    assert run_sweep(straight, only=small, log=lambda *a: None).finished == [small]

    b_dir, s_dir = os.path.join(branched, "runs", small), os.path.join(straight, "runs", small)
    wb, ws = _weights(b_dir), _weights(s_dir)
    assert wb.keys() == ws.keys()
    assert all(torch.equal(wb[k], ws[k]) for k in wb)
    assert _losses(b_dir) == _losses(s_dir) and len(_losses(s_dir)) == s_small
    sb, ss = (json.load(open(os.path.join(d, "summary.json"))) for d in (b_dir, s_dir))
    for key in ("val_loss", "tokens", "flops", "steps", "train_loss"):
        assert sb[key] == ss[key], key
    # the trunk's own loss curve is a different run after the branch point (its decay starts later)
    trunk = _losses(os.path.join(branched, "runs", big))
    assert trunk[:step] == _losses(s_dir)[:step] and trunk[step] != _losses(s_dir)[step]


def test_branch_waits_for_its_trunk(tmp_path):
    """A branch whose trunk is not trained (and not selected) waits instead of training from scratch."""
    branched = str(tmp_path / "b")
    assert main(["sweep", "plan", _spec(tmp_path, True), "--out", branched]) == 0
    rows = sorted(read_manifest(branched)["runs"], key=lambda r: r["steps"])
    rep = run_sweep(branched, only=rows[0]["run"], log=lambda *a: None)
    assert rep.waiting == [rows[0]["run"]] and not rep.finished and not rep.failed
    assert not os.path.exists(os.path.join(branched, "runs", rows[0]["run"], "checkpoints"))


def test_slurm_branch_waits_for_its_trunk_job(tmp_path):
    """Under SLURM a branch is submitted after its trunk with --dependency=afterok:JOB_TASK (the job
    the trunk was just submitted in, or the one squeue lists it under), gets a time limit for its
    decay only, and its task seeds the run directory before training; with the trunk finished it
    needs no dependency."""
    from megaloop.sweep.slurm import SlurmOptions, write_slurm
    out = str(tmp_path / "b")
    assert main(["sweep", "plan", _spec(tmp_path, True), "--out", out]) == 0
    rows = read_manifest(out)["runs"]
    trunk = next(i for i, r in enumerate(rows) if not r["branch_from"])
    branch = next(i for i, r in enumerate(rows) if r["branch_from"])
    write_slurm(out, SlurmOptions(gpus_per_node=0))
    tasks = [ln.split("\t") for ln in open(os.path.join(out, "tasks.tsv")).read().splitlines()]
    assert tasks[branch][4] == str(trunk) and tasks[trunk][4] == "-"
    sbatch_text = open(os.path.join(out, "sweep.sbatch")).read()
    assert "sweep branch" in sbatch_text
    for name in ("sweep.sbatch", "submit.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(out, name)]).returncode == 0
    fake = tmp_path / "sbatch"
    fake.write_text('#!/bin/bash\necho "args: $*"\necho "Submitted batch job 4242"\n')
    fake.chmod(0o755)
    env = dict(os.environ, SBATCH=str(fake), SQUEUE="none")
    res = subprocess.run(["bash", os.path.join(out, "submit.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("args:")]
    assert f"--array={trunk} " in lines[0] and "--dependency" not in lines[0]
    assert f"--array={branch} " in lines[1] and f"--dependency=afterok:4242_{trunk}" in lines[1]
    assert "submitted 2 run(s) of 2" in res.stdout
    # the trunk queued by an earlier submission: the branch waits for that job
    squeue = tmp_path / "squeue"
    squeue.write_text(f'#!/bin/bash\necho "{trunk} {out}/sweep.sbatch 777"\n')
    squeue.chmod(0o755)
    res = subprocess.run(["bash", os.path.join(out, "submit.sh")], env=dict(env, SQUEUE=str(squeue)),
                         capture_output=True, text=True)
    assert f"--dependency=afterok:777_{trunk}" in res.stdout and "submitted 1 run(s) of 2" in res.stdout
    # the trunk finished: no dependency
    os.makedirs(os.path.join(out, "runs", rows[trunk]["run"]), exist_ok=True)
    open(os.path.join(out, "runs", rows[trunk]["run"], "summary.json"), "w").write("{}")
    res = subprocess.run(["bash", os.path.join(out, "submit.sh")], env=env, capture_output=True, text=True)
    assert "--dependency" not in res.stdout and f"--array={branch} " in res.stdout


def test_appended_run_below_a_trunk_branches_from_it(tmp_path):
    """A trunk keeps the branch points of every smaller grid budget of its size, planned or not: a
    run of a smaller budget appended later (what `sweep suggest --out` writes) branches from it;
    one above every run of its group is a new trunk."""
    path = _spec(tmp_path, True)
    data = yaml.safe_load(open(path))
    data["grid"]["budgets"].append({"flops": 2.4e9, "sizes": [2]})
    out = str(tmp_path / "b")
    for budgets in ([1.2e9], [6e8], [2.4e9]):
        data["select"] = [{"variant": "baseline", "r": 2, "size": 2, "flops": f} for f in budgets]
        p = tmp_path / "sel.yaml"
        p.write_text(yaml.safe_dump(data))
        assert main(["sweep", "plan", str(p), "--out", out, "--append"]) == 0
    rows = {r["target_flops"]: r for r in read_manifest(out)["runs"]}
    assert rows[1.2e9]["branch_from"] is None and rows[1.2e9]["save_at_steps"]
    assert rows[6e8]["branch_from"] == rows[1.2e9]["run"]
    assert str(rows[6e8]["branch_step"]) in rows[1.2e9]["save_at_steps"].split(";")
    assert rows[2.4e9]["branch_from"] is None and rows[2.4e9]["spent_flops"] == 2.4e9
