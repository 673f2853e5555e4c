"""RMSNorm (optionally with a fused residual add before it and a fused add after it).

    rms_norm(x, weight, eps)               -> y = x * rsqrt(mean(x^2, -1) + eps) * weight
    add_rms_norm(x, residual, weight, eps) -> (y, h) with h = x + residual, y = rms_norm(h)

All statistics are computed in fp32; outputs are returned in the input dtype. ``weight`` may be
None (parameter-free norm, e.g. QK-norm). The same forward/backward kernel pair also serves the
recurrence step (``recurrence.py``: s = rms_norm(h) and u = s + e in one pass).

``backend`` (megaloop.kernels.dispatch) picks the implementation: the reference below or the
Triton kernels of megaloop.kernels.triton.rms_norm (one forward pass that saves the per-row rstd,
one backward pass that recomputes x_hat and accumulates the weight gradient per program).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dispatch import AUTO, Backend, use_triton


# ----------------------------------------------------------------------------- reference
def rms_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 (fp64 stays fp64)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


def add_rms_norm_reference(x, residual, weight, eps) -> Tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rms_norm_reference(h, weight, eps), h


# ----------------------------------------------------------------------------- public API
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
             backend: Backend = AUTO) -> torch.Tensor:
    """RMSNorm over the last dim, fp32 statistics, output in x.dtype. ``weight`` may be None."""
    if use_triton(backend, x):
        from .triton.rms_norm import FusedRMSNormFn
        return FusedRMSNormFn.apply(x, None, weight, None, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
    backend: Backend = AUTO,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, h) with h = x + residual and y = rms_norm(h, weight, eps), fused in one pass."""
    if use_triton(backend, x):
        from .triton.rms_norm import FusedRMSNormFn
        return FusedRMSNormFn.apply(x, residual, weight, None, eps)
    return add_rms_norm_reference(x, residual, weight, eps)
