"""The Triton hyperconnect lanes (megaloop.kernels.recurrence): hc_combine and hc_update kernels.

    hc_combine: u = sum_n alpha[n] lanes[n];  hc_update: new[i] = sum_j M[i, j] lanes[j] + beta[i] s
Math in fp32, outputs in the lanes' dtype; the gradients of the small alpha, M and beta are
reduced by torch from per-program partial sums. (The recurrence step's fused norm + additive
injection is the RMSNorm kernel's: megaloop.kernels.triton.rms_norm.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import cdiv, next_pow2
from .common import cast_out, elementwise_block


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _hc_combine_fwd_kernel(L, A, U, n, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, NP)
    emask = offs < n
    lmask = lane < N
    mask = lmask[:, None] & emask[None, :]
    x = tl.load(L + lane.to(tl.int64)[:, None] * n + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + lane, mask=lmask, other=0.0).to(tl.float32)
    u = tl.sum(a[:, None] * x, axis=0)
    tl.store(U + offs, cast_out(u, U.dtype.element_ty), mask=emask)


@triton.jit
def _hc_combine_bwd_kernel(L, A, G, DL, DAP, n, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, NP)
    emask = offs < n
    lmask = lane < N
    mask = lmask[:, None] & emask[None, :]
    loff = lane.to(tl.int64)[:, None] * n + offs[None, :]
    x = tl.load(L + loff, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=emask, other=0.0).to(tl.float32)
    a = tl.load(A + lane, mask=lmask, other=0.0).to(tl.float32)
    tl.store(DL + loff, cast_out(a[:, None] * g[None, :], DL.dtype.element_ty), mask=mask)
    tl.store(DAP + pid * N + lane, tl.sum(x * g[None, :], axis=1), mask=lmask)


@triton.jit
def _hc_update_fwd_kernel(L, S, M, B, O, n, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, NP)
    emask = offs < n
    lmask = lane < N
    mask = lmask[:, None] & emask[None, :]
    x = tl.load(L + lane.to(tl.int64)[:, None] * n + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + offs, mask=emask, other=0.0).to(tl.float32)
    for i in tl.static_range(N):
        m_i = tl.load(M + i * N + lane, mask=lmask, other=0.0).to(tl.float32)  # row i of M
        b_i = tl.load(B + i).to(tl.float32)
        o = tl.sum(m_i[:, None] * x, axis=0) + b_i * s
        tl.store(O + i * n + offs, cast_out(o, O.dtype.element_ty), mask=emask)


@triton.jit
def _hc_update_bwd_kernel(L, S, M, B, G, DL, DS, DMP, DBP, n,
                          N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, NP)
    emask = offs < n
    lmask = lane < N
    mask = lmask[:, None] & emask[None, :]
    loff = lane.to(tl.int64)[:, None] * n + offs[None, :]
    g = tl.load(G + loff, mask=mask, other=0.0).to(tl.float32)          # g[i, e]
    s = tl.load(S + offs, mask=emask, other=0.0).to(tl.float32)
    b = tl.load(B + lane, mask=lmask, other=0.0).to(tl.float32)
    tl.store(DS + offs, cast_out(tl.sum(b[:, None] * g, axis=0), DS.dtype.element_ty), mask=emask)
    tl.store(DBP + pid * N + lane, tl.sum(g * s[None, :], axis=1), mask=lmask)
    for j in tl.static_range(N):
        m_j = tl.load(M + lane * N + j, mask=lmask, other=0.0).to(tl.float32)  # column j of M
        tl.store(DL + j * n + offs, cast_out(tl.sum(m_j[:, None] * g, axis=0), DL.dtype.element_ty), mask=emask)
        x_j = tl.load(L + j * n + offs, mask=emask, other=0.0).to(tl.float32)
        # dM[i, j] = sum_e g[i, e] * lanes[j, e]
        tl.store(DMP + pid * N * N + lane * N + j, tl.sum(g * x_j[None, :], axis=1), mask=lmask)


def _hc_block(n, N):
    NP = next_pow2(N)
    block = max(16, elementwise_block(n) // NP) if n else 16
    return NP, block, (cdiv(n, block) if n else 0,)


class HCCombineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lanes, alpha):
        N = lanes.shape[0]
        L = lanes.contiguous().view(N, -1)
        n = L.shape[1]
        a = alpha.contiguous()
        u = torch.empty(lanes.shape[1:], device=lanes.device, dtype=lanes.dtype)
        NP, block, grid = _hc_block(n, N)
        if n:
            _hc_combine_fwd_kernel[grid](L, a, u, n, N=N, NP=NP, BLOCK=block, num_warps=4)
        ctx.save_for_backward(L, a)
        ctx.lane_shape = lanes.shape
        return u

    @staticmethod
    def backward(ctx, g):
        L, a = ctx.saved_tensors
        N, n = L.shape
        g = g.contiguous()
        dL = torch.empty_like(L)
        NP, block, grid = _hc_block(n, N)
        dap = torch.zeros((max(grid[0], 1), N), device=L.device, dtype=torch.float32)
        if n:
            _hc_combine_bwd_kernel[grid](L, a, g, dL, dap, n, N=N, NP=NP, BLOCK=block, num_warps=4)
        da = dap.sum(0).to(a.dtype) if ctx.needs_input_grad[1] else None
        return dL.view(ctx.lane_shape), da


class HCUpdateFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lanes, s, M, beta):
        N = lanes.shape[0]
        if tuple(M.shape) != (N, N) or beta.numel() != N or tuple(s.shape) != tuple(lanes.shape[1:]):
            raise ValueError(f"hc_update shapes: lanes {tuple(lanes.shape)}, s {tuple(s.shape)}, "
                             f"M {tuple(M.shape)}, beta {tuple(beta.shape)}")
        L = lanes.contiguous().view(N, -1)
        n = L.shape[1]
        s1 = s.contiguous().view(-1)
        Mc, bc = M.contiguous(), beta.contiguous()
        out = torch.empty((N, n), device=lanes.device, dtype=lanes.dtype)
        NP, block, grid = _hc_block(n, N)
        if n:
            _hc_update_fwd_kernel[grid](L, s1, Mc, bc, out, n, N=N, NP=NP, BLOCK=block, num_warps=4)
        ctx.save_for_backward(L, s1, Mc, bc)
        ctx.shapes = (lanes.shape, s.shape)
        return out.view(lanes.shape)

    @staticmethod
    def backward(ctx, g):
        L, s1, Mc, bc = ctx.saved_tensors
        N, n = L.shape
        g = g.contiguous().view(N, n)
        dL = torch.empty_like(L)
        ds = torch.empty_like(s1)
        NP, block, grid = _hc_block(n, N)
        nprog = max(grid[0], 1)
        dmp = torch.zeros((nprog, N, N), device=L.device, dtype=torch.float32)
        dbp = torch.zeros((nprog, N), device=L.device, dtype=torch.float32)
        if n:
            _hc_update_bwd_kernel[grid](L, s1, Mc, bc, g, dL, ds, dmp, dbp, n, N=N, NP=NP, BLOCK=block, num_warps=4)
        lane_shape, s_shape = ctx.shapes
        dM = dmp.sum(0).to(Mc.dtype) if ctx.needs_input_grad[2] else None
        db = dbp.sum(0).to(bc.dtype).view_as(bc) if ctx.needs_input_grad[3] else None
        return dL.view(lane_shape), ds.view(s_shape), dM, db
