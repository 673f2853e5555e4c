"""The Triton rotary + QK RMSNorm (megaloop.kernels.qk_norm_rope): forward and backward kernels.

q/k are read through their strides (a [B, T, H, D] view of a fused qkv linear output needs no
copy as long as the last dim has unit stride). Backward recomputes the rotation from the saved
input, so no fp32 intermediate is kept.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import cdiv, next_pow2
from .common import cast_out, num_warps_for, rows_per_program


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _rope_norm_fwd_kernel(
    X, COS, SIN, Y, n_rows, T, H, half, sxb, sxt, sxh, eps,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < n_rows
    cmask = cols < half
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    h = rows64 % H
    t = (rows64 // H) % T
    b = rows64 // (H * T)
    xoff = (b * sxb + t * sxt + h * sxh)[:, None] + cols[None, :]
    x1 = tl.load(X + xoff, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + xoff + half, mask=mask, other=0.0).to(tl.float32)
    csoff = t[:, None] * half + cols[None, :]
    c = tl.load(COS + csoff, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + csoff, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c + x2 * s
    y2 = x2 * c - x1 * s
    ms = (tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)) / (2 * half)
    rstd = tl.rsqrt(ms + eps)
    yoff = rows64[:, None] * (2 * half) + cols[None, :]
    tl.store(Y + yoff, cast_out(y1 * rstd[:, None], Y.dtype.element_ty), mask=mask)
    tl.store(Y + yoff + half, cast_out(y2 * rstd[:, None], Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_norm_bwd_kernel(
    X, COS, SIN, DY, DX, n_rows, T, H, half, sxb, sxt, sxh, sdb, sdt, sdh, eps,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < n_rows
    cmask = cols < half
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    h = rows64 % H
    t = (rows64 // H) % T
    b = rows64 // (H * T)
    xoff = (b * sxb + t * sxt + h * sxh)[:, None] + cols[None, :]
    doff = (b * sdb + t * sdt + h * sdh)[:, None] + cols[None, :]
    x1 = tl.load(X + xoff, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + xoff + half, mask=mask, other=0.0).to(tl.float32)
    g1 = tl.load(DY + doff, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(DY + doff + half, mask=mask, other=0.0).to(tl.float32)
    csoff = t[:, None] * half + cols[None, :]
    c = tl.load(COS + csoff, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + csoff, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c + x2 * s
    y2 = x2 * c - x1 * s
    ms = (tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)) / (2 * half)
    rstd = tl.rsqrt(ms + eps)
    n1 = y1 * rstd[:, None]
    n2 = y2 * rstd[:, None]
    dot = (tl.sum(n1 * g1, axis=1) + tl.sum(n2 * g2, axis=1)) / (2 * half)
    dz1 = (g1 - n1 * dot[:, None]) * rstd[:, None]
    dz2 = (g2 - n2 * dot[:, None]) * rstd[:, None]
    # transpose of the rotation
    dx1 = dz1 * c - dz2 * s
    dx2 = dz1 * s + dz2 * c
    yoff = rows64[:, None] * (2 * half) + cols[None, :]
    tl.store(DX + yoff, cast_out(dx1, DX.dtype.element_ty), mask=mask)
    tl.store(DX + yoff + half, cast_out(dx2, DX.dtype.element_ty), mask=mask)


def _prep(x):
    if x.dim() != 4:
        raise ValueError(f"qk_norm_rope expects [B, T, H, D] tensors, got shape {tuple(x.shape)}")
    if x.shape[-1] % 2:
        raise ValueError("qk_norm_rope needs an even head dim")
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_sizes(n_rows, half):
    block_h = next_pow2(half)
    block_m = rows_per_program(n_rows, 2 * block_h)
    return block_m, block_h, (cdiv(n_rows, block_m),), num_warps_for(2 * block_m * block_h)


def _fwd_one(x, c, s, eps):
    x = _prep(x)
    B, T, H, D = x.shape
    half = D // 2
    y = torch.empty((B, T, H, D), device=x.device, dtype=x.dtype)
    n_rows = B * T * H
    if n_rows:
        bm, bh, grid, nw = _launch_sizes(n_rows, half)
        _rope_norm_fwd_kernel[grid](x, c, s, y, n_rows, T, H, half, x.stride(0), x.stride(1), x.stride(2), float(eps),
                   BLOCK_M=bm, BLOCK_H=bh, num_warps=nw)
    return y


def _bwd_one(x, c, s, g, eps):
    B, T, H, D = x.shape
    half = D // 2
    g = g if g.stride(-1) == 1 else g.contiguous()
    dx = torch.empty((B, T, H, D), device=x.device, dtype=x.dtype)
    n_rows = B * T * H
    if n_rows:
        bm, bh, grid, nw = _launch_sizes(n_rows, half)
        _rope_norm_bwd_kernel[grid](x, c, s, g, dx, n_rows, T, H, half, x.stride(0), x.stride(1), x.stride(2),
                   g.stride(0), g.stride(1), g.stride(2), float(eps), BLOCK_M=bm, BLOCK_H=bh, num_warps=nw)
    return dx


class QKNormRopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, eps):
        T, half = q.shape[1], q.shape[-1] // 2
        if k.shape[1] != T or k.shape[-1] != q.shape[-1] or k.shape[0] != q.shape[0]:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, T and D")
        c = cos.reshape(T, half).contiguous()
        s = sin.reshape(T, half).contiguous()
        q, k = _prep(q), _prep(k)
        qo = _fwd_one(q, c, s, eps)
        ko = _fwd_one(k, c, s, eps)
        ctx.save_for_backward(q, k, c, s)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return qo, ko

    @staticmethod
    def backward(ctx, gq, gk):
        q, k, c, s = ctx.saved_tensors
        dq = _bwd_one(q, c, s, gq, ctx.eps) if (gq is not None and ctx.needs_input_grad[0]) else None
        dk = _bwd_one(k, c, s, gk, ctx.eps) if (gk is not None and ctx.needs_input_grad[1]) else None
        return dq, dk, None, None, None
