"""`megaloop sweep run`: the manifest's runs on this machine.

Each run is its own `python -m megaloop.cli train CONFIG --resume` process, so a crash, a
divergence or an out-of-memory kill costs one run, not the sweep: it is recorded in
DIR/runs/NAME/FAILED (exit status and the error line) and the sweep goes on. Idempotent: a run
with a summary.json is skipped, a run that died resumes from its last complete checkpoint.

`jobs` runs several trainings at once, each pinned to cores / jobs torch threads: on a small CPU,
two single-threaded runs beat one two-threaded run (tiny matmuls scale badly across threads,
and busy cores make multi-threaded OpenMP wait on each other). Every training holds its run
directory's lock (megaloop/run_lock.py), so several `sweep run` processes, SLURM arrays, or machines
sharing the folder work through one sweep without training the same run twice: a run whose lock is
held is skipped as busy, and a training that loses the race to start exits with RunDirBusy's status,
which counts as busy too, not as a failure.
"""
from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..run_lock import RunDirBusy, holder
from .branch import is_branch, seed as seed_branch
from .plan import read_manifest

@dataclass
class RunReport:
    finished: list[str] = field(default_factory=list)    # trained by this call
    skipped: list[str] = field(default_factory=list)     # already had a summary.json
    busy: list[str] = field(default_factory=list)        # locked by another live sweep process
    failed: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)     # branches whose trunk has not reached them
    wall_s: float = 0.0


def select(rows: list[dict], only: Optional[str]) -> list[dict]:
    """Rows whose run name matches one of the comma-separated glob patterns in `only`."""
    if not only:
        return rows
    pats = [p.strip() for p in only.split(",") if p.strip()]
    return [r for r in rows if any(fnmatch.fnmatchcase(r["run"], p) for p in pats)]


