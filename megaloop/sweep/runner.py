"""`megaloop sweep run`: the manifest's runs on this machine, one after another.

Each run is its own `python -m megaloop.cli train CONFIG --resume` process, so a crash, a
divergence or an out-of-memory kill costs one run, not the sweep: it is recorded in
DIR/runs/NAME/FAILED (exit status and the error line) and the sweep goes on. Idempotent: a run
with a summary.json is skipped, a run that died resumes from its last complete checkpoint.
A lock file per run lets several `sweep run` processes (or machines sharing the folder) work
through one sweep without training the same run twice.
"""
from __future__ import annotations

import fnmatch
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .plan import read_manifest

LOCK = ".sweep_lock"


@dataclass
class RunReport:
    finished: list[str] = field(default_factory=list)    # trained by this call
    skipped: list[str] = field(default_factory=list)     # already had a summary.json
    busy: list[str] = field(default_factory=list)        # locked by another live sweep process
    failed: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def select(rows: list[dict], only: Optional[str]) -> list[dict]:
    """Rows whose run name matches one of the comma-separated glob patterns in `only`."""
    if not only:
        return rows
    pats = [p.strip() for p in only.split(",") if p.strip()]
    return [r for r in rows if any(fnmatch.fnmatchcase(r["run"], p) for p in pats)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(run_dir: str) -> bool:
    """Create the run's lock; a lock left by a dead process on this host is taken over."""
    path = os.path.join(run_dir, LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = open(path).read().split()
            except (OSError, ValueError):
                host, pid = "", "0"
            if host == socket.gethostname() and not _pid_alive(int(pid)):
                os.remove(path)
                continue
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
        return True
    return False


def _release_lock(run_dir: str) -> None:
    try:
        os.remove(os.path.join(run_dir, LOCK))
    except FileNotFoundError:
        pass


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


def run_sweep(sweep_dir: str, only: Optional[str] = None, max_runs: Optional[int] = None,
              overrides: Optional[list[str]] = None, dry_run: bool = False, log: Callable = print) -> RunReport:
    manifest = read_manifest(sweep_dir)
    rows = select(manifest["runs"], only)
    workdir = manifest.get("workdir")
    cwd = workdir if workdir and os.path.isdir(workdir) else os.getcwd()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    report, launched, start = RunReport(), 0, time.perf_counter()
    log(f"sweep {manifest.get('name', '')}: {len(rows)} run(s) selected of {len(manifest['runs'])} in {sweep_dir}")
    for i, row in enumerate(rows, 1):
        name = row["run"]
        run_dir = os.path.join(sweep_dir, "runs", name)
        tag = f"[{i}/{len(rows)}] {name}"
        if os.path.isfile(os.path.join(run_dir, "summary.json")):
            report.skipped.append(name)
            continue
        if max_runs is not None and launched >= max_runs:
            break
        cmd = train_command(sweep_dir, row, overrides or [])
        if dry_run:
            log(f"{tag}: {' '.join(cmd)}")
            launched += 1
            continue
        os.makedirs(run_dir, exist_ok=True)
        if not _take_lock(run_dir):
            log(f"{tag}: being trained by another sweep process; skipping")
            report.busy.append(name)
            continue
        launched += 1
        log_path = os.path.join(run_dir, "train.log")
        t0 = time.perf_counter()
        try:
            if os.path.exists(os.path.join(run_dir, "FAILED")):
                os.remove(os.path.join(run_dir, "FAILED"))
            resumed = os.path.isdir(os.path.join(run_dir, "checkpoints"))
            log(f"{tag}: r={row['r']} d_model={row['d_model']} {row['steps']} steps"
                + (" (resuming)" if resumed else "") + " ...")
            with open(log_path, "a") as out:
                out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
                out.flush()
                rc = subprocess.call(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
            secs = time.perf_counter() - t0
            summary_path = os.path.join(run_dir, "summary.json")
            if rc == 0 and os.path.isfile(summary_path):
                with open(summary_path) as f:
                    loss = json.load(f).get("val_loss")
                log(f"{tag}: done in {secs:.1f} s, val_loss {loss:.4f}")
                report.finished.append(name)
            else:
                err = _error_line(log_path)
                with open(os.path.join(run_dir, "FAILED"), "w") as f:
                    f.write(f"exit status {rc} after {secs:.1f} s\n{err}\nlog: {log_path}\n")
                log(f"{tag}: FAILED (exit {rc}): {err}")
                report.failed.append(name)
        finally:
            _release_lock(run_dir)
    report.wall_s = time.perf_counter() - start
    return report
