"""The learning-rate schedules (megaloop/optim.py lr_factor): linear (the default) and
warmup-stable-decay, and their config validation."""
import pytest

from megaloop.config import ConfigError, load_config
from megaloop.optim import decay_start, lr_factor


def wsd_reference(step: int, total: int, warmup: int, final: float, frac: float) -> float:
    """WSD written out from its definition: warmup (step+1)/warmup, then 1 until the last
    round(frac*total) steps (none of them inside the warmup), which fall linearly so that the last
    step sits at `final`."""
    if step < warmup:
        return (step + 1) / warmup
    first = max(warmup, total - max(1, int(frac * total + 0.5)))
    if step < first:
        return 1.0
    return 1.0 - (1.0 - final) * (step - first + 1) / (total - first)


def test_linear_is_unchanged_default():
    """Without schedule arguments lr_factor is the linear warmup + linear decay of before: peak at
    the end of warmup, final_lr_frac at the last step, a straight line between."""
    total, warmup, final = 11, 1, 0.1
    got = [lr_factor(s, total, warmup, final) for s in range(total)]
    assert got[0] == 1.0
    assert got[-1] == pytest.approx(final)
    for s in range(1, total):
        assert got[s] == pytest.approx(1 - (1 - final) * (s - 1) / (total - 2))


@pytest.mark.parametrize("total,warmup,final,frac", [(100, 0, 0.1, 0.2), (37, 3, 0.0, 0.25), (10, 2, 0.1, 1.0),
                                                     (5, 0, 0.1, 0.01)])
def test_wsd_values(total, warmup, final, frac):
    """wsd: warmup, a constant stable phase, and a linear decay over the last decay_frac of the
    steps to final_lr_frac at the last step (at least one decaying step)."""
    got = [lr_factor(s, total, warmup, final, "wsd", frac) for s in range(total)]
    want = [wsd_reference(s, total, warmup, final, frac) for s in range(total)]
    assert got == pytest.approx(want)
    assert got[-1] == pytest.approx(final)
    start = max(warmup, decay_start(total, frac))
    assert all(g == 1.0 for g in got[warmup:start])
    assert all(a > b for a, b in zip(got[start - 1:], got[start:])) or start == 0


def test_wsd_stable_phase_is_shared_by_longer_runs():
    """A run of T steps and any longer run have the same factor at every step before the shorter
    run's decay start: what lets a branch decay from a longer trunk's checkpoint."""
    for short in (20, 47, 100):
        s0 = decay_start(short, 0.2)
        for long in (short + 1, 3 * short, 1000):
            assert [lr_factor(s, short, 2, 0.1, "wsd", 0.2) for s in range(s0)] == \
                   [lr_factor(s, long, 2, 0.1, "wsd", 0.2) for s in range(s0)]


def test_decay_start():
    """decay_start(T, f) = T - round(f T), with at least one decaying step."""
    assert decay_start(100, 0.2) == 80
    assert decay_start(10, 0.25) == 7   # 2.5 rounds up
    assert decay_start(3, 0.01) == 2
    assert decay_start(10, 1.0) == 0


def test_config_accepts_wsd_and_rejects_bad_values():
    """optim.schedule is linear (default) or wsd; optim.decay_frac is in (0, 1]; anything else is a
    ConfigError naming the key."""
    assert load_config(raw={"train": {"steps": 3}}).optim.schedule == "linear"
    cfg = load_config(raw={"train": {"steps": 3}, "optim": {"schedule": "wsd", "decay_frac": 0.3}})
    assert (cfg.optim.schedule, cfg.optim.decay_frac) == ("wsd", 0.3)
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(raw={"train": {"steps": 3}, "optim": {"schedule": "cosine"}})
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="optim.decay_frac"):
            load_config(raw={"train": {"steps": 3}, "optim": {"schedule": "wsd", "decay_frac": bad}})


def test_training_follows_wsd_and_keeps_branch_points(tiny_corpus, data_cache, tmp_path):
    """A real training run under optim.schedule=wsd logs lr = peak x lr_factor(step) at every step,
    and train.save_at keeps a complete checkpoint of each listed step in RUN_DIR/branch_points
    (never pruned, beside the run's own checkpoints)."""
    import json
    import os

    from conftest import tiny_raw
    from megaloop import checkpoint as ckpt
    from megaloop.train import train

    raw = tiny_raw(tiny_corpus, data_cache, str(tmp_path / "run"), steps=10, save_at=[4, 7], keep_checkpoints=1)
    raw["optim"].update(schedule="wsd", decay_frac=0.3)
    cfg = load_config(raw=raw)
    train(cfg, log=lambda *a: None)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        lrs = [r["lr"] for r in map(json.loads, f) if "lr" in r]
    assert lrs == pytest.approx([cfg.optim.lr * lr_factor(s, 10, 2, 0.1, "wsd", 0.3) for s in range(10)])
    assert ckpt.list_complete(ckpt.branch_points(str(tmp_path / "run"))) == [4, 7]
    assert ckpt.list_complete(str(tmp_path / "run")) == [10]
    assert os.path.isfile(os.path.join(ckpt.branch_points(str(tmp_path / "run")), "checkpoints", "step_00000007", "trainer.pt"))
