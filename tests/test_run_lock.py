"""One writer per run directory: a second training on a held run directory stops at once, naming
the holder; a lock left by a dead process is taken over; checkpoint errors name their real cause."""
import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from conftest import tiny_raw
from megaloop import checkpoint as ckpt
from megaloop.config import load_config
from megaloop.run_lock import LOCK_NAME, Holder, RunDirBusy, RunLock, holder
from megaloop.train import train


def _train_cmd(cfg_path, resume=False):
    return [sys.executable, "-m", "megaloop.cli", "train", str(cfg_path)] + (["--resume"] if resume else [])


def _wait_for(pred, timeout=120, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_second_training_on_one_run_dir_exits_at_once(tiny_corpus, data_cache, tmp_path):
    """Contract: while a training holds RUN_DIR (here paused after step 3, checkpoint of step 2 on
    disk), a second `megaloop train --resume` on it exits within seconds of reaching the lock with
    status 75 and one line naming the holder (pid, host, start time) and what to do, and changes
    nothing; the first run then finishes intact: metrics.jsonl has steps 1..8 once each, the same
    losses as a run trained alone, a summary and a final checkpoint; the lock file is emptied."""
    run = str(tmp_path / "run")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(tiny_corpus, data_cache, run, steps=8, save_every=2)))
    release = tmp_path / "release"
    env = dict(os.environ, MEGALOOP_FAULT="pause:3", MEGALOOP_FAULT_RELEASE=str(release))
    first = subprocess.Popen(_train_cmd(cfg), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics_path = os.path.join(run, "metrics.jsonl")
        _wait_for(lambda: os.path.isfile(metrics_path) and len(open(metrics_path).read().splitlines()) >= 3
                  or first.poll() is not None, what="the first run to reach step 3")
        assert first.poll() is None, first.stdout.read()
        h = holder(run)
        assert h is not None and h.pid == first.pid and h.host == socket.gethostname()
        before = open(metrics_path).read()
        env2 = {k: v for k, v in env.items() if not k.startswith("MEGALOOP_FAULT")}
        t0 = time.monotonic()
        second = subprocess.run(_train_cmd(cfg, resume=True), env=env2, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert second.returncode == RunDirBusy.exit_status, second.stderr[-2000:]
        err = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and "Traceback" not in second.stderr, second.stderr
        for part in (f"pid {first.pid}", f"host {socket.gethostname()}", f"started {h.started}", "Wait for it",
                     "--resume", "train.run_dir"):
            assert part in err[0], err[0]
        assert took < 60, took  # startup (imports, data) plus at most ACQUIRE_RETRY_S at the lock
        assert open(metrics_path).read() == before
        release.write_text("go")
        out, _ = first.communicate(timeout=300)
        assert first.returncode == 0, out[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    steps = [m["step"] for m in map(json.loads, open(metrics_path)) if "loss" in m]
    assert steps == list(range(1, 9))
    alone = str(tmp_path / "alone")
    train(load_config(raw=tiny_raw(tiny_corpus, data_cache, alone, steps=8, save_every=2)), log=lambda *a: None)
    loss = lambda d: [m["loss"] for m in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "loss" in m]  # noqa: E731
    assert loss(run) == loss(alone)
    assert json.load(open(os.path.join(run, "summary.json")))["steps"] == 8
    assert ckpt.latest_path(run).endswith("step_00000008")
    assert open(os.path.join(run, LOCK_NAME)).read() == "" and holder(run) is None


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_stale_lock_of_a_dead_process_is_taken_over(tiny_corpus, data_cache, tmp_path):
    """Contract: a lock file naming a process of this host that no longer runs (killed before it
    could release) does not block a training: it is taken over with a note naming the dead holder,
    the run trains, and at the end the lock is released (file emptied, nobody holds it)."""
    run = tmp_path / "run"
    run.mkdir()
    dead = Holder(socket.gethostname(), _dead_pid(), "2026-01-01 00:00:00 UTC", None)
    (run / LOCK_NAME).write_text(dead.dump())
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(tiny_corpus, data_cache, str(run), steps=2)))
    proc = subprocess.run(_train_cmd(cfg), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"taking over the stale lock of {run}: pid {dead.pid} on host {dead.host}" in proc.stdout
    assert "is no longer running" in proc.stdout
    assert os.path.isfile(run / "summary.json")
    assert (run / LOCK_NAME).read_text() == "" and holder(str(run)) is None


def test_lock_semantics_across_processes(tmp_path):
    """Contract: a live holder in another process makes RunLock.acquire raise RunDirBusy naming it
    (after at most the retry window) and `holder()` report it, without disturbing it; a lock whose
    file names another host but whose flock is free is taken over with a note; release empties it."""
    run = str(tmp_path)
    script = ("import sys, time; from megaloop.run_lock import RunLock; l = RunLock.acquire(sys.argv[1]); "
              "print('held', flush=True); sys.stdin.read(); l.release()")
    p = subprocess.Popen([sys.executable, "-c", script, run], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        h = holder(run)
        assert h is not None and h.pid == p.pid
        with pytest.raises(RunDirBusy, match=f"pid {p.pid} on host {socket.gethostname()}.*kill {p.pid}"):
            RunLock.acquire(run, log=lambda *a: None)
        assert holder(run).pid == p.pid  # the refused attempt changed nothing
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    assert p.returncode == 0 and holder(run) is None
    other = Holder("node-elsewhere", 4242, "2026-01-01 00:00:00 UTC", "77_3")
    with open(os.path.join(run, LOCK_NAME), "w") as f:
        f.write(other.dump())
    notes = []
    lock = RunLock.acquire(run, log=notes.append)
    assert len(notes) == 1 and "left by pid 4242 on host node-elsewhere" in notes[0] and "SLURM job 77_3" in notes[0]
    assert Holder.parse(open(os.path.join(run, LOCK_NAME)).read()).pid == os.getpid()
    lock.release()
    assert open(os.path.join(run, LOCK_NAME)).read() == ""


@pytest.mark.parametrize("err, cause, fix", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/model.pt"), "No space left on device (ENOSPC): /x/model.pt",
     "free disk space"),
    (OSError(errno.ENOENT, "No such file or directory", "/x/.tmp_step/model.pt"), "(ENOENT)",
     "no other process writes to this run directory"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system (EROFS)", "writable file system"),
])
def test_checkpoint_write_errors_name_their_cause(tmp_path, err, cause, fix):
    """Contract: a checkpoint that cannot be written says why (strerror, errno name, path) and the
    fix for that cause, not a generic disk-space hint; the previous checkpoint stays intact."""
    run = str(tmp_path)
    ckpt.save(run, 1, lambda p: open(os.path.join(p, "model.pt"), "w").close(), meta={}, keep=2)

    def failing(path):
        raise err
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.save(run, 2, failing, meta={}, keep=2)
    msg = str(info.value)
    assert cause in msg and fix in msg and "previous checkpoint is intact" in msg
    if err.errno != errno.ENOSPC:
        assert "disk space" not in msg
    assert ckpt.list_complete(run) == [1] and ckpt.latest_path(run).endswith("step_00000001")
