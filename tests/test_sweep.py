"""Sweeps: the reference grid plans exactly, bad sweeps fail before any write, SLURM renders, and a
tiny sweep goes plan -> run -> collect end to end (with a crash and a resume on the way)."""
import json
import math
import os
import subprocess

import pytest
import yaml

from megaloop.cli import main
from megaloop.config import load_config
from megaloop.sweep.collect import collect
from megaloop.sweep.plan import expand, flops_tag, read_manifest, write_plan
from megaloop.sweep.runner import run_sweep
from megaloop.sweep.slurm import SlurmOptions, run_minutes
from megaloop.sweep.spec import load_sweep, parse_sweep, read_sweep_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = os.path.join(REPO, "configs", "sweeps")
# The reference study's grid, restated here independently of configs/sweeps/iso_depth.yaml.
REFERENCE_BUDGETS = {4.64e17: (6, 8, 10, 12), 1e18: (6, 8, 10, 12, 14), 2.15e18: (8, 10, 12, 14, 16),
                     4.64e18: (10, 12, 14, 16, 18, 20), 1e19: (12, 16, 18, 20, 24), 2.15e19: (18, 24, 28, 34)}


def design_accounting(s, r, k=None, vocab=32000, seq=2048):
    """DESIGN.md's formulas worked out for the iso-depth family: (d, n_once, n_rec, FLOPs/token).
    d = 64 s rounded up to 128, head dim 128 (so n_head * head_dim = d, no GQA);
    block = attention 4 d^2 + ReLU^2 MLP 8 d^2 + two norm scales 2 d;
    N_once = 4 blocks + 3 outer norms d; N_rec = 16/r blocks + the 2 d^2 linear adapter when r > 1;
    FLOPs = 6 (once blocks + head) + (2 f + 6 g) N_rec + attention 12 (4 forward-only) d seq per layer."""
    d = math.ceil(64 * s / 128) * 128
    block = 12 * d * d + 2 * d
    n_rec = (16 // r) * block + (2 * d * d if r > 1 else 0)
    g = r if k is None else k
    f = r - g
    fpt = (6 * (4 * block + vocab * d) + (2 * f + 6 * g) * n_rec
           + (12 * (4 + g * 16 // r) + 4 * f * 16 // r) * d * seq)
    return d, 4 * block + 3 * d, n_rec, fpt


def test_reference_grid_plans_exactly_116_runs_matching_design(tmp_path, capsys):
    """Contract: `megaloop sweep plan configs/sweeps/iso_depth.yaml` gives exactly 116 runs (29 per r in
    {1, 2, 4, 8}); each run's d_model, N_once, N_rec, FLOPs per token and tokens = budget / FLOPs per
    token equal DESIGN.md's formulas; r = 1 is 20 unique blocks with passthrough (no adapter), r > 1
    uses the linear adapter; each run's config.yaml is a full config with train.target_flops = budget
    and train.run_dir = DIR/runs/NAME; manifest.csv and manifest.json list the same runs."""
    out = tmp_path / "iso"
    assert main(["sweep", "plan", os.path.join(SWEEPS, "iso_depth.yaml"), "--out", str(out)]) == 0
    assert "planned 116 runs" in capsys.readouterr().out
    rows = read_manifest(str(out))["runs"]
    assert len(rows) == 116 and len({r["run"] for r in rows}) == 116
    expected = {(r, b, s) for r in (1, 2, 4, 8) for b, sizes in REFERENCE_BUDGETS.items() for s in sizes}
    assert {(row["r"], row["target_flops"], row["size"]) for row in rows} == expected
    for row in rows:
        d, n_once, n_rec, fpt = design_accounting(row["size"], row["r"])
        assert (row["d_model"], row["n_once"], row["n_rec"]) == (d, n_once, n_rec), row["run"]
        assert row["flops_per_token"] == fpt, row["run"]
        assert row["tokens"] == math.floor(row["target_flops"] / fpt), row["run"]
        assert row["n_recur_block"] == 16 // row["r"] and row["n_head"] == d // 128
        assert row["input_injection"] == ("passthrough" if row["r"] == 1 else "linear")
        assert row["variant"] == "baseline" and row["bptt_k"] is None
    with open(out / "manifest.csv") as f:
        lines = f.read().splitlines()
    assert len(lines) == 117 and lines[0].startswith("run,variant,r,size,d_model")
    row = next(r for r in rows if r["run"] == "baseline_r4_s34_c2.15e19")
    cfg = load_config(str(out / row["config"]))
    assert cfg.train.target_flops == 2.15e19 and cfg.train.steps is None
    assert cfg.train.run_dir == str(out / "runs" / row["run"])
    m = cfg.model
    assert (m.d_model, m.n_head, m.n_prelude, m.n_recur_block, m.n_coda, m.num_recur, m.vocab_size,
            m.seq_len) == (2176, 17, 2, 4, 2, 4, 32000, 2048)


def test_probes_and_appending_them_to_the_reference_sweep(tmp_path):
    """Contract: the truncated-backprop probe is r in {2, 4, 8} x the four lower budgets (60 runs) with
    bptt_k = ceil(r / 2), charged 2x per forward-only recurrence; the hyperconnect probe uses 2 lanes and
    full backprop. Planned with --append they join the reference runs in one manifest (so the fit shares
    the baseline); planning a different sweep into that folder without --append is refused."""
    trunc = expand(load_sweep(os.path.join(SWEEPS, "probe_truncbptt.yaml")), str(tmp_path / "x"))
    assert len(trunc) == 60 and {r.r for r in trunc} == {2, 4, 8}
    assert {r.target_flops for r in trunc} == {4.64e17, 1e18, 2.15e18, 4.64e18}
    for run in trunc:
        assert run.bptt_k == math.ceil(run.r / 2) and run.variant == "truncbptt"
        assert run.flops_per_token == design_accounting(run.size, run.r, k=run.bptt_k)[3]
    hyper = expand(load_sweep(os.path.join(SWEEPS, "probe_hyperconnect.yaml")), str(tmp_path / "x"))
    assert hyper and all(r.input_injection == "hyperconnect" and r.cfg.model.num_lanes == 2 and r.bptt_k is None
                         for r in hyper)
    out = str(tmp_path / "iso")
    assert main(["sweep", "plan", os.path.join(SWEEPS, "iso_depth.yaml"), "--out", out]) == 0
    assert main(["sweep", "plan", os.path.join(SWEEPS, "probe_truncbptt.yaml"), "--out", out]) == 2
    assert len(read_manifest(out)["runs"]) == 116
    assert main(["sweep", "plan", os.path.join(SWEEPS, "probe_truncbptt.yaml"), "--out", out, "--append"]) == 0
    manifest = read_manifest(out)
    assert len(manifest["runs"]) == 176 and manifest["name"] == "iso_depth"
    # planning the same sweep again is a no-op
    assert main(["sweep", "plan", os.path.join(SWEEPS, "iso_depth.yaml"), "--out", out, "--append"]) == 0
    assert len(read_manifest(out)["runs"]) == 176


def _tiny_sweep(**grid):
    g = dict(head_dim=16, n_prelude=1, n_coda=1, total_recur_depth=2, r=[1, 2], width_multiple=16,
             round_to=16, budgets=[{"flops": 3e8, "sizes": [2]}])
    g.update(grid)
    return {"name": "tiny", "base": {"model": {"vocab_size": 320, "seq_len": 32},
                                     "train": {"micro_batch_size": 4}}, "grid": g}


@pytest.mark.parametrize("change, message", [
    (dict(grid=dict(head_dim=128, round_to=64, width_multiple=64, budgets=[{"flops": 1e18, "sizes": [3]}])),
     "not divisible by grid.head_dim=128"),
    (dict(grid=dict(budgets=[{"flops": 1e4, "sizes": [2]}])), "less than one step"),
    (dict(name_format="{variant}_s{size}"), "duplicate run name 'baseline_s2'"),
    (dict(grid=dict(total_recur_depth=3)), "not divisible by r=2"),
    (dict(base={"model": {"d_model": 64}}), "base.model.d_model: the grid sets"),
    (dict(base={"train": {"steps": 10}}), "base.train.steps: the sweep sets"),
    (dict(base={"optim": {"lr": -1}}), "optim.lr must be positive"),
    (dict(grid=dict(budgets=[{"flops": "lots", "sizes": [2]}])), "expected a number"),
    (dict(variants={"truncbptt": {"r": [16]}}), "which grid.r [1, 2] does not have"),
    (dict(variants={"x": {"bogus": 1}}), "unknown key 'variants.x.bogus'"),
    (dict(bogus=1), "unknown top-level key 'bogus'"),
])
def test_bad_sweeps_fail_clearly_before_anything_is_written(tmp_path, capsys, change, message):
    """Contract: widths the head dim does not divide, budgets below one step, duplicate run names and
    other mistakes exit 2 with one message naming the problem, and the output folder is not created."""
    data = _tiny_sweep()
    for key, value in change.items():
        data[key] = dict(data[key], **value) if key == "grid" else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["sweep", "plan", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_extends_replaces_variants_and_merges_the_rest(tmp_path):
    """Contract: `extends` starts from another sweep file (path relative to the extending file); the
    child's variants replace the parent's, every other mapping is deep-merged."""
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(dict(_tiny_sweep(), variants={"baseline": {}, "other": {}})))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(
        {"extends": "parent.yaml", "name": "child", "grid": {"r": [2]}, "variants": {"probe": {"bptt_k": 1}}}))
    data = read_sweep_yaml(str(tmp_path / "child.yaml"))
    assert list(data["variants"]) == ["probe"] and data["grid"]["head_dim"] == 16 and data["grid"]["r"] == [2]
    runs = expand(parse_sweep(data), str(tmp_path / "o"))
    assert [(r.run, r.bptt_k) for r in runs] == [("probe_r2_s2_c3e8", 1)]
    assert flops_tag(4.64e17) == "4.64e17" and flops_tag(1e18) == "1e18" and flops_tag(2.15e19) == "2.15e19"


def test_slurm_script_renders_passes_bash_n_and_skips_finished_runs(tmp_path):
    """Contract: `megaloop sweep slurm DIR` writes DIR/sweep.sbatch, an array over all manifest rows
    (0-115 for the reference grid, throttled by --max-parallel) with the node shape and the longest
    per-run time limit, that passes `bash -n`; a task whose run has a summary.json exits 0 without
    launching, another launches its run's config with --resume through launch/torchrun.sh; submit.sh
    (also `bash -n` clean) submits only runs that are neither finished nor listed by squeue as a task
    of this sweep's sweep.sbatch (a fake squeue here; tests/test_slurm.py asks a real one), one array
    per time limit; when squeue fails it submits nothing."""
    out = tmp_path / "iso"
    assert main(["sweep", "plan", os.path.join(SWEEPS, "iso_depth.yaml"), "--out", str(out)]) == 0
    assert main(["sweep", "slurm", str(out), "--partition", "gpu", "--account", "proj", "--max-parallel", "8"]) == 0
    sbatch = (out / "sweep.sbatch").read_text()
    for line in ("#SBATCH --array=0-115%8", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", f"#SBATCH --output={out}/logs/%A_%a.out", "--resume"):
        assert line in sbatch
    longest = run_minutes(2.15e19, 8, SlurmOptions())
    assert f"#SBATCH --time={longest // 60:02d}:{longest % 60:02d}:00" in sbatch
    for name in ("sweep.sbatch", "submit.sh"):
        assert subprocess.run(["bash", "-n", str(out / name)], capture_output=True).returncode == 0
    tasks = (out / "tasks.tsv").read_text().splitlines()
    assert len(tasks) == 116 and tasks[5].split("\t")[:3] == ["5", read_manifest(str(out))["runs"][5]["run"], "8"]
    # a finished run: the task skips it, submit.sh leaves it out
    done = out / "runs" / read_manifest(str(out))["runs"][0]["run"]
    (done / "summary.json").write_text("{}")
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="0")
    res = subprocess.run(["bash", str(out / "sweep.sbatch")], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "skipping" in res.stdout
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="7", MEGALOOP_DRY_RUN="1")
    res = subprocess.run(["bash", str(out / "sweep.sbatch")], env=env, capture_output=True, text=True)
    row = read_manifest(str(out))["runs"][7]
    assert res.returncode == 0, res.stderr
    assert f"{out}/runs/{row['run']}/config.yaml --resume --set train.run_dir={out}/runs/{row['run']}" in res.stdout
    assert ("launch/torchrun.sh --nproc 8" in res.stdout) == os.path.exists(os.path.join(REPO, "launch", "torchrun.sh"))
    squeue = tmp_path / "squeue"  # task 3 of this sweep is queued; task 5 of another sweep's script is not ours
    squeue.write_text(f"#!/bin/sh\necho '3 {out}/sweep.sbatch'\necho '5 /elsewhere/sweep.sbatch'\n")
    squeue.chmod(0o755)
    res = subprocess.run(["bash", str(out / "submit.sh")], env=dict(os.environ, SBATCH="echo", SQUEUE=str(squeue)),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "submitted 114 run(s) of 116 (1 finished, 1 queued or running)" in res.stdout
    arrays = [ln.split()[0] for ln in res.stdout.splitlines() if ln.startswith("--array")]
    assert arrays[0].startswith("--array=1-2,4-8,29-37,") and all(a.endswith("%8") for a in arrays)
    broken = tmp_path / "broken_squeue"  # a queue that cannot be asked: submit nothing rather than twice
    broken.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
    broken.chmod(0o755)
    res = subprocess.run(["bash", str(out / "submit.sh")], env=dict(os.environ, SBATCH="echo", SQUEUE=str(broken)),
                         capture_output=True, text=True)
    assert res.returncode == 1 and "--array" not in res.stdout and "Unable to contact" in res.stderr


def test_cpu_only_array(tmp_path, capsys):
    """Contract: `sweep slurm --gpus-per-node 0` writes an array that requests CPUs only (no GPU
    directive, --cpus-per-task), whose task runs one process with SLURM_CPUS_PER_TASK threads, with
    time limits from CPUs x --tflops-per-cpu; --gpus-per-node below 0 and --cpus-per-task below 1 are
    one clear error each."""
    spec = parse_sweep(_tiny_sweep())
    write_plan(spec, expand(spec, str(tmp_path)), str(tmp_path))
    assert main(["sweep", "slurm", str(tmp_path), "--gpus-per-node", "0", "--cpus-per-task", "4"]) == 0
    sbatch = (tmp_path / "sweep.sbatch").read_text()
    assert "--gpus" not in sbatch.split("set -euo pipefail")[0] and "#SBATCH --cpus-per-task=4" in sbatch
    assert (tmp_path / "tasks.tsv").read_text().splitlines()[0].split("\t")[2] == "0"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(SLURM_ARRAY_TASK_ID="1", SLURM_CPUS_PER_TASK="4", MEGALOOP_DRY_RUN="1")
    res = subprocess.run(["bash", str(tmp_path / "sweep.sbatch")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "CPU only, 1 process(es) x 4 thread(s)" in res.stdout and "torchrun.sh --nproc 1 " in res.stdout
    opts = SlurmOptions(gpus_per_node=0, cpus_per_task=4, tflops_per_cpu=0.1, mfu=0.5, safety=1.0, overhead_min=0)
    assert run_minutes(4 * 0.05e12 * 3600, 0, opts) == 60
    capsys.readouterr()
    for args, message in ((["--gpus-per-node", "-1"], "--gpus-per-node must be >= 0"),
                          (["--gpus-per-node", "0", "--cpus-per-task", "0"], "--cpus-per-task must be >= 1")):
        assert main(["sweep", "slurm", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_time_limit_scales_with_flops_and_throughput():
    """Contract: time = FLOPs / (GPUs x TFLOP/s x MFU) x safety + overhead, rounded up to 15 minutes."""
    opts = SlurmOptions(tflops_per_gpu=100, mfu=0.5, safety=1.0, overhead_min=0)
    assert run_minutes(8 * 50e12 * 3600, 8, opts) == 60
    assert run_minutes(8 * 50e12 * 3601, 8, opts) == 75


def _write_corpus(path, n_docs=80, seed=0):
    import random
    words = ("the king queen castle night sword love death crown heart speak lord lady honour fair sweet "
             "time world friend blood hand eye fool good noble true man woman war peace").split()
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            sents = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(8, 20))]
            f.write(json.dumps({"text": " ".join(sents)}) + "\n")


def test_collect_reports_every_status(tmp_path, capsys):
    """Contract: collect puts finished runs in DIR/fit_table.csv (n_once, n_rec, r, tokens, loss, run,
    variant, flops, seed, n_adapter, tokens_per_param, vocab_size, skipped_steps), their val_loss_by_r in
    DIR/test_time.csv (one row per r_test), and reports the rest: diverged (non-finite loss, loss worse than uniform guessing,
    or a FAILED note saying so), failed, incomplete (checkpoints, no summary) and missing. No finished
    run at all is a clear error."""
    sweep = _tiny_sweep(r=[1, 2], budgets=[{"flops": 3e8, "sizes": [2, 3]}, {"flops": 6e8, "sizes": [2, 3]}])
    runs = expand(parse_sweep(sweep), str(tmp_path))
    write_plan(parse_sweep(sweep), runs, str(tmp_path))
    assert main(["sweep", "collect", str(tmp_path)]) == 2
    assert "none of its 8 runs has finished" in capsys.readouterr().err
    d = {r.run: tmp_path / "runs" / r.run for r in runs}
    names = list(d)

    def summary(name, loss, entropy=5.0, **extra):
        (d[name] / "summary.json").write_text(json.dumps(dict(
            run=name, n_once=1, n_rec=2, r=1, tokens=100, flops=1e8, val_loss=loss, unigram_entropy=entropy,
            **extra)))
    summary(names[0], 3.0, val_loss_by_r={"2": 3.5, "1": 3.0})
    summary(names[6], 5.5)  # above the unigram entropy (5.0) but below ln 320: kept, with a note
    summary(names[1], float("nan"))
    summary(names[2], 7.0)  # worse than uniform guessing: ln 320 = 5.77
    (d[names[3]] / "FAILED").write_text("exit status 2 after 3 s\nmegaloop train: error: training diverged: ...\n")
    (d[names[4]] / "FAILED").write_text("exit status -9 after 3 s\nKilled\n")
    (d[names[5]] / "checkpoints").mkdir()
    c = collect(str(tmp_path))
    assert c.counts() == dict(finished=2, diverged=3, failed=1, running=0, incomplete=1, missing=1)
    assert "unigram entropy" in c.runs[6].reason
    with open(tmp_path / "fit_table.csv") as f:
        lines = f.read().splitlines()
    assert lines[0] == ("n_once,n_rec,r,tokens,loss,run,variant,flops,seed,n_adapter,tokens_per_param,vocab_size,"
                        "skipped_steps,tokens_by_dataset")
    # flops: the budget, for iso-FLOP groups; 100 tokens / 3 parameters; vocab 320 from the config
    assert lines[1] == f"1,2,1,100,3.0,{names[0]},baseline,300000000.0,1337,0,33.333,320,0,{{}}"
    with open(tmp_path / "test_time.csv") as f:
        curves = f.read().splitlines()
    assert curves[0] == "run,variant,r,r_test,loss,n_once,n_rec,tokens,flops"
    assert curves[1:] == [f"{names[0]},baseline,1,1,3.0,1,2,100,300000000.0",
                          f"{names[0]},baseline,1,2,3.5,1,2,100,300000000.0"]
    assert main(["sweep", "collect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["diverged"] == 3 and names[4] in report["runs"]["failed"]


@pytest.mark.slow
def test_tiny_sweep_end_to_end_with_crash_and_resume(tmp_path, monkeypatch, capsys):
    """Contract: plan -> run -> collect on a 2-run sweep. A run killed mid-training is recorded in
    runs/NAME/FAILED and the sweep goes on; the next `sweep run` resumes it from its last checkpoint,
    trains what is left (here 2 runs at a time) and skips what is finished; collect writes one fit-table row per run with the
    manifest's accounting and the run's validation loss; `megaloop fit` reads the sweep directory."""
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus)
    sweep = _tiny_sweep()
    sweep["base"].update(
        optim={"name": "muon", "lr": 0.02, "warmup_steps": 1},
        train={"micro_batch_size": 4, "log_every": 1, "eval_tokens": 256, "save_every": 2, "progress": False},
        data={"corpus": [str(corpus)], "cache_dir": str(tmp_path / "cache"), "workers": 1})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(sweep))
    out = str(tmp_path / "sweep")
    assert main(["sweep", "plan", str(tmp_path / "tiny.yaml"), "--out", out]) == 0
    rows = read_manifest(out)["runs"]
    assert [r["steps"] for r in rows] == [5, 5] and rows[0]["run"] == "baseline_r1_s2_c3e8"

    monkeypatch.setenv("MEGALOOP_FAULT", "step:3")  # SIGKILL after step 3; the checkpoint of step 2 survives
    rep = run_sweep(out, only="*_r1_*", log=lambda *a: None)
    assert rep.failed == ["baseline_r1_s2_c3e8"] and rep.finished == []
    assert "exit status -9" in open(os.path.join(out, "runs", rows[0]["run"], "FAILED")).read()
    monkeypatch.delenv("MEGALOOP_FAULT")

    assert main(["sweep", "run", out, "--jobs", "2"]) == 0  # resume one run while training the other
    assert "2 trained, 0 already finished, 0 failed" in capsys.readouterr().out
    log = open(os.path.join(out, "runs", rows[0]["run"], "train.log")).read()
    assert "resumed from" in log and "step_00000002" in log
    assert not os.path.exists(os.path.join(out, "runs", rows[0]["run"], "FAILED"))
    rep = run_sweep(out, log=lambda *a: None)
    assert rep.skipped == [r["run"] for r in rows] and not rep.finished

    c = collect(out)
    assert c.counts()["finished"] == 2
    import csv
    with open(os.path.join(out, "fit_table.csv")) as f:
        table = list(csv.DictReader(f))
    for row, t in zip(rows, table):
        s = json.load(open(os.path.join(out, "runs", row["run"], "summary.json")))
        assert t["run"] == row["run"] and t["variant"] == "baseline" and int(t["r"]) == row["r"]
        assert (int(t["n_once"]), int(t["n_rec"])) == (row["n_once"], row["n_rec"])
        assert int(t["tokens"]) == row["steps"] * row["tokens_per_step"] == s["tokens"]
        assert float(t["loss"]) == s["val_loss"] and s["flops_per_token"] == row["flops_per_token"]
    try:
        import megaloop.analysis.cli  # noqa: F401
    except ImportError:
        return  # the fitter lands separately; the table above is its input
    capsys.readouterr()
    assert main(["fit", out, "--json"]) in (0, 2)  # 2 runs cannot identify the law; it must say so cleanly
    assert "Traceback" not in capsys.readouterr().err


def test_run_selects_by_pattern_and_count_without_training(tmp_path):
    """Contract: `sweep run --only GLOB[,GLOB] --max-runs N --dry-run` picks the matching unfinished
    runs in manifest order, at most N of them, and launches nothing; finished runs are skipped."""
    spec = parse_sweep(_tiny_sweep(r=[1, 2], budgets=[{"flops": 3e8, "sizes": [2, 3]}]))
    write_plan(spec, expand(spec, str(tmp_path)), str(tmp_path))
    (tmp_path / "runs" / "baseline_r2_s2_c3e8" / "summary.json").write_text("{}")
    lines = []
    rep = run_sweep(str(tmp_path), only="*_r2_*,*_s3_*", max_runs=5, dry_run=True, log=lines.append)
    assert rep.skipped == ["baseline_r2_s2_c3e8"] and not rep.finished and not rep.failed
    launched = [ln.split(":")[0].split()[-1] for ln in lines[1:]]
    assert launched == ["baseline_r1_s3_c3e8", "baseline_r2_s3_c3e8"]
    assert all("--resume" in ln for ln in lines[1:])
    lines.clear()
    run_sweep(str(tmp_path), max_runs=1, dry_run=True, log=lines.append)
    assert len(lines) == 2 and "baseline_r1_s2_c3e8" in lines[1]
    assert not any((tmp_path / "runs" / n / "train.log").exists() for n in os.listdir(tmp_path / "runs"))


def test_runs_held_by_another_training_are_busy_not_failed(tmp_path):
    """Contract: a run whose directory lock is held by a live process (another `sweep run`, an array
    task, a machine sharing the folder) is skipped by `sweep run` as busy, with no FAILED note, and
    `sweep collect` reports it as running, naming the holder."""
    import sys
    spec = parse_sweep(_tiny_sweep(r=[1]))
    write_plan(spec, expand(spec, str(tmp_path)), str(tmp_path))
    name = read_manifest(str(tmp_path))["runs"][0]["run"]
    run_dir = str(tmp_path / "runs" / name)
    script = ("import sys; from megaloop.run_lock import RunLock; l = RunLock.acquire(sys.argv[1]); "
              "print('held', flush=True); sys.stdin.read(); l.release()")
    holder = subprocess.Popen([sys.executable, "-c", script, run_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lines = []
        rep = run_sweep(str(tmp_path), log=lines.append)
        assert rep.busy == [name] and not rep.failed and not rep.finished
        assert f"being trained by pid {holder.pid}" in "\n".join(lines)
        assert not os.path.exists(os.path.join(run_dir, "FAILED"))
        from megaloop.sweep.collect import run_status
        st = run_status(str(tmp_path), read_manifest(str(tmp_path))["runs"][0])
        assert st.status == "running" and f"pid {holder.pid}" in st.reason
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
