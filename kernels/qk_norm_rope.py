"""Rotary embedding followed by the parameter-free QK RMSNorm, for q and k in one call.

    qk_norm_rope(q, k, cos, sin, eps) -> (q_out, k_out)

q [B, T, Hq, D], k [B, T, Hk, D] (GQA: Hk may differ from Hq), cos/sin [T, D/2] (any shape with
T*D/2 elements, e.g. [1, T, 1, D/2]; any float dtype, used in fp32). Half-split rotary FIRST:
    x1, x2 = x[..., :D/2], x[..., D/2:]
    y1 = x1*cos + x2*sin ;  y2 = -x1*sin + x2*cos
THEN RMSNorm over D (no weight): out = y * rsqrt(mean(y^2) + eps). fp32 math, output in the
input dtype, contiguous [B, T, H, D].

``backend`` picks the reference below or the Triton kernels of megaloop.kernels.triton.qk_norm_rope,
which read q/k through their strides (a [B, T, H, D] view of a fused qkv linear output needs no
copy as long as the last dim has unit stride) and recompute the rotation in backward, so no fp32
intermediate is kept.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .dispatch import AUTO, Backend, use_triton


# ----------------------------------------------------------------------------- reference
def _cos_sin(cos, sin, T, half):
    return cos.reshape(T, half).float(), sin.reshape(T, half).float()


def rope_norm_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    B, T, H, D = x.shape
    half = D // 2
    ct = torch.promote_types(x.dtype, torch.float32)
    c, s = _cos_sin(cos, sin, T, half)
    c = c.to(ct)[None, :, None, :]
    s = s.to(ct)[None, :, None, :]
    xf = x.to(ct)
    x1, x2 = xf[..., :half], xf[..., half:]
    y = torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c], dim=-1)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype)


def qk_norm_rope_reference(q, k, cos, sin, eps) -> Tuple[torch.Tensor, torch.Tensor]:
    return rope_norm_reference(q, cos, sin, eps), rope_norm_reference(k, cos, sin, eps)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float = 1e-6, backend: Backend = AUTO) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary (half-split) then parameter-free RMSNorm on q [B,T,Hq,D] and k [B,T,Hk,D]."""
    if use_triton(backend, q):
        from .triton.qk_norm_rope import QKNormRopeFn
        return QKNormRopeFn.apply(q, k, cos, sin, eps)
    return qk_norm_rope_reference(q, k, cos, sin, eps)
