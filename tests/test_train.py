"""The training loop end to end on a tiny corpus: run directory, budgets, resume, NaN guard."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_raw
from megaloop import checkpoint as ckpt
from megaloop.config import ConfigError, load_config
from megaloop.errors import UserError
from megaloop.parallel.dcp_state import read_weights
from megaloop.train import train


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir):
    return [m["loss"] for m in metrics(run_dir) if "loss" in m]


def test_run_directory_contract(tiny_corpus, data_cache, tmp_path):
    """Contract (DESIGN.md): config.yaml, metrics.jsonl (one object per log step with step, tokens,
    loss, lr, grad_norm, tokens_per_s), summary.json (run, n_once, n_rec, r, tokens, flops,
    val_loss, val_loss_by_r) and complete checkpoints with a `latest` pointer."""
    run = str(tmp_path / "run")
    cfg = load_config(raw=tiny_raw(tiny_corpus, data_cache, run, eval_recur=[1, 4]))
    summary = train(cfg, log=lambda *a: None)
    m = metrics(run)
    assert [r["step"] for r in m] == list(range(1, 7))
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(m[0])
    assert m[-1]["tokens"] == 6 * 4 * 32
    on_disk = json.load(open(os.path.join(run, "summary.json")))
    assert on_disk["val_loss"] == summary["val_loss"] and set(on_disk["val_loss_by_r"]) == {"1", "2", "4"}
    for k in ("run", "n_once", "n_rec", "r", "tokens", "flops", "unigram_entropy"):
        assert k in on_disk
    assert on_disk["flops"] == pytest.approx(on_disk["tokens"] * on_disk["flops_per_token"])
    assert ckpt.list_complete(run) == [6] and ckpt.latest_path(run).endswith("step_00000006")
    assert load_config(os.path.join(run, "config.yaml")).to_dict() == cfg.to_dict()


def test_budget_by_tokens_and_flops(tiny_corpus, data_cache, tmp_path):
    """Contract: train.tokens and train.target_flops buy floor(budget / tokens per step) steps."""
    from megaloop.accounting import count_params
    raw = tiny_raw(tiny_corpus, data_cache, str(tmp_path / "a"), steps=None, tokens=3 * 128 + 5)
    assert train(load_config(raw=raw), log=lambda *a: None)["steps"] == 3
    raw = tiny_raw(tiny_corpus, data_cache, str(tmp_path / "b"), steps=None)
    fpt = count_params(load_config(raw=dict(raw, train=dict(raw["train"], steps=1))).model).flops_per_token
    raw["train"]["target_flops"] = fpt * 128 * 2.5
    assert train(load_config(raw=raw), log=lambda *a: None)["steps"] == 2
    raw["train"]["target_flops"] = fpt * 10
    raw["train"]["run_dir"] = str(tmp_path / "c")
    with pytest.raises(ConfigError, match="less than one step"):
        train(load_config(raw=raw), log=lambda *a: None)


@pytest.mark.slow
def test_resume_continues_bitwise(tiny_corpus, data_cache, tmp_path):
    """Contract: a run interrupted after a checkpoint and resumed with --resume produces the same
    loss curve, bit for bit, and the same final weights as the uninterrupted run."""
    full = str(tmp_path / "full")
    train(load_config(raw=tiny_raw(tiny_corpus, data_cache, full, steps=8, save_every=3)), log=lambda *a: None)
    part = str(tmp_path / "part")
    env = dict(os.environ, MEGALOOP_FAULT="step:5")  # SIGKILL after step 5 (last checkpoint: 3)
    cfg_path = tmp_path / "part.yaml"
    import yaml
    cfg_path.write_text(yaml.safe_dump(tiny_raw(tiny_corpus, data_cache, part, steps=8, save_every=3)))
    proc = subprocess.run([sys.executable, "-m", "megaloop.cli", "train", str(cfg_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert ckpt.list_complete(part) == [3]
    train(load_config(str(cfg_path)), resume=True, log=lambda *a: None)
    assert losses(part) == losses(full)
    a = read_weights(ckpt.latest_path(full))
    b = read_weights(ckpt.latest_path(part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_existing_run(tiny_corpus, data_cache, tmp_path):
    """Contract: training into a run dir that holds a run, without --resume, is an error that
    changes nothing on disk; resuming with a changed model shape is refused too."""
    run = str(tmp_path / "run")
    raw = tiny_raw(tiny_corpus, data_cache, run, steps=2)
    train(load_config(raw=raw), log=lambda *a: None)
    before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(run) for p in fs}
    with pytest.raises(UserError, match="already holds a run"):
        train(load_config(raw=raw), log=lambda *a: None)
    raw["model"]["d_model"] = 64
    with pytest.raises(UserError, match="model.d_model"):
        train(load_config(raw=raw), resume=True, log=lambda *a: None)
    after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(run) for p in fs}
    assert before == after


def test_nan_steps_are_skipped_then_run_stops(tiny_corpus, data_cache, tmp_path, monkeypatch):
    """Contract: a non-finite loss skips the update and is counted; under on_divergence=stop,
    max_bad_steps in a row stop the run with a message naming the step, and the last good
    checkpoint stays intact. (The rewind default is tested in test_divergence.py.)"""
    import importlib
    from megaloop import faults
    monkeypatch.setenv("MEGALOOP_FAULT", "nan:3")
    importlib.reload(faults)
    run = str(tmp_path / "one")
    summary = train(load_config(raw=tiny_raw(tiny_corpus, data_cache, run, steps=5)), log=lambda *a: None)
    assert summary["skipped_steps"] == 1
    m = metrics(run)
    assert m[2]["skipped_steps"] == 1 and m[1]["skipped_steps"] == 0
    monkeypatch.setenv("MEGALOOP_FAULT", "nan:4,nan:5")
    importlib.reload(faults)
    run = str(tmp_path / "two")
    raw = tiny_raw(tiny_corpus, data_cache, run, steps=8, save_every=2, max_bad_steps=2,
                   on_divergence="stop")
    with pytest.raises(UserError, match="at step 5"):
        train(load_config(raw=raw), log=lambda *a: None)
    assert ckpt.list_complete(run) == [2, 4]
    read_weights(ckpt.latest_path(run))
    monkeypatch.delenv("MEGALOOP_FAULT")
    importlib.reload(faults)


def test_final_evaluation_shows_progress(tiny_corpus, data_cache, tmp_path, capsys):
    """Contract: with train.progress on, the final evaluation at several r shows one progress bar
    over every (r, batch) pair: 512 eval tokens / seq_len 32 = 16 windows = 4 batches of 4, at
    r = 2 (trained), 1 and 4: 12 batches; the losses equal separate evaluations."""
    run = str(tmp_path / "run")
    summary = train(load_config(raw=tiny_raw(tiny_corpus, data_cache, run, steps=2, progress=True,
                                             eval_recur=[1, 4])), log=lambda *a: None)
    err = capsys.readouterr().err
    assert "eval" in err and "12/12" in err, err[-2000:]
    assert set(summary["val_loss_by_r"]) == {"1", "2", "4"}
    from megaloop.evaluate import evaluate_run
    alone = evaluate_run(run, [1, 2, 4], log=lambda *a: None)
    assert alone == {r: pytest.approx(v, abs=1e-6) for r, v in summary["val_loss_by_r"].items()}
