"""The recurrence step of the looped model: state norm + input injection, and hyperconnect lanes.

    recur_norm_inject(h, e, norm_weight, eps, mode, inject_weight=None) -> (s, u)
        s = rms_norm(h) * norm_weight          (norm_recur after a pass through the group)
        u = input of the next pass:
            'additive'    u = s + e            (fused into the norm kernel: one pass over h, e)
            'passthrough' u = s
            'linear'      u = e @ W[:, :d].T + s @ W[:, d:].T   (W = inject_weight [d, 2d]),
                          two matmuls accumulated into one output; cat([e, s]) never exists.
    inject(e, s, mode, inject_weight=None) -> u      (the same injection without the norm)

    hc_combine(lanes, alpha) -> u                  u = sum_n alpha[n] * lanes[n]
    hc_update(lanes, s, M, beta) -> new_lanes      new[i] = sum_j M[i, j] lanes[j] + beta[i] s
        lanes [N, *, d] (N small: 2-4), alpha/beta [N], M [N, N]. Outputs in lanes.dtype, math
        in fp32; gradients for lanes, s, alpha, M, beta (the small ones reduced from per-program
        partial sums).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .dispatch import backend_for, cdiv, elementwise_block, lazy_jit, next_pow2
from .rms_norm import FusedRMSNormFn, rms_norm, rms_norm_reference

tl = None  # triton.language and cast_out are bound by dispatch.LazyKernel on the first launch
cast_out = None  # (so triton stays optional and is never imported with this package)

MODES = ("linear", "additive", "passthrough")


# ----------------------------------------------------------------------------- references
def inject_reference(e, s, mode, inject_weight=None):
    """Plain formulas (the linear one with the concatenation, as written in the paper)."""
    if mode == "additive":
        return s + e
    if mode == "passthrough":
        return s
    if mode == "linear":
        return torch.nn.functional.linear(torch.cat([e, s], dim=-1), inject_weight)
    raise ValueError(f"unknown injection mode {mode!r}; expected one of {MODES}")


def recur_norm_inject_reference(h, e, norm_weight, eps, mode, inject_weight=None):
    s = rms_norm_reference(h, norm_weight, eps)
    return s, inject_reference(e, s, mode, inject_weight)


def _bshape(t, n_extra):
    return t.reshape(t.shape[0], *([1] * n_extra))


def hc_combine_reference(lanes, alpha):
    lanes = _stack(lanes)
    ct = torch.promote_types(lanes.dtype, torch.float32)
    return (_bshape(alpha.to(ct), lanes.dim() - 1) * lanes.to(ct)).sum(0).to(lanes.dtype)


def hc_update_reference(lanes, s, M, beta):
    lanes = _stack(lanes)
    n_extra = lanes.dim() - 1
    ct = torch.promote_types(lanes.dtype, torch.float32)
    mixed = torch.tensordot(M.to(ct), lanes.to(ct), dims=([1], [0]))
    return (mixed + _bshape(beta.to(ct), n_extra) * s.to(ct).unsqueeze(0)).to(lanes.dtype)


def _stack(lanes) -> torch.Tensor:
    if isinstance(lanes, (list, tuple)):
        return torch.stack(list(lanes))
    return lanes


# ----------------------------------------------------------------------------- linear injection
class LinearInjectFn(torch.autograd.Function):
    """u = e @ W1.T + s @ W2.T with W = [W1 | W2]; no concatenated input is ever built."""

    @staticmethod
    def forward(ctx, e, s, W):
        d = e.shape[-1]
        if W.shape[1] != 2 * d or s.shape[-1] != d:
            raise ValueError(f"inject_weight must be [d_out, 2*{d}], got {tuple(W.shape)}")
        dt = e.dtype
        if torch.is_autocast_enabled(e.device.type):
            dt = torch.get_autocast_dtype(e.device.type)
        e2 = e.reshape(-1, d).to(dt)
        s2 = s.reshape(-1, d).to(dt)
        Wc = W.to(dt)
        u = torch.mm(e2, Wc[:, :d].t())
        u.addmm_(s2, Wc[:, d:].t())
        ctx.save_for_backward(e2, s2, Wc)
        ctx.meta = (e.shape, e.dtype, s.dtype, W.dtype)
        return u.view(*e.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, gu):
        e2, s2, Wc = ctx.saved_tensors
        e_shape, e_dtype, s_dtype, w_dtype = ctx.meta
        d = e2.shape[1]
        g2 = gu.reshape(-1, Wc.shape[0]).to(Wc.dtype)
        ge = gs = gW = None
        if ctx.needs_input_grad[0]:
            ge = torch.mm(g2, Wc[:, :d]).view(e_shape).to(e_dtype)
        if ctx.needs_input_grad[1]:
            gs = torch.mm(g2, Wc[:, d:]).view(e_shape).to(s_dtype)
        if ctx.needs_input_grad[2]:
            gW = torch.empty(Wc.shape, device=Wc.device, dtype=w_dtype)
            gW[:, :d] = torch.mm(g2.t(), e2)
            gW[:, d:] = torch.mm(g2.t(), s2)
        return ge, gs, gW


class StateInjectFn(torch.autograd.Function):
    """u = e_half + s @ W2.T with W = [W1 | W2], where e_half = e @ W1.T was computed once for all
    passes (inject_e_half): every pass reads the same e, so only the state half is per pass. The
    gradient of W1 then comes from e_half's own backward, once, from the passes' summed gradients."""

    @staticmethod
    def forward(ctx, e_half, s, W):
        d = s.shape[-1]
        if W.shape[1] != 2 * d:
            raise ValueError(f"inject_weight must be [d_out, 2*{d}], got {tuple(W.shape)}")
        dt = s.dtype
        if torch.is_autocast_enabled(s.device.type):
            dt = torch.get_autocast_dtype(s.device.type)
        s2 = s.reshape(-1, d).to(dt)
        W2 = W[:, d:].to(dt)
        u = torch.addmm(e_half.reshape(-1, W.shape[0]).to(dt), s2, W2.t())
        ctx.save_for_backward(s2, W2)
        ctx.meta = (s.shape, e_half.dtype, s.dtype, W.dtype, W.shape)
        return u.view(*s.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, gu):
        s2, W2 = ctx.saved_tensors
        s_shape, eh_dtype, s_dtype, w_dtype, w_shape = ctx.meta
        d = s2.shape[1]
        g2 = gu.reshape(-1, w_shape[0]).to(W2.dtype)
        geh = gs = gW = None
        if ctx.needs_input_grad[0]:
            geh = gu.to(eh_dtype)
        if ctx.needs_input_grad[1]:
            gs = torch.mm(g2, W2).view(s_shape).to(s_dtype)
        if ctx.needs_input_grad[2]:
            gW = torch.zeros(w_shape, device=W2.device, dtype=w_dtype)
            gW[:, d:] = torch.mm(g2.t(), s2)
        return geh, gs, gW


def inject_e_half(e: torch.Tensor, inject_weight: torch.Tensor) -> torch.Tensor:
    """e @ W1.T, the part of linear injection that every pass shares (W = [W1 | W2])."""
    return torch.nn.functional.linear(e, inject_weight[:, : e.shape[-1]])


def inject(e: torch.Tensor, s: torch.Tensor, mode: str, inject_weight: Optional[torch.Tensor] = None,
           e_half: Optional[torch.Tensor] = None):
    """The input of a pass through the recurrent group from the prelude output e and state s.
    Linear injection with e_half (= inject_e_half(e, W), computed once for the passes that read
    the same e) computes only the state half."""
    if mode == "additive":
        return s + e
    if mode == "passthrough":
        return s
    if mode == "linear":
        if inject_weight is None:
            raise ValueError("mode 'linear' needs inject_weight [d, 2d]")
        if e_half is not None:
            return StateInjectFn.apply(e_half, s, inject_weight)
        return LinearInjectFn.apply(e, s, inject_weight)
    raise ValueError(f"unknown injection mode {mode!r}; expected one of {MODES} "
                     "(hyperconnect uses hc_combine / hc_update)")


def recur_norm_inject(h: torch.Tensor, e: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float,
                      mode: str, inject_weight: Optional[torch.Tensor] = None,
                      e_half: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s, u): s = rms_norm(h) * norm_weight, u = inject(e, s, mode, inject_weight, e_half)."""
    if mode not in MODES:
        raise ValueError(f"unknown injection mode {mode!r}; expected one of {MODES}")
    if mode == "additive":
        if backend_for(h) == "triton":
            s, u = FusedRMSNormFn.apply(h, None, norm_weight, e, eps)
            return s, u
        s = rms_norm_reference(h, norm_weight, eps)
        return s, s + e
    s = rms_norm(h, norm_weight, eps)
    return s, inject(e, s, mode, inject_weight, e_half)


