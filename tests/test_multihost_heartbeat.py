"""A rank that stops answering without closing anything ends the job (megaloop/parallel/failfast.py).

The single-host stand-in for a host cut off from the network (tests/test_multihost.py cuts a
real link, where root and network namespaces exist): rank 1 of a 2-rank `megaloop train`
(started directly, as `srun` does) is frozen with SIGSTOP after step 3, so its sockets stay open
and its watchdog stops beating, and rank 0 waits inside a collective that would last until the
process-group timeout (600 s). Contract: rank 0 exits non-zero within 60 s of the freeze, its
one error line names rank 1 and its host ("stopped answering on host ..."), and `latest` still
names the complete checkpoint of step 2, which loads.
"""
from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import yaml

from conftest import tiny_raw
from megaloop import checkpoint as ckpt
from megaloop.config import load_config
from megaloop.data.prepare import ensure_prepared
from megaloop.parallel.dcp_state import read_weights
from megaloop.parallel.testing import free_port
from test_rank_failure import _launch

BOUND_S = 60


@pytest.mark.slow
def test_frozen_rank_is_found_by_its_missing_heartbeat(tiny_corpus, data_cache, tmp_path):
    raw = tiny_raw(tiny_corpus, data_cache, str(tmp_path / "unused"), steps=8, save_every=2, device="cpu")
    ensure_prepared(load_config(raw=raw).data, raw["model"]["vocab_size"], log=lambda *a: None)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    os.environ["MEGALOOP_FAULT_RELEASE"] = str(tmp_path / "never")  # inherited by the ranks; removed below
    try:
        procs = _launch(cfg_path, tmp_path / "run", "pause:3@1", free_port(), tmp_path)
    finally:
        del os.environ["MEGALOOP_FAULT_RELEASE"]
    (r0, out0), (r1, out1) = procs
    try:
        deadline = time.time() + 180
        while "step_pause at step 3" not in (tmp_path / "rank1.log").read_text():
            assert time.time() < deadline and r0.poll() is None and r1.poll() is None, \
                (tmp_path / "rank0.log").read_text()[-2000:] + (tmp_path / "rank1.log").read_text()[-2000:]
            time.sleep(0.1)
        r1.send_signal(signal.SIGSTOP)
        t0 = time.time()
        while r0.poll() is None and time.time() - t0 < BOUND_S + 30:
            time.sleep(0.1)
        took = time.time() - t0
    finally:
        for p, out in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            out.close()
    log0 = (tmp_path / "rank0.log").read_text()
    print(f"seconds from freezing rank 1 to rank 0's exit: {took:.1f}")
    assert took <= BOUND_S and r0.returncode not in (0, None), f"{took:.1f} s, exit {r0.returncode}:\n{log0[-3000:]}"
    errors = [ln for ln in log0.splitlines() if "error:" in ln]
    assert len(errors) == 1 and f"rank 1 stopped answering on host {socket.gethostname()}" in errors[0], log0[-3000:]
    run = str(tmp_path / "run")
    assert ckpt.list_complete(run) == [2] and ckpt.latest_path(run).endswith("step_00000002")
    read_weights(ckpt.latest_path(run))
