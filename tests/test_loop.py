"""The training loop's pieces, each against an independent expectation: the run-directory lock is
taken before anything expensive, a rewind reads the checkpoint the writer rank published, the
summary is printed once per job however it was launched, and files the loop reads are closed."""
import gc
import os
import time
import warnings

import pytest

from conftest import tiny_raw
from megaloop import checkpoint as ckpt
from megaloop.cli import main
from megaloop.config import load_config
from megaloop.run_lock import RunDirBusy, RunLock


def test_busy_run_dir_is_refused_before_any_data_is_read(tiny_corpus, data_cache, tmp_path, monkeypatch):
    """Contract: while another process holds RUN_DIR's lock, `train` stops with RunDirBusy within
    seconds, before the data is prepared or the model compiled (the lock comes before anything
    expensive), and leaves the run directory as it was."""
    import megaloop.train as train_mod
    run = str(tmp_path / "run")
    os.makedirs(run)
    held = RunLock.acquire(run, log=lambda *a: None)
    touched = []
    monkeypatch.setattr(train_mod, "ensure_prepared", lambda *a, **k: touched.append("data") or pytest.fail("data read"))
    monkeypatch.setattr(train_mod, "compile_blocks", lambda *a, **k: touched.append("compile"))
    try:
        before = sorted(os.listdir(run))
        t0 = time.monotonic()
        with pytest.raises(RunDirBusy):
            train_mod.train(load_config(raw=tiny_raw(tiny_corpus, data_cache, run, compile=True)), log=lambda *a: None)
        assert time.monotonic() - t0 < 10
        assert touched == [] and sorted(os.listdir(run)) == before
    finally:
        held.release()


def test_a_run_that_fails_before_writing_leaves_no_run_dir(tiny_corpus, data_cache, tmp_path, monkeypatch):
    """Contract: the run directory is created (to hold the lock) before the data is prepared; a run
    that fails there (here: the data preparation raises) leaves no folder behind."""
    import megaloop.train as train_mod
    from megaloop.data.errors import DatasetError

    def broken(*a, **k):
        raise DatasetError("corrupt corpus")
    monkeypatch.setattr(train_mod, "ensure_prepared", broken)
    run = tmp_path / "run"
    with pytest.raises(DatasetError):
        train_mod.train(load_config(raw=tiny_raw(tiny_corpus, data_cache, str(run))), log=lambda *a: None)
    assert not run.exists()


class _Rank:
    """A non-writer rank's engine whose barrier stands for the writer rank: when this rank waits
    in it, the writer publishes its background save (as the writer's finish() does on its own)."""
    is_main = False

    def __init__(self, publish):
        self.publish, self.barriers = publish, 0

    def barrier(self):
        self.barriers += 1
        self.publish()


def test_rewind_after_an_async_save_reads_the_published_checkpoint(tmp_path):
    """Contract: a rank that looks for the checkpoint to rewind to while the writer rank is still
    publishing a background save gets the newly published one, the one the writer rewinds to: it
    meets the writer in a barrier before it reads `latest` (finish() has no collective)."""
    run = str(tmp_path / "run")
    for step in (2, 4):
        ckpt.save(run, step, lambda p: None, meta={}, keep=3)
    # the writer's background save of step 6: written, and published only in the writer's finish()
    tmp = ckpt._begin(run, 6, True, lambda: None)
    writer = ckpt.PendingSave(run, 6, tmp, None, {}, 3, is_writer=True)
    other = ckpt.Checkpointer(run, _Rank(writer.finish), keep=3, meta={}, hooks=None)
    assert ckpt.latest_path(run).endswith("step_00000004")  # what a rank reading now would get
    assert other.latest().endswith("step_00000006")
    assert other.engine.barriers == 1


def _fake_summary(run_dir):
    return dict(val_loss=3.0, r=2, val_loss_by_r={"2": 3.0}, rewinds=0, run_dir=run_dir)


@pytest.mark.parametrize("env, prints", [
    ({}, True),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, False),  # torchrun
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, False),  # direct srun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, True),
])
def test_the_summary_is_printed_once_per_job(tmp_path, monkeypatch, capsys, env, prints):
    """Contract: `megaloop train` prints the run's summary on global rank 0 only, whether the rank
    comes from torchrun (RANK) or from srun started directly (SLURM_PROCID, no RANK); and the
    command closes the files it reads (no ResourceWarning)."""
    import megaloop.train as train_mod
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000006")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{d_model: 32, n_head: 2, vocab_size: 384, seq_len: 32}}\ntrain: {{steps: 1, run_dir: {run}}}\n")
    monkeypatch.setattr(train_mod, "train", lambda cfg, resume=False: _fake_summary(str(run)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert main(["train", str(cfg)]) == 0
        gc.collect()
    out = capsys.readouterr().out
    assert ("validation loss 3.0000" in out and "latest: step_00000006" in out) == prints, out
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
