"""Crash safety: SIGKILL at random points (mid-step and mid-checkpoint-write), a full disk."""
import errno
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import tiny_raw
from megaloop import checkpoint as ckpt
from megaloop.config import load_config
from megaloop.parallel.dcp_state import read_weights
from megaloop.train import train
from test_train import losses

pytestmark = pytest.mark.slow  # multi-process (gloo process groups)

STEPS, SAVE_EVERY = 12, 2


def run_cli(cfg_path, fault=None, resume=False):
    env = dict(os.environ)
    env.pop("MEGALOOP_FAULT", None)
    if fault:
        env["MEGALOOP_FAULT"] = fault
    cmd = [sys.executable, "-m", "megaloop.cli", "train", str(cfg_path)] + (["--resume"] if resume else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("seed", [0])
def test_sigkill_anywhere_then_resume_is_bitwise(tiny_corpus, data_cache, tmp_path, seed):
    """Contract: killing training with SIGKILL at random points, including in the middle of
    writing a checkpoint, and resuming each time, gives the same loss curve bit for bit as an
    uninterrupted run; `latest` always names a complete checkpoint and every checkpoint on disk
    loads; no more than keep_checkpoints are kept."""
    full = str(tmp_path / "full")
    train(load_config(raw=tiny_raw(tiny_corpus, data_cache, full, steps=STEPS, save_every=SAVE_EVERY)),
          log=lambda *a: None)
    run = str(tmp_path / "killed")
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_raw(tiny_corpus, data_cache, run, steps=STEPS, save_every=SAVE_EVERY)))
    rng = random.Random(seed)
    # three kills in increasing order: one mid-checkpoint-write, two mid-training
    save_kill = rng.choice(range(SAVE_EVERY, STEPS, SAVE_EVERY))
    step_kills = sorted(rng.sample([s for s in range(1, STEPS) if s != save_kill], 2))
    faults = sorted([("save", save_kill)] + [("step", s) for s in step_kills], key=lambda f: f[1])
    resume = False
    done_up_to = 0
    for point, step in faults:
        if step <= done_up_to:
            continue
        proc = run_cli(cfg_path, f"{point}:{step}", resume)
        assert proc.returncode == -9, proc.stderr[-3000:]
        latest = ckpt.latest_path(run)
        if latest:
            assert os.path.isfile(os.path.join(latest, "meta.json"))
            done_up_to = ckpt.read_meta(latest)["step"]
            assert done_up_to < step or point == "step"
        for s in ckpt.list_complete(run):  # nothing on disk is corrupt
            read_weights(os.path.join(ckpt.ckpt_root(run), ckpt.step_dir_name(s)))
        resume = True
    proc = run_cli(cfg_path, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run) == losses(full)
    assert len(ckpt.list_complete(run)) <= 2
    a = read_weights(ckpt.latest_path(full))
    b = read_weights(ckpt.latest_path(run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [n for n in os.listdir(ckpt.ckpt_root(run)) if n.startswith(".tmp_")]


@pytest.mark.parametrize("where", ["state", "trainer"])
def test_full_disk_keeps_previous_checkpoint(tiny_corpus, data_cache, tmp_path, monkeypatch, where):
    """Contract: a save that fails with ENOSPC (while DCP writes the model and optimiser state, or
    while trainer.pt is written) leaves the previous checkpoint intact and named by `latest`,
    removes its partial files, and says so; the run stops with a clear error."""
    from megaloop.errors import UserError
    real_save, real_fsync = ckpt.torch_save_synced, os.fsync

    def flaky_save(obj, path):
        if "step_00000004" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path)

    def flaky_fsync(fd):  # the disk fills while DCP's files of step 4 are flushed
        if "step_00000004/state" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    if where == "trainer":
        monkeypatch.setattr(ckpt, "torch_save_synced", flaky_save)
    else:
        monkeypatch.setattr(os, "fsync", flaky_fsync)
    run = str(tmp_path / "run")
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        train(load_config(raw=tiny_raw(tiny_corpus, data_cache, run, steps=6, save_every=2)), log=lambda *a: None)
    assert ckpt.list_complete(run) == [2]
    assert ckpt.latest_path(run).endswith("step_00000002")
    read_weights(ckpt.latest_path(run))
    assert not [n for n in os.listdir(ckpt.ckpt_root(run)) if n.startswith(".tmp_")]


def test_async_save_killed_mid_write_is_never_published(tiny_corpus, data_cache, tmp_path):
    """Contract: with train.async_save, a SIGKILL while a checkpoint is being written in the
    background leaves `latest` at the previous complete checkpoint (the one in flight is never
    published; its temporary folder goes at the next save). Resumed, the run's loss curve, its
    final weights and the checkpoints it publishes equal the uninterrupted foreground-saving
    run's, bit for bit."""
    from megaloop.parallel.dcp_state import read_whole

    full = str(tmp_path / "full")
    train(load_config(raw=tiny_raw(tiny_corpus, data_cache, full, steps=8, save_every=2)), log=lambda *a: None)
    run = str(tmp_path / "async")
    cfg_path = tmp_path / "async.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_raw(tiny_corpus, data_cache, run, steps=8, save_every=2,
                                                async_save=True)))
    proc = run_cli(cfg_path, "save:4")  # killed right after step 4's state was handed to the writer
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert ckpt.list_complete(run) == [2] and ckpt.latest_path(run).endswith("step_00000002")
    assert [n for n in os.listdir(ckpt.ckpt_root(run)) if n.startswith(".tmp_")] == [".tmp_step_00000004"]
    proc = run_cli(cfg_path, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run) == losses(full)
    assert ckpt.list_complete(run) == ckpt.list_complete(full) == [6, 8]
    for s in (6, 8):
        a, b = (read_whole(os.path.join(ckpt.ckpt_root(d), ckpt.step_dir_name(s))) for d in (full, run))
        assert a.keys() == b.keys()
        assert all(torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k] for k, v in a.items())
    assert not [n for n in os.listdir(ckpt.ckpt_root(run)) if n.startswith(".tmp_")]
