"""megaloop's SLURM side against a real scheduler: a single-host cluster (munge, slurmctld, slurmd;
scripts/slurm_local.sh) with this machine's CPUs and no GPUs. Every job is a tiny CPU training.

What one host cannot show, and stays dry-run only (tests/test_launch.py): torchrun agents on two
different hosts, MASTER_ADDR as the first of several hosts, and GPU allocations."""
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import yaml

from conftest import tiny_raw
from megaloop.cli import main
from megaloop.config import load_config
from megaloop.sweep.plan import read_manifest
from megaloop.train import train
from test_sweep import _tiny_sweep

pytestmark = pytest.mark.slurm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(m["step"], m["loss"]) for m in map(json.loads, f) if "loss" in m]


def summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def wait_for(pred, what, timeout=240):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.3)


def test_launch_templates_on_the_scheduler(slurm_cluster, tiny_corpus, data_cache, tmp_path):
    """Contract: on a CPU allocation (--gpus-per-node=0 overrides the templates' GPU request)
    single_node.sbatch runs NPROC=2 gloo ranks (srun + torchrun --standalone), and multi_node.sbatch
    on one node runs them through the c10d rendezvous on the allocation's first host (port from the
    job id); each rank gets CPUs / processes threads. Two torchrun agents started by srun, as on two
    nodes, meet at the endpoint multi_node.sbatch resolves in their allocation. All three train with
    world size 2 (tokens = steps x 2 x micro-batch) and give the same loss curve."""
    c = slurm_cluster
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(tiny_corpus, data_cache, str(tmp_path / "unused"), steps=4)))
    (tmp_path / "logs").mkdir()
    env = dict(c.env, NPROC="2")
    cpu = ["--gpus-per-node=0", "--cpus-per-task=2", f"--chdir={tmp_path}"]
    single = c.sbatch(*cpu, os.path.join(ROOT, "launch/slurm/single_node.sbatch"), str(cfg),
                      "--set", f"train.run_dir={tmp_path / 'single'}", env=env)
    multi = c.sbatch(*cpu, "--nodes=1", os.path.join(ROOT, "launch/slurm/multi_node.sbatch"), str(cfg),
                     "--set", f"train.run_dir={tmp_path / 'multi'}", env=env)
    # Two agents in one allocation of 2 tasks: the exact command multi_node.sbatch would exec there,
    # with srun starting 2 tasks on this node instead of 1 per node, and torchrun expecting 2 agents.
    driver = f"""
import shlex, subprocess, sys
out = subprocess.run(["bash", {os.path.join(ROOT, "launch/slurm/multi_node.sbatch")!r}, "--dry-run", {str(cfg)!r},
                      "--set", "train.run_dir={tmp_path / 'agents'}"], capture_output=True, text=True, check=True).stdout
print(out, flush=True)
cmd = shlex.split(out.splitlines()[-1])
cmd[cmd.index("--ntasks-per-node") + 1] = "2"
cmd[cmd.index("--nnodes", cmd.index("torchrun")) + 1] = "2"
sys.exit(subprocess.run(cmd).returncode)
"""
    agents = c.run("salloc", "--nodes=1", "--ntasks=2", "--cpus-per-task=1", sys.executable, "-c", driver,
                   cwd=tmp_path, timeout=600, check=False)
    c.wait(single)
    c.wait(multi)
    for job in (single, multi):
        assert c.states(job)[job] == ("COMPLETED", "0:0"), (job, open(tmp_path / f"logs/megaloop-{job}.out").read()[-3000:])
    assert agents.returncode == 0, agents.stdout[-3000:] + agents.stderr[-3000:]
    assert "NPROC=2 OMP_NUM_THREADS=1" in open(tmp_path / f"logs/megaloop-{single}.out").read()
    multi_log = open(tmp_path / f"logs/megaloop-{multi}.out").read()
    assert f"MASTER_ADDR={os.uname().nodename.split('.')[0]} MASTER_PORT={20000 + int(multi) % 20000} NNODES=1" in multi_log
    assert os.path.isfile(tmp_path / f"logs/megaloop-{multi}-node0.out")
    assert "--rdzv-backend c10d" in agents.stdout and "NNODES=1" in agents.stdout
    for name in ("single", "multi", "agents"):
        assert summary(tmp_path / name)["tokens"] == 4 * 2 * 4 * 32, name
    assert losses(tmp_path / "single") == losses(tmp_path / "multi") == losses(tmp_path / "agents")


