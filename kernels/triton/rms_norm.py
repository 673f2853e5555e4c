"""The Triton RMSNorm (megaloop.kernels.rms_norm): forward and backward kernels and their autograd op.

One forward kernel (2-D tiles of BLOCK_M rows x the whole width) that saves the per-row rstd,
optionally adding a residual before the norm (h = x + residual) and an input after it
(u = y + e, the recurrence step); one backward kernel that recomputes x_hat from the saved input
and rstd, writes dx, and accumulates the weight gradient per program (persistent programs over
row blocks), the partial sums being added up by torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import cdiv, next_pow2
from .common import as_rows, cast_out, num_sms, num_warps_for, rows_per_program


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _rms_fwd_kernel(
    X, R, W, E, Y, H, U, RSTD,
    n_rows, n_cols, sx, sr, se, sy, sh, su, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    cmask = cols < n_cols
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + rows64[:, None] * sr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        hq = cast_out(x + r, H.dtype.element_ty)  # h as the caller will see it (rounded)
        tl.store(H + rows64[:, None] * sh + cols[None, :], hq, mask=mask)
        x = hq.to(tl.float32)
    ms = tl.sum(x * x, axis=1) / n_cols
    rstd = tl.rsqrt(ms + eps)
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    yq = cast_out(y, Y.dtype.element_ty)
    tl.store(Y + rows64[:, None] * sy + cols[None, :], yq, mask=mask)
    if HAS_E:
        e = tl.load(E + rows64[:, None] * se + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = yq.to(tl.float32) + e
        tl.store(U + rows64[:, None] * su + cols[None, :], cast_out(u, U.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_bwd_kernel(
    DY, DY2, X, W, RSTD, DX, DX2, DWP,
    n_rows, n_cols, sdy, sdy2, sx, sdx, sdx2, n_blocks,
    HAS_W: tl.constexpr, HAS_DY2: tl.constexpr, HAS_DX2: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for rb in range(pid, n_blocks, nprog):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DY2:
            dy += tl.load(DY2 + rows64[:, None] * sdy2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c = tl.sum(xhat * wdy, axis=1) / n_cols
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        if HAS_DX2:
            dx += tl.load(DX2 + rows64[:, None] * sdx2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * sdx + cols[None, :], cast_out(dx, DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
    if COMPUTE_DW:
        tl.store(DWP + pid * n_cols + cols, dw_acc, mask=cmask)


def rms_fwd_launch(x2, weight, eps, residual2=None, e2=None, out_dtype=None, u_dtype=None):
    """Launch the forward kernel on 2-D row views. Returns (y, h or None, u or None, rstd)."""
    n_rows, n_cols = x2.shape
    dev = x2.device
    out_dtype = out_dtype or x2.dtype
    y = torch.empty((n_rows, n_cols), device=dev, dtype=out_dtype)
    h = torch.empty((n_rows, n_cols), device=dev, dtype=out_dtype) if residual2 is not None else None
    u = torch.empty((n_rows, n_cols), device=dev, dtype=u_dtype or out_dtype) if e2 is not None else None
    rstd = torch.empty((n_rows,), device=dev, dtype=torch.float32)
    if n_rows == 0:
        return y, h, u, rstd
    block_n = next_pow2(n_cols)
    block_m = rows_per_program(n_rows, block_n)
    grid = (cdiv(n_rows, block_m),)
    dummy = y
    _rms_fwd_kernel[grid](
        x2, residual2 if residual2 is not None else dummy, weight if weight is not None else dummy,
        e2 if e2 is not None else dummy, y, h if h is not None else dummy, u if u is not None else dummy, rstd,
        n_rows, n_cols, x2.stride(0),
        residual2.stride(0) if residual2 is not None else 0, e2.stride(0) if e2 is not None else 0,
        y.stride(0), h.stride(0) if h is not None else 0, u.stride(0) if u is not None else 0, float(eps),
        HAS_RES=residual2 is not None, HAS_W=weight is not None, HAS_E=e2 is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n),
    )
    return y, h, u, rstd


def rms_bwd_launch(dy2, x2, weight, rstd, dy_extra2=None, dx_extra2=None, dx_dtype=None, need_dw=True):
    """Backward on 2-D row views. Returns (dx, dw or None); dw in fp32."""
    n_rows, n_cols = x2.shape
    dev = x2.device
    dx = torch.empty((n_rows, n_cols), device=dev, dtype=dx_dtype or x2.dtype)
    compute_dw = weight is not None and need_dw
    block_n = next_pow2(n_cols)
    block_m = rows_per_program(n_rows, block_n)
    n_blocks = cdiv(n_rows, block_m) if n_rows else 0
    n_prog = max(1, min(n_blocks, num_sms(dev) * 4))
    dwp = torch.empty((n_prog, n_cols), device=dev, dtype=torch.float32) if compute_dw else None
    if n_rows == 0:
        return dx, (torch.zeros(n_cols, device=dev, dtype=torch.float32) if compute_dw else None)
    dummy = dx
    _rms_bwd_kernel[(n_prog,)](
        dy2, dy_extra2 if dy_extra2 is not None else dummy, x2, weight if weight is not None else dummy, rstd,
        dx, dx_extra2 if dx_extra2 is not None else dummy, dwp if dwp is not None else rstd,
        n_rows, n_cols, dy2.stride(0), dy_extra2.stride(0) if dy_extra2 is not None else 0, x2.stride(0),
        dx.stride(0), dx_extra2.stride(0) if dx_extra2 is not None else 0, n_blocks,
        HAS_W=weight is not None, HAS_DY2=dy_extra2 is not None, HAS_DX2=dx_extra2 is not None,
        COMPUTE_DW=compute_dw, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n),
    )
    dw = dwp.sum(0) if compute_dw else None
    return dx, dw


class FusedRMSNormFn(torch.autograd.Function):
    """y = rms_norm(x [+ residual]) * weight, optionally u = y + e; outputs (y[, h][, u])."""

    @staticmethod
    def forward(ctx, x, residual, weight, e, eps):
        shape = x.shape
        d = shape[-1]
        x2 = as_rows(x, d)
        r2 = as_rows(residual, d) if residual is not None else None
        e2 = as_rows(e, d) if e is not None else None
        out_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
        u_dtype = torch.promote_types(out_dtype, e.dtype) if e is not None else None
        y, h, u, rstd = rms_fwd_launch(x2, weight, eps, r2, e2, out_dtype=out_dtype, u_dtype=u_dtype)
        ctx.save_for_backward(h if h is not None else x2, weight, rstd)
        ctx.has_res = residual is not None
        ctx.has_e = e is not None
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None, e.dtype if e is not None else None)
        ctx.shape = shape
        ctx.set_materialize_grads(False)
        outs = [y.view(shape)]
        if h is not None:
            outs.append(h.view(shape))
        if u is not None:
            outs.append(u.view(shape))
        return tuple(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        xs, weight, rstd = ctx.saved_tensors
        d = xs.shape[-1]
        gy = grads[0]
        gh = grads[1] if ctx.has_res else None
        gu = grads[-1] if ctx.has_e else None
        x_dtype, r_dtype, e_dtype = ctx.dtypes
        need_x = ctx.needs_input_grad[0] or (ctx.has_res and ctx.needs_input_grad[1])
        need_w = weight is not None and ctx.needs_input_grad[2]
        # the gradient reaching the norm output: dy (+ du, since u = y + e)
        g_main, g_extra = gy, None
        if gu is not None:
            if g_main is None:
                g_main = gu
            else:
                g_extra = gu
        dx = dw = None
        if g_main is not None and (need_x or need_w):
            dx2, dw = rms_bwd_launch(
                as_rows(g_main, d), xs, weight, rstd,
                dy_extra2=as_rows(g_extra, d) if g_extra is not None else None,
                dx_extra2=as_rows(gh, d) if gh is not None else None,
                dx_dtype=torch.float32 if (ctx.has_res and r_dtype != x_dtype) else x_dtype,
                need_dw=need_w,
            )
            dx = dx2.view(ctx.shape)
        elif gh is not None:
            dx = gh
        dx_in = dx.to(x_dtype) if (dx is not None and ctx.needs_input_grad[0]) else None
        dres = dx.to(r_dtype) if (ctx.has_res and dx is not None and ctx.needs_input_grad[1]) else None
        dw_out = dw.to(weight.dtype) if (dw is not None and need_w) else None
        de = gu.to(e_dtype) if (ctx.has_e and gu is not None and ctx.needs_input_grad[3]) else None
        return dx_in, dres, dw_out, de, None
