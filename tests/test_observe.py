"""Optional logging backends (megaloop.observe): off by default, readable when on.

Contracts:
- no backend is created unless the config switches it on;
- TensorBoard writes event files under RUN_DIR/tb that tensorboard's own reader returns with the
  logged values (non-numeric fields such as mfu=None are skipped, not fatal);
- wandb in offline mode writes a local run directory under RUN_DIR/wandb with no network;
- a backend switched on but not installed is a ConfigError naming `pip install megaloop[logging]`.
"""
import builtins
import glob
import os

import pytest

from megaloop.config import ConfigError, LoggingConfig
from megaloop.observe import MetricSink, build_sinks, close_sinks, scalars

RECORDS = [
    dict(step=10, tokens=2560, loss=5.5, lr=0.02, grad_norm=1.25, tokens_per_s=1000.0, mfu=0.31),
    dict(step=20, tokens=5120, loss=4.75, lr=0.01, grad_norm=0.5, tokens_per_s=1100.0, mfu=None),
]


def test_off_by_default(tmp_path):
    assert build_sinks(LoggingConfig(), str(tmp_path)) == []
    assert os.listdir(tmp_path) == []


def test_scalars_keep_finite_numbers_only():
    rec = dict(step=3, loss=1.5, mfu=None, note="x", bad=float("nan"), flag=True, tokens=7)
    assert scalars(rec) == {"loss": 1.5, "tokens": 7.0}


def test_tensorboard_round_trip(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sinks = build_sinks(LoggingConfig(tensorboard=True), str(tmp_path), {"model": {"d_model": 8}})
    assert len(sinks) == 1 and isinstance(sinks[0], MetricSink)
    for rec in RECORDS:
        sinks[0].log(rec, rec["step"])
    close_sinks(sinks)

    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(10, 5.5), (20, 4.75)]
    assert [(e.step, e.value) for e in acc.Scalars("mfu")] == [(10, pytest.approx(0.31))]
    assert [e.value for e in acc.Scalars("tokens_per_s")] == [1000.0, 1100.0]


def test_wandb_offline_writes_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    # No network and no account: offline must still work. Keep wandb's own files in tmp_path.
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_cfg"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    sinks = build_sinks(LoggingConfig(wandb=True, wandb_mode="offline"), str(tmp_path), {"model": {"d_model": 8}})
    assert len(sinks) == 1
    for rec in RECORDS:
        sinks[0].log(rec, rec["step"])
    close_sinks(sinks)
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    assert glob.glob(os.path.join(runs[0], "run-*.wandb"))


@pytest.mark.parametrize("backend,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_missing_package_is_a_config_error(tmp_path, monkeypatch, backend, module):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r"megaloop\[logging\]"):
        build_sinks(LoggingConfig(**{backend: True}), str(tmp_path))


def test_unknown_wandb_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="wandb_mode"):
        build_sinks(LoggingConfig(wandb=True, wandb_mode="sometimes"), str(tmp_path))


def test_train_mirrors_metrics_to_tensorboard(tiny_corpus, data_cache, tmp_path):
    """Contract: with logging.tensorboard on, a run's RUN_DIR/tb holds the same losses as metrics.jsonl."""
    pytest.importorskip("tensorboard")
    import json

    from conftest import tiny_raw
    from megaloop.config import load_config
    from megaloop.train import train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    raw = tiny_raw(tiny_corpus, data_cache, str(run), steps=3)
    raw["logging"] = {"tensorboard": True, "peak_flops": 1e9}
    train(load_config(raw=raw), log=lambda *a: None)
    with open(run / "metrics.jsonl") as f:
        want = [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("loss")] == want


def test_check_backends(monkeypatch):
    from megaloop.observe import check_backends
    import importlib.util

    check_backends(LoggingConfig())  # nothing on: nothing needed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"megaloop\[logging\]"):
        check_backends(LoggingConfig(wandb=True))