def _plan(tmp_path, corpus, cache, monkeypatch, c, flops=3e8, **slurm_args):
    sweep = _tiny_sweep(r=[1, 2], budgets=[{"flops": flops, "sizes": [2, 3]}])
    sweep["base"] = {"model": {"vocab_size": 384, "seq_len": 32}, "optim": {"name": "muon", "lr": 0.02, "warmup_steps": 1},
                     "train": {"micro_batch_size": 4, "log_every": 1, "eval_tokens": 256, "save_every": 2,
                               "progress": False},
                     "data": {"corpus": [corpus], "cache_dir": cache, "workers": 1, "valid_fraction": 0.1}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(sweep))
    out = str(tmp_path / "sweep")
    assert main(["sweep", "plan", str(tmp_path / "tiny.yaml"), "--out", out]) == 0
    monkeypatch.setenv("SLURM_CONF", c.env["SLURM_CONF"])  # sweep slurm asks sinfo for the partitions
    args = ["--gpus-per-node", "0", "--cpus-per-task", "1", "--partition", "debug"]
    for k, v in slurm_args.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    assert main(["sweep", "slurm", out, *args]) == 0
    return out, read_manifest(out)["runs"]


def _submit(c, out, env=None):
    res = c.run("bash", os.path.join(out, "submit.sh"), env=env or c.env)
    return res.stdout, re.findall(r"Submitted batch job (\d+)", res.stdout)


