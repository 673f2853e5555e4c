"""The token ledger: tokens trained per dataset, in summary.json, in every checkpoint's trainer.pt
and in `sweep collect`'s table. It sums to the run's `tokens` (the D of the fit), follows the blend
weights, is exact across a resume and a changed data-parallel size, and a divergence rewind takes
the discarded steps' samples out of it."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from layouts import TINY, resumable, token_data, train
from megaloop.data.indexed import IndexedDatasetWriter
from megaloop.data.loader import PackedLoader

SAVE = ["train.save_every=3"]
PER_STEP = TINY["train"]["micro_batch_size"] * TINY["train"]["grad_accum"]  # samples per step at DP=1
SEQ = TINY["model"]["seq_len"]


def two_datasets(folder: str) -> dict:
    """token_data's train/valid plus a second training dataset, blended 2:1."""
    data = token_data(os.path.join(folder, "a"))
    other = token_data(os.path.join(folder, "b"), seed=9)
    return {"train": [{"path": data["train"][0], "weight": 2.0}, {"path": other["train"][0], "weight": 1.0}],
            "valid": data["valid"]}


def _ledger(run_dir: str, step: int = None) -> dict:
    if step is None:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)["tokens_by_dataset"]
    from megaloop import checkpoint as ckpt
    path = os.path.join(ckpt.ckpt_root(run_dir), ckpt.step_dir_name(step), "trainer.pt")
    return torch.load(path, weights_only=False)["loader"]["tokens_by_dataset"]


def test_loader_ledger_unit(tmp_path) -> None:
    """Counted from the global stream: the same on every rank of DP=2 as at DP=1; a rewind
    (discard_since) returns it to the checkpoint's, and later steps add to that."""
    prefixes = []
    for i, n in enumerate((400, 150)):
        p = str(tmp_path / f"d{i}")
        with IndexedDatasetWriter(p, 50, 0) as w:
            w.add_document(np.arange(1, n) % 49 + 1)
        prefixes.append(p)
    one = PackedLoader(prefixes, [2, 1], 8, 4, seed=1)
    ranks = [PackedLoader(prefixes, [2, 1], 8, 2, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(6):
        one.next_batch()
        for r in ranks:
            r.next_batch()
    assert one.tokens_by_dataset() == ranks[0].tokens_by_dataset() == ranks[1].tokens_by_dataset()
    assert sum(one.tokens_by_dataset().values()) == 6 * 4 * 8
    assert list(one.tokens_by_dataset().values()) == [16 * 8, 8 * 8]  # 2:1 of 24 samples
    saved = one.state_dict()
    for _ in range(3):
        one.next_batch()
    one.discard_since(saved)
    assert one.tokens_by_dataset() == saved["tokens_by_dataset"]
    one.next_batch()
    assert sum(one.tokens_by_dataset().values()) == 7 * 4 * 8
    again = PackedLoader(prefixes, [2, 1], 8, 4, seed=1)
    again.load_state_dict(one.state_dict())
    assert again.tokens_by_dataset() == one.tokens_by_dataset()


@pytest.mark.slow
def test_ledger_exact_across_resume_and_dp_size(tmp_path) -> None:
    """`megaloop train` on two blended datasets: summary.json's ledger sums to `tokens` and splits
    2:1 within one sample; every checkpoint holds the ledger at its step; a single-process resume
    and a resume at DP=2 (from the same step-3 checkpoint) end with the uninterrupted run's ledger
    exactly; `sweep collect`'s column reads it back."""
    data = two_datasets(str(tmp_path / "tokens"))
    ref = train(1, str(tmp_path / "ref"), SAVE, data)
    ledger = _ledger(ref.run_dir)
    summary = ref.summary
    assert sum(ledger.values()) == summary["tokens"] == 5 * PER_STEP * SEQ
    samples = [v // SEQ for v in ledger.values()]
    assert abs(samples[0] - 2 / 3 * 5 * PER_STEP) <= 1 and abs(samples[1] - 1 / 3 * 5 * PER_STEP) <= 1
    assert sum(_ledger(ref.run_dir, 3).values()) == 3 * PER_STEP * SEQ
    single = train(1, resumable(ref.checkpoint(3), ref, str(tmp_path / "single")), SAVE, data, resume=True)
    assert _ledger(single.run_dir) == ledger
    dp2 = train(2, resumable(ref.checkpoint(3), ref, str(tmp_path / "dp2")),
                ["parallel.engine=torch", "train.grad_accum=1", *SAVE], data, resume=True)
    assert _ledger(dp2.run_dir) == ledger and _ledger(dp2.run_dir, 5) == ledger

    from megaloop.sweep.collect import TABLE_COLUMNS
    assert "tokens_by_dataset" in TABLE_COLUMNS


def test_collect_table_has_the_ledger(tmp_path) -> None:
    """A finished run's summary ledger appears, as JSON, in fit_table.csv."""
    from megaloop.sweep import collect as collect_mod
    row = {"run": "r0", "n_once": 1, "n_rec": 1, "r": 1, "tokens": 64, "target_flops": 1.0}
    run_dir = tmp_path / "runs" / "r0"
    run_dir.mkdir(parents=True)
    ledger = {"/data/a/train": 48, "/data/b/train": 16}
    (run_dir / "summary.json").write_text(json.dumps({"val_loss": 1.0, "tokens": 64, "tokens_by_dataset": ledger}))
    status = collect_mod.run_status(str(tmp_path), row)
    assert status.status == "finished", status
    out = tmp_path / "t.csv"
    collect_mod._write_csv(str(out), collect_mod.TABLE_COLUMNS, [status.row])
    got = list(csv.DictReader(open(out)))[0]
    assert json.loads(got["tokens_by_dataset"]) == ledger


@pytest.mark.slow
def test_ledger_after_a_divergence_rewind(tiny_corpus, data_cache, tmp_path, monkeypatch) -> None:
    """A run that rewinds (two injected non-finite steps, back to the step-4 checkpoint) consumed
    the abandoned steps' samples, but its ledger counts only the steps its weights trained on: it
    sums to `tokens` (10 steps), and the final checkpoint's loader state shows the discarded ones."""
    import importlib

    from conftest import tiny_raw
    from megaloop import faults
    from megaloop.config import load_config
    from megaloop.train import train as train_run
    monkeypatch.setenv("MEGALOOP_FAULT", "nan:5,nan:6")
    importlib.reload(faults)
    try:
        run = str(tmp_path / "run")
        raw = tiny_raw(tiny_corpus, data_cache, run, steps=10, save_every=2, micro_batch_size=4, max_bad_steps=2)
        summary = train_run(load_config(raw=raw), log=lambda *a: None)
    finally:
        monkeypatch.delenv("MEGALOOP_FAULT")
        importlib.reload(faults)
    assert summary["rewinds"] == 1
    assert sum(summary["tokens_by_dataset"].values()) == summary["tokens"] == 10 * 4 * 32
    from megaloop import checkpoint as ckpt
    state = ckpt.load_file(ckpt.latest_path(run), "trainer.pt")["loader"]
    assert state["global_samples"] == 12 * 4 and sum(state["discarded"]) == 2 * 4
    assert state["tokens_by_dataset"] == summary["tokens_by_dataset"]
