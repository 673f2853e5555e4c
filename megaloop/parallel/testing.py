"""Start N local ranks of a megaloop command, the way torchrun does: for tests and benchmarks.

`spawn(2, ["train", "cfg.yaml"])` runs `python -m megaloop.cli train cfg.yaml` as ranks 0 and 1
with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (a free port on this host),
one thread each, DeepSpeed on its CPU accelerator; gloo carries the collectives on CPU. The
ranks run the user's command itself, so what the tests check is what users run. This module
only starts processes; it imports nothing of megaloop.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Optional

# Launcher variables a parent process may carry (a test run under torchrun or SLURM): a rank
# spawned here must see only its own.
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int, env: Optional[dict] = None) -> dict:
    """The environment of rank `rank` of `nproc` (torchrun's variables), over os.environ and `env`."""
    e = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    e.update(env or {})
    e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
             PYTHONUNBUFFERED="1")
    return e


def spawn(nproc: int, args: list[str], timeout: float = 300, env: Optional[dict] = None,
          module: Optional[str] = "megaloop.cli") -> list[subprocess.CompletedProcess]:
    """Run `python -m MODULE ARGS` (module None: `python ARGS`) as `nproc` ranks (one process: no
    rank variables at all, as a user starts it) and wait for all of them; past `timeout` every
    rank is killed (return code -9). Each result holds that rank's output (stdout and stderr)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        if nproc == 1:
            e = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
            e.update(env or {}, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        else:
            e = rank_env(rank, nproc, port, env)
        cmd = [sys.executable, *(["-m", module] if module else []), *args]
        procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    done = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            done.append(subprocess.CompletedProcess(p.args, -9, out, ""))
            continue
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    return done