def test_sweep_array_collect_fit_and_a_failing_task(slurm_cluster, tiny_corpus, data_cache, tmp_path, monkeypatch,
                                                     capsys):
    """Contract: `sweep slurm --gpus-per-node 0` + submit.sh runs the tiny sweep as one CPU-only
    array (one process, SLURM_CPUS_PER_TASK threads); a task whose run fails (a bad config) writes
    its FAILED note with the exit status and the others go on and finish; `sweep collect` reports 3
    finished and 1 failed and writes their table, and `megaloop fit` reads it without a traceback; a
    rerun of submit.sh submits only the failed run. A partition the cluster lacks is one clear error."""
    c = slurm_cluster
    out, rows = _plan(tmp_path, tiny_corpus, data_cache, monkeypatch, c)
    capsys.readouterr()
    assert main(["sweep", "slurm", out, "--gpus-per-node", "0", "--partition", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--partition=nope: this cluster has no such partition (sinfo lists: debug)" in err
    bad = os.path.join(out, "runs", rows[1]["run"], "config.yaml")
    raw = yaml.safe_load(open(bad))
    raw["optim"]["lr"] = -1.0
    yaml.safe_dump(raw, open(bad, "w"))

    text, jobs = _submit(c, out)
    assert "submitted 4 run(s) of 4 (0 finished, 0 queued or running)" in text and len(jobs) == 1
    c.wait(jobs[0])
    states = c.states(jobs[0])
    assert states[f"{jobs[0]}_1"][0] == "FAILED", states
    assert all(states[f"{jobs[0]}_{i}"] == ("COMPLETED", "0:0") for i in (0, 2, 3)), states
    failed = open(os.path.join(out, "runs", rows[1]["run"], "FAILED")).read()
    assert re.match(rf"exit status [1-9]\d* \(SLURM job {jobs[0]}_1\)", failed) and f"logs/{jobs[0]}_1.out" in failed
    assert "optim.lr must be positive" in open(os.path.join(out, "logs", f"{jobs[0]}_1.out")).read()
    log0 = open(os.path.join(out, "logs", f"{jobs[0]}_0.out")).read()
    assert "with CPU only, 1 process(es) x 1 thread(s)" in log0 and "torchrun.sh --nproc 1 " in log0

    capsys.readouterr()
    assert main(["sweep", "collect", out, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["finished"] == 3 and list(report["runs"]["failed"]) == [rows[1]["run"]]
    assert main(["fit", out, "--json"]) in (0, 2)  # 3 runs may not identify the law: it must say so cleanly
    assert "Traceback" not in capsys.readouterr().err
    text, _ = _submit(c, out, env=dict(c.env, SBATCH="echo"))
    assert "--array=1 " in text and "submitted 1 run(s) of 4 (3 finished, 0 queued or running)" in text


def test_cancel_resume_and_resubmission_with_queued_running_finished(slurm_cluster, tiny_corpus, data_cache,
                                                                      tmp_path, monkeypatch):
    """Contract, on one 4-task array throttled to one task at a time, every task paused after step 3
    (MEGALOOP_FAULT=pause:3; checkpoint of step 2 on disk): while task 0 runs and 1-3 are queued,
    submit.sh submits nothing; a second submission of task 0 straight to sbatch exits 0 at its run
    directory's lock ("being trained by another process"), without a FAILED note or a change to the
    run; task 0 cancelled with scancel mid-run is the only run submit.sh then submits, it resumes from
    the checkpoint of step 2 and finishes with the loss curve of an uncancelled run (steps once
    each); with that run finished, one running and two queued, submit.sh again submits nothing."""
    c = slurm_cluster
    out, rows = _plan(tmp_path, tiny_corpus, data_cache, monkeypatch, c, flops=1e9, max_parallel=1)
    assert all(r["steps"] >= 4 for r in rows)
    run0 = os.path.join(out, "runs", rows[0]["run"])
    paused = dict(c.env, MEGALOOP_FAULT="pause:3")
    text, (first,) = _submit(c, out, env=paused)
    try:
        assert "submitted 4 run(s) of 4" in text
        wait_for(lambda: os.path.isfile(os.path.join(run0, "metrics.jsonl"))
                 and len(losses(run0)) >= 3, "task 0 to reach step 3")
        queue = c.in_queue(first)
        assert f"{first}_0 RUNNING" in queue and len(queue) == 4, queue
        text, jobs = _submit(c, out)
        assert jobs == [] and "submitted 0 run(s) of 4 (0 finished, 4 queued or running)" in text

        before = open(os.path.join(run0, "metrics.jsonl")).read()
        dup = c.sbatch("--array=0", os.path.join(out, "sweep.sbatch"))
        c.wait(dup, timeout=60)
        assert c.states(dup)[f"{dup}_0"] == ("COMPLETED", "0:0")
        assert "is being trained by another process" in open(os.path.join(out, "logs", f"{dup}_0.out")).read()
        assert not os.path.exists(os.path.join(run0, "FAILED"))
        assert open(os.path.join(run0, "metrics.jsonl")).read() == before

        c.run("scancel", f"{first}_0")
        wait_for(lambda: not any(q.startswith(f"{first}_0 ") for q in c.in_queue(first)), "task 0 to be cancelled")
        assert not os.path.isfile(os.path.join(run0, "summary.json"))
        text, jobs = _submit(c, out)
        assert "submitted 1 run(s) of 4 (0 finished, 3 queued or running)" in text and len(jobs) == 1
        c.wait(jobs[0])
        assert c.states(jobs[0])[f"{jobs[0]}_0"] == ("COMPLETED", "0:0")
        log = open(os.path.join(out, "logs", f"{jobs[0]}_0.out")).read()
        assert "resumed from" in log and "step_00000002" in log
        text, jobs = _submit(c, out)
        assert jobs == [] and "submitted 0 run(s) of 4 (1 finished, 3 queued or running)" in text
    finally:
        c.run("scancel", first, check=False)
    c.wait(first, timeout=60)

    steps = [s for s, _ in losses(run0)]
    assert steps == list(range(1, rows[0]["steps"] + 1))
    ref = str(tmp_path / "uncancelled")  # the same run, one thread as in the array, never interrupted
    threads = __import__("torch").get_num_threads()
    try:
        train(load_config(os.path.join(run0, "config.yaml"), [f"train.run_dir={ref}", "train.threads=1"]),
              log=lambda *a: None)
    finally:
        __import__("torch").set_num_threads(threads)
    assert losses(run0) == losses(ref)