def train_command(sweep_dir: str, row: dict, overrides: list[str]) -> list[str]:
    run_dir = os.path.abspath(os.path.join(sweep_dir, "runs", row["run"]))
    cmd = [sys.executable, "-m", "megaloop.cli", "train", os.path.join(run_dir, "config.yaml"), "--resume",
           "--set", f"train.run_dir={run_dir}", "--set", "train.progress=false"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _error_line(log_path: str) -> str:
    """The CLI's one-line user error if there is one, else the last line of the log."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.rstrip() for ln in f.readlines()[-200:] if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if ": error:" in ln or "Error" in ln or "Killed" in ln:
            return ln
    return lines[-1] if lines else ""


@dataclass
class _Active:
    name: str
    run_dir: str
    tag: str
    proc: subprocess.Popen
    log_file: object
    start: float


def _finish(job: _Active, rc: int, report: RunReport, log: Callable) -> None:
    job.log_file.close()
    secs = time.perf_counter() - job.start
    summary_path = os.path.join(job.run_dir, "summary.json")
    log_path = os.path.join(job.run_dir, "train.log")
    if rc == 0 and os.path.isfile(summary_path):
        with open(summary_path) as f:
            loss = json.load(f).get("val_loss")
        log(f"{job.tag}: done in {secs:.1f} s, val_loss {loss:.4f}")
        report.finished.append(job.name)
    elif rc == RunDirBusy.exit_status:  # another process started it first: not a failure
        log(f"{job.tag}: being trained by another process; skipping ({_error_line(log_path)})")
        report.busy.append(job.name)
    else:
        err = _error_line(log_path)
        with open(os.path.join(job.run_dir, "FAILED"), "w") as f:
            f.write(f"exit status {rc} after {secs:.1f} s\n{err}\nlog: {log_path}\n")
        log(f"{job.tag}: FAILED (exit {rc}): {err}")
        report.failed.append(job.name)


def run_sweep(sweep_dir: str, only: Optional[str] = None, max_runs: Optional[int] = None,
              overrides: Optional[list[str]] = None, dry_run: bool = False, jobs: int = 1,
              log: Callable = print) -> RunReport:
    manifest = read_manifest(sweep_dir)
    rows = select(manifest["runs"], only)
    workdir = manifest.get("workdir")
    cwd = workdir if workdir and os.path.isdir(workdir) else os.getcwd()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    overrides = list(overrides or [])
    if jobs > 1 and not any(o.startswith("train.threads=") for o in overrides):
        overrides.append(f"train.threads={max(1, (os.cpu_count() or 1) // jobs)}")
        env.setdefault("OMP_NUM_THREADS", overrides[-1].split("=")[1])
    report, launched, start = RunReport(), 0, time.perf_counter()
    active: list[_Active] = []
    log(f"sweep {manifest.get('name', '')}: {len(rows)} run(s) selected of {len(manifest['runs'])} in {sweep_dir}"
        + (f", {jobs} at a time" if jobs > 1 else ""))
    # trunks and plain runs first: a branch starts from its trunk's checkpoint (megaloop/sweep/branch.py)
    pending = [(i, r) for i, r in enumerate(rows, 1) if not is_branch(r)] + \
              [(i, r) for i, r in enumerate(rows, 1) if is_branch(r)]
    try:
        while pending or active:
            deferred: list = []  # branches whose trunk is still training here
            # start runs while there is a free slot
            while pending and len(active) < jobs and (max_runs is None or launched < max_runs):
                i, row = pending.pop(0)
                name = row["run"]
                run_dir = os.path.join(sweep_dir, "runs", name)
                tag = f"[{i}/{len(rows)}] {name}"
                if os.path.isfile(os.path.join(run_dir, "summary.json")):
                    report.skipped.append(name)
                    continue
                if is_branch(row) and not dry_run:
                    state = seed_branch(sweep_dir, row)
                    if state == "waiting":
                        trunk = row["branch_from"]
                        if any(j.name == trunk for j in active) or any(r["run"] == trunk for _, r in pending + deferred):
                            deferred.append((i, row))
                            continue
                        log(f"{tag}: waits for its trunk {trunk} to reach step {row['branch_step']} (train the trunk "
                            f"first: it is not finished and not in this call's selection)")
                        report.waiting.append(name)
                        continue
                    if state == "seeded":
                        log(f"{tag}: branches from {row['branch_from']} at step {row['branch_step']}")
                cmd = train_command(sweep_dir, row, overrides)
                if dry_run:
                    log(f"{tag}: {' '.join(cmd)}")
                    launched += 1
                    continue
                os.makedirs(run_dir, exist_ok=True)
                busy = holder(run_dir)
                if busy is not None:
                    log(f"{tag}: being trained by {busy.describe()}; skipping")
                    report.busy.append(name)
                    continue
                launched += 1
                if os.path.exists(os.path.join(run_dir, "FAILED")):
                    os.remove(os.path.join(run_dir, "FAILED"))
                resumed = os.path.isdir(os.path.join(run_dir, "checkpoints"))
                log(f"{tag}: r={row['r']} d_model={row['d_model']} {row['steps']} steps"
                    + (" (resuming)" if resumed else "") + " ...")
                out = open(os.path.join(run_dir, "train.log"), "a")
                out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
                out.flush()
                try:
                    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
                except OSError:
                    out.close()
                    raise
                active.append(_Active(name, run_dir, tag, proc, out, time.perf_counter()))
            pending = deferred + pending
            if not active:
                if not pending or (max_runs is not None and launched >= max_runs):
                    break
                continue
            time.sleep(0.2)
            for job in [j for j in active if j.proc.poll() is not None]:
                active.remove(job)
                _finish(job, job.proc.returncode, report, log)
    except KeyboardInterrupt:
        # children got the same SIGINT from the terminal; wait so their locks are released cleanly
        for job in active:
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()
            job.log_file.close()
        raise
    report.wall_s = time.perf_counter() - start
    return report
