"""Recurrence diagnostics (megaloop.analysis.recurrence), checked on models whose answer is known.

Contracts:
  - a freshly initialised linear-injection model has W = [I | 0]: the adapter's state half is 0
    and every pass sees u = e, so the coda input is identical after every pass (relative change
    exactly 0) and the loss does not depend on r;
  - once the state half is non-zero, successive passes differ;
  - the per-pass loss equals the model's own forward at num_recur = i (an independent path);
  - non-linear injection modes report no adapter split.
"""
from __future__ import annotations

import pytest
import torch

from megaloop.analysis.recurrence import adapter_split, pass_by_pass
from megaloop.config import ModelConfig
from megaloop.model import LoopedLM


def _model(injection="linear"):
    torch.manual_seed(0)
    return LoopedLM(ModelConfig(d_model=32, n_head=2, n_kv_head=2, vocab_size=61, seq_len=16, n_prelude=1,
                                n_recur_block=1, n_coda=1, num_recur=3, input_injection=injection)).eval()


def _batch():
    x = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(1))
    return x[:, :-1], x[:, 1:]


def test_identity_adapter_makes_every_pass_the_same():
    m = _model()
    split = adapter_split(m)
    assert split["norm_s"] == 0 and split["s_share"] == 0 and split["dist_e_from_identity"] == 0
    stats = pass_by_pass(m, *_batch(), r_max=4)
    assert stats[0]["rel_change"] is None
    assert all(s["rel_change"] == 0 for s in stats[1:])
    assert len({round(s["loss"], 6) for s in stats}) == 1


def test_state_half_makes_passes_differ_and_losses_match_forward():
    m = _model()
    with torch.no_grad():
        m.injection.weight[:, 32:].normal_(std=0.2)
    assert adapter_split(m)["s_share"] > 0.1
    idx, tgt = _batch()
    stats = pass_by_pass(m, idx, tgt, r_max=4)
    assert all(s["rel_change"] > 1e-3 for s in stats[1:])
    for s in stats:
        with torch.no_grad():
            assert s["loss"] == pytest.approx(float(m(idx, tgt, num_recur=s["pass"])), rel=1e-6)


@pytest.mark.parametrize("mode", ["additive", "passthrough", "hyperconnect"])
def test_other_modes(mode):
    m = _model(mode)
    assert adapter_split(m) is None
    stats = pass_by_pass(m, *_batch(), r_max=3)
    assert [s["pass"] for s in stats] == [1, 2, 3] and stats[1]["rel_change"] > 0
