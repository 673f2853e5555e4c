"""What a trained loop does from pass to pass: the evidence behind a test-time recurrence curve.

Two measurements on a trained LoopedLM:
- `adapter_split`: for linear injection u = W [e ; s], how much of W reads the prelude output e and
  how much reads the state s (Frobenius norms of the two halves, and the spectral norm of W_s). At
  initialisation W = [I | 0]: every pass then sees u = e and ignores the state, so all passes
  compute the same thing and extra recurrences cannot change the output.
- `pass_by_pass`: on a batch, the coda input after i = 1 .. r_max passes, its relative change from
  pass i - 1 (how fast the recurrent state converges), and the loss the model reaches when it stops
  after i passes. The state after i passes is the model's own `run_recurrence(e, i)`, so nothing
  here re-implements the recurrence.
"""
from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def adapter_split(model) -> Optional[dict]:
    """Norms of the injection adapter's e-half and s-half (None unless injection is linear)."""
    inj = model.injection
    if inj.mode != "linear":
        return None
    d = inj.weight.size(0)
    w_e, w_s = inj.weight[:, :d].float(), inj.weight[:, d:].float()
    eye = torch.eye(d)
    return {
        "norm_e": float(w_e.norm()), "norm_s": float(w_s.norm()),
        "s_share": float(w_s.norm() / inj.weight.float().norm()),
        "spectral_s": float(torch.linalg.matrix_norm(w_s, ord=2)),
        "dist_e_from_identity": float((w_e - eye).norm() / eye.norm()),
    }


@torch.no_grad()
def pass_by_pass(model, idx: torch.Tensor, targets: torch.Tensor, r_max: int) -> list[dict]:
    """Per pass i = 1 .. r_max: {pass, loss, rel_change} where rel_change = ||x_i - x_(i-1)|| / ||x_(i-1)||
    of the coda input x (None for i = 1) and loss is the validation loss when stopping after i passes."""
    e = model.run_blocks(model.prelude, model.embed_tokens(idx))
    out, prev = [], None
    for i in range(1, r_max + 1):
        x = model.run_recurrence(e, i)
        h = model.norm_final(model.run_blocks(model.coda, x))
        change = None if prev is None else float((x - prev).norm() / prev.norm().clamp_min(1e-12))
        out.append({"pass": i, "loss": float(model.head.loss(h, targets)), "rel_change": change})
        prev = x
    return out
