"""One failed rank ends every rank quickly (megaloop/parallel/failfast.py).

Contract: `megaloop train` on 2 ranks (gloo, started directly like `srun` does, so no launcher
kills the survivors for us), with a failure injected on rank 1 only, ends both ranks within 60 s
of the failure (measured here, printed with -s); rank 0 prints one error line that names rank 1
and its error, without a traceback; both exit non-zero; and `latest` still names the last
complete checkpoint (step 2), which loads, while the checkpoint being saved when rank 1 failed
(step 4) is never published. Cases: an exception mid-step, an exception mid-save (rank 0 is then
inside the save's gathers), and SIGKILL mid-save (no message: the survivor names the rank that
did not answer its roll call). Before the watchdog, the first two hung until the process-group
timeout (600 s). All three jobs run at once to keep the test short.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import yaml

from conftest import tiny_raw
from megaloop import checkpoint as ckpt
from megaloop.config import load_config
from megaloop.data.prepare import ensure_prepared
from megaloop.parallel.dcp_state import read_weights
from megaloop.parallel.testing import free_port
from test_parallel_errors import RANK_VARS
import pytest

pytestmark = pytest.mark.slow  # multi-process (gloo process groups)

BOUND_S = 60
CASES = {  # name: (MEGALOOP_FAULT, words rank 0's error line must hold)
    "error_mid_step": ("step_error:3@1", ["rank 1 failed", "injected failure (step_error at step 3"]),
    "error_mid_save": ("save_error:4@1", ["rank 1 failed", "injected failure (save_error at step 4"]),
    "killed_mid_save": ("save:4@1", ["rank 1 stopped without a message"]),
}


def _launch(cfg_path, run_dir, fault, port, log_dir):
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", MEGALOOP_FAULT=fault, PYTHONUNBUFFERED="1")
        out = open(os.path.join(log_dir, f"rank{rank}.log"), "w")
        cmd = [sys.executable, "-m", "megaloop.cli", "train", str(cfg_path), "--set", f"train.run_dir={run_dir}"]
        procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), out))
    return procs


def test_one_failed_rank_ends_every_rank_quickly(tiny_corpus, data_cache, tmp_path):
    raw = tiny_raw(tiny_corpus, data_cache, str(tmp_path / "unused"), steps=8, save_every=2, device="cpu")
    ensure_prepared(load_config(raw=raw).data, raw["model"]["vocab_size"], log=lambda *a: None)  # ranks only read it
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    jobs = {}
    for name, (fault, _) in CASES.items():
        (tmp_path / name).mkdir()
        jobs[name] = _launch(cfg_path, tmp_path / name / "run", fault, free_port(), tmp_path / name)
    exited: dict = {}
    deadline = time.time() + 300
    while len(exited) < 2 * len(jobs) and time.time() < deadline:
        for name, procs in jobs.items():
            for rank, (p, _) in enumerate(procs):
                if (name, rank) not in exited and p.poll() is not None:
                    exited[(name, rank)] = time.time()
        time.sleep(0.1)
    for procs in jobs.values():
        for p, out in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            out.close()
    failures, report = [], {}
    for name, (fault, words) in CASES.items():
        logs = [(tmp_path / name / f"rank{r}.log").read_text() for r in range(2)]
        if any((name, r) not in exited for r in range(2)):
            failures.append(f"{name}: a rank was still running after 300 s:\n{logs[0][-1500:]}")
            continue
        m = re.search(r"megaloop fault: \S+ at step \d+, time ([\d.]+)", logs[1])
        failed_at = float(m.group(1)) if m else exited[(name, 1)]  # SIGKILL prints nothing: its exit time
        report[name] = round(max(exited[(name, 0)], exited[(name, 1)]) - failed_at, 2)
        codes = [p.returncode for p, _ in jobs[name]]
        errors = [ln for ln in logs[0].splitlines() if "error:" in ln]
        run = str(tmp_path / name / "run")
        latest = ckpt.latest_path(run)
        problems = []
        if report[name] > BOUND_S:
            problems.append(f"took {report[name]} s")
        if 0 in codes:
            problems.append(f"exit codes {codes}")
        if len(errors) != 1 or not all(w in errors[0] for w in words) or "Traceback" in logs[0]:
            problems.append(f"rank 0 output:\n{logs[0][-2000:]}")
        if latest is None or not latest.endswith("step_00000002") or ckpt.list_complete(run) != [2]:
            problems.append(f"latest {latest}, complete {ckpt.list_complete(run)}")
        else:
            read_weights(latest)
            ckpt.load_file(latest, "trainer.pt")
        if problems:
            failures.append(f"{name}: " + "; ".join(problems) + f"\nrank 1 output:\n{logs[1][-1500:]}")
    print(f"seconds from the failure on rank 1 to the exit of the last rank: {report}")
    assert not failures, "\n\n".join(failures)
