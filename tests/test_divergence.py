"""Divergence recovers: train.on_divergence=rewind (megaloop/divergence.py)."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_raw
from megaloop import checkpoint as ckpt
from megaloop import faults
from megaloop.config import load_config
from megaloop.divergence import DivergenceGuard
from megaloop.errors import UserError
from megaloop.parallel.dcp_state import read_weights
from megaloop.train import train
from test_train import metrics

STEPS, SAVE_EVERY, MICRO = 10, 2, 4
# nan: steps 5 and 6 are non-finite, the second in a row triggers (max_bad_steps=2): back to step 4.
# spike: step 7's loss is multiplied by 100: back to step 6, then half the lr for 2 steps.
KINDS = {
    "nan": dict(fault="nan:5,nan:6", to=4, from_step=6, skipped_steps=2, reason="2 non-finite steps in a row",
                sets=dict(max_bad_steps=2)),
    "spike": dict(fault="spike:7", to=6, from_step=7, skipped_steps=1, reason="loss spike",
                  sets=dict(spike_window=3, rewind_lr_scale=0.5, rewind_lr_steps=2)),
}


def _raw(corpus, cache, run, kind):
    return tiny_raw(corpus, cache, run, steps=STEPS, save_every=SAVE_EVERY, micro_batch_size=MICRO,
                    **KINDS[kind]["sets"])


@pytest.fixture
def fault_env(monkeypatch):
    def arm(spec):
        monkeypatch.setenv("MEGALOOP_FAULT", spec)
        importlib.reload(faults)
    yield arm
    monkeypatch.delenv("MEGALOOP_FAULT", raising=False)
    importlib.reload(faults)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_rewind_finishes_and_resume_reproduces_the_curve(kind, tiny_corpus, data_cache, tmp_path, fault_env):
    """Contract: with an injected NaN streak or loss spike the run rewinds once to the last
    checkpoint and finishes its budget; metrics.jsonl holds one unbroken curve with a rewind event
    at the checkpoint's step; summary.json counts the rewind; the final checkpoint is complete;
    the data since the checkpoint is skipped (the loader consumed the abandoned steps' samples on
    top of the budget's); the spike case runs the 2 steps after the rewind at half the scheduled
    lr. A run killed after the rewind and resumed reproduces the same metrics, event included."""
    spec = KINDS[kind]
    fault_env(spec["fault"])
    full = str(tmp_path / "full")
    summary = train(load_config(raw=_raw(tiny_corpus, data_cache, full, kind)), log=lambda *a: None)
    assert summary["rewinds"] == 1 and summary["steps"] == STEPS
    m = metrics(full)
    events = [r for r in m if r.get("event") == "rewind"]
    assert len(events) == 1 and events[0]["step"] == spec["to"] and events[0]["from_step"] == spec["from_step"]
    assert spec["reason"] in events[0]["reason"]
    assert events[0]["skipped_samples"] == (spec["from_step"] - spec["to"]) * MICRO
    steps = [r["step"] for r in m if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # one unbroken curve
    latest = ckpt.latest_path(full)
    assert latest.endswith(ckpt.step_dir_name(STEPS)) and os.path.isfile(os.path.join(latest, "meta.json"))
    read_weights(latest)
    state = ckpt.load_file(latest, "trainer.pt")
    assert state["loader"]["global_samples"] == (STEPS + spec["from_step"] - spec["to"]) * MICRO
    assert state["guard"]["rewinds"] == 1
    if kind == "spike":
        sched = {r["step"]: r["lr"] for r in metrics(_reference(tiny_corpus, data_cache, tmp_path, kind)) if "lr" in r}
        lr = {r["step"]: r["lr"] for r in m if "lr" in r}
        assert [lr[s] / sched[s] for s in (7, 8, 9)] == pytest.approx([0.5, 0.5, 1.0])
        assert all(r["loss"] < 50 for r in m if "loss" in r)  # the spiking step is not in the curve

    # the same faults plus SIGKILL right after the first step past the rewind, then a resume
    killed = str(tmp_path / "killed")
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(_raw(tiny_corpus, data_cache, killed, kind)))
    env = dict(os.environ, MEGALOOP_FAULT=f"{spec['fault']},step:{spec['from_step'] + 1}")
    proc = subprocess.run([sys.executable, "-m", "megaloop.cli", "train", str(cfg_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    fault_env("")
    train(load_config(str(cfg_path)), resume=True, log=lambda *a: None)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "elapsed_s")}  # noqa: E731
                          for r in rows]
    assert strip(metrics(killed)) == strip(m)
    assert json.load(open(os.path.join(killed, "summary.json")))["rewinds"] == 1


def _reference(corpus, cache, tmp_path, kind):
    """The same run without faults: its lr per step is the unscaled schedule."""
    run = str(tmp_path / "reference")
    if not os.path.isdir(run):
        train(load_config(raw=_raw(corpus, cache, run, kind)), log=lambda *a: None)
    return run


@pytest.mark.slow
def test_rewind_limits_stop_the_run(tiny_corpus, data_cache, tmp_path, fault_env):
    """Contract: a divergence with no checkpoint to go back to, or after train.max_rewinds
    rewinds, stops the run with an error that names the step and the fix; the checkpoints on
    disk stay complete."""
    fault_env("nan:2,nan:3")
    with pytest.raises(UserError, match="at step 3.*no checkpoint to rewind to.*save_every"):
        train(load_config(raw=tiny_raw(tiny_corpus, data_cache, str(tmp_path / "a"), steps=6, max_bad_steps=2)),
              log=lambda *a: None)
    fault_env("nan:3,nan:4,nan:5,nan:6")  # back to 2 after step 4; after the next two, no rewind left
    run = str(tmp_path / "b")
    with pytest.raises(UserError, match="at step 6.*rewound 1 times already"):
        train(load_config(raw=tiny_raw(tiny_corpus, data_cache, run, steps=8, save_every=2, max_bad_steps=2,
                                       max_rewinds=1)), log=lambda *a: None)
    assert ckpt.list_complete(run) == [2, 4]
    read_weights(ckpt.latest_path(run))


class _T:  # the train section fields the guard reads
    max_bad_steps, on_divergence, spike_factor, spike_window, max_rewinds = 2, "rewind", 2.0, 4, 3
    rewind_lr_scale, rewind_lr_steps = 0.5, 10


def test_guard_spike_and_streak_rules():
    """Contract: a spike is a loss above spike_factor x the median of the last spike_window good
    losses, checked only once that window is full; a single non-finite step is not a divergence,
    max_bad_steps in a row are; neither enters the window; the lr is scaled for rewind_lr_steps
    steps after a rewind; the state round-trips through state_dict."""
    g = DivergenceGuard(_T())
    assert [g.observe(x, False) for x in (9.0, 8.0, 20.0)] == [None, None, None]  # window not full yet
    assert g.observe(4.0, False) is None  # window: 9, 8, 20, 4 -> median 8.5
    assert g.observe(16.9, False) is None and list(g.window) == [8.0, 20.0, 4.0, 16.9]
    assert "spike" in g.observe(2.0 * 12.45 + 0.01, False)  # median of 8, 20, 4, 16.9 is 12.45
    assert list(g.window) == [8.0, 20.0, 4.0, 16.9]
    assert g.observe(float("nan"), True) is None and g.observe(5.0, False) is None  # streak broken
    assert g.observe(float("nan"), True) is None and "2 non-finite" in g.observe(float("inf"), True)
    assert g.skipped_total == 3
    g.rewound(40, {"window": [1.0, 2.0]})
    assert (g.rewinds, g.lr_scale(49), g.lr_scale(50), list(g.window)) == (1, 0.5, 1.0, [1.0, 2.0])
    h = DivergenceGuard(_T())
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == g.state_dict()
