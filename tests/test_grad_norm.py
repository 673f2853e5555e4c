"""The global gradient norm of a step (megaloop/parallel/torch_engine.py) is the true norm of the
whole model's gradient, in every layout.

The reference is independent of the engine: the plain model's forward and backward on the same
micro-batches (each loss divided by their number, as the step does), and the square root of
the sum of every gradient's squared entries accumulated in float64. Contracts:
  - `sum_of_squares` of a large float32 tensor equals its float64 sum of squares to 1e-7
    (torch's float32 CPU norm misses it by ~1e-4 at that size: the cause this guards against);
  - one process: the step's grad norm equals the reference to 1e-6 relative;
  - TP = 2 and PP = 2 (gloo, slow): every rank reports that same norm, to 1e-6 relative of the
    reference, with the single process's loss. Before the norm was accumulated in float64 the
    vocab-sized head gradient's float32 norm erred by its size, and a TP shard (half the size)
    erred less: the TP norm differed from the single process's by ~1e-4.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from megaloop.parallel import build_engine
from megaloop.parallel.testing import spawn
from megaloop.parallel.torch_engine import sum_of_squares
from megaloop.train import build_model

import grad_norm_check as check

CHECK = os.path.join(os.path.dirname(__file__), "grad_norm_check.py")
NORM_RTOL = 1e-6


def reference():
    """(mean micro-batch loss, the float64 norm of the whole gradient) of the plain model."""
    cfg = check.config()
    model = build_model(cfg)
    micro = check.batches(cfg)
    loss = 0.0
    for x, y in micro:
        step_loss = model(x, y, num_recur=cfg.model.num_recur)
        (step_loss / len(micro)).backward()
        loss += float(step_loss) / len(micro)
    sq = sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None)
    return loss, sq ** 0.5


def test_sum_of_squares_is_float64_exact_on_a_large_tensor():
    """4 M float32 entries of mixed magnitudes (and a tail shorter than a row): float64's sum of
    squares to 1e-7 relative; the float32 norm it replaces really errs at this size (the check
    can fail)."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4_000_037, generator=g) * 1e-4
    t[:100] *= 1000
    want = float(t.double().square().sum())
    got = sum_of_squares([t[:1000], t[1000:]])
    assert got.dtype == torch.float64
    assert abs(float(got) - want) <= 1e-7 * want
    assert abs(float(torch.linalg.vector_norm(t)) ** 2 - want) > 1e-5 * want


def test_one_process_grad_norm_is_the_true_norm():
    """The single process's step: its loss and grad norm are the plain model's (norm to 1e-6)."""
    loss, norm = reference()
    cfg = check.config()
    engine = build_engine(cfg, lambda where: build_model(cfg, where), torch.device("cpu"))
    stats = engine.train_step(check.batches(cfg), 1.0)
    assert abs(stats.loss - loss) <= 1e-6 * loss
    assert abs(stats.grad_norm - norm) <= NORM_RTOL * norm, f"grad norm {stats.grad_norm} vs {norm}"


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_grad_norm_is_the_single_process_norm(tp, pp):
    """Every rank's step reports the reference's norm (to 1e-6) and loss (to 1e-5)."""
    loss, norm = reference()
    for r in spawn(tp * pp, [CHECK, str(tp), str(pp)], timeout=300, module=None):
        assert r.returncode == 0, r.stdout[-4000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert abs(got["loss"] - loss) <= 1e-5 * loss, got
        assert abs(got["grad_norm"] - norm) <= NORM_RTOL * norm, f"rank {got['rank']}: grad norm {got['grad_norm']} vs {norm}"