# ----------------------------------------------------------------------------- hyperconnect kernels
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


_combine_fwd = lazy_jit(_hc_combine_fwd_kernel)
_combine_bwd = lazy_jit(_hc_combine_bwd_kernel)
_update_fwd = lazy_jit(_hc_update_fwd_kernel)
_update_bwd = lazy_jit(_hc_update_bwd_kernel)


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
            _combine_fwd[grid](L, a, u, n, N=N, NP=NP, BLOCK=block, num_warps=4)
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
            _combine_bwd[grid](L, a, g, dL, dap, n, N=N, NP=NP, BLOCK=block, num_warps=4)
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
            _update_fwd[grid](L, s1, Mc, bc, out, n, N=N, NP=NP, BLOCK=block, num_warps=4)
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
            _update_bwd[grid](L, s1, Mc, bc, g, dL, ds, dmp, dbp, n, N=N, NP=NP, BLOCK=block, num_warps=4)
        lane_shape, s_shape = ctx.shapes
        dM = dmp.sum(0).to(Mc.dtype) if ctx.needs_input_grad[2] else None
        db = dbp.sum(0).to(bc.dtype).view_as(bc) if ctx.needs_input_grad[3] else None
        return dL.view(lane_shape), ds.view(s_shape), dM, db


def hc_combine(lanes: Union[torch.Tensor, Sequence[torch.Tensor]], alpha: torch.Tensor) -> torch.Tensor:
    """u = sum_n alpha[n] * lanes[n]; lanes [N, *, d] (or a list of N tensors), alpha [N]."""
    lanes = _stack(lanes)
    if backend_for(lanes) == "triton":
        return HCCombineFn.apply(lanes, alpha)
    return hc_combine_reference(lanes, alpha)


def hc_update(lanes: Union[torch.Tensor, Sequence[torch.Tensor]], s: torch.Tensor, M: torch.Tensor,
              beta: torch.Tensor) -> torch.Tensor:
    """new_lanes[i] = sum_j M[i, j] * lanes[j] + beta[i] * s."""
    lanes = _stack(lanes)
    if backend_for(lanes) == "triton":
        return HCUpdateFn.apply(lanes, s, M, beta)
    return hc_update_reference(lanes, s, M, beta)
