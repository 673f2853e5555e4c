"""The Triton chunk of the fused head loss (megaloop.kernels.softcap_ce): one kernel per chunk of
rows doing the softcap, the online max / sum of exp, the target pick and, in place of the logits,
their gradient. ``triton_chunk`` has the signature of the torch chunk math it replaces.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import cdiv, next_pow2
from .common import INTERPRET, cast_out


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _softcap_ce_kernel(
    LOGITS, TGT, LSE, M_OUT, SE_OUT, ZT_OUT, SCALE,
    n_rows, V, stride_l, local_valid, vocab_start, ignore_index, cap,
    HAS_CAP: tl.constexpr, DO_STATS: tl.constexpr, DO_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    tgt = tl.load(TGT + rows, mask=rmask, other=0)
    valid = rmask & (tgt != ignore_index)
    tloc = tgt - vocab_start
    base = LOGITS + rows64[:, None] * stride_l
    if DO_STATS:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        se = tl.zeros([BLOCK_M], tl.float32)
        zt = tl.zeros([BLOCK_M], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            lmask = rmask[:, None] & (cols < V)[None, :]
            l = tl.load(base + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
            if HAS_CAP:
                x = l / cap
                t = tl.exp(-2.0 * tl.abs(x))
                th = (1.0 - t) / (1.0 + t)
                z = cap * tl.where(x < 0, -th, th)
            else:
                z = l
            ok = rmask[:, None] & (cols < local_valid)[None, :]
            z = tl.where(ok, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            se = se * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m = m_new
            hit = ok & (cols[None, :] == tloc[:, None]) & valid[:, None]
            zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        tl.store(M_OUT + rows, m, mask=rmask)
        tl.store(SE_OUT + rows, se, mask=rmask)
        tl.store(ZT_OUT + rows, zt, mask=rmask)
        lse = m + tl.log(tl.where(se > 0, se, 1.0))  # se == 0 only on padding rows
    else:
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    if DO_GRAD:
        scale = tl.load(SCALE)
        rscale = tl.where(valid, scale, 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            lmask = rmask[:, None] & (cols < V)[None, :]
            l = tl.load(base + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
            ok = rmask[:, None] & (cols < local_valid)[None, :]
            if HAS_CAP:
                x = l / cap
                t = tl.exp(-2.0 * tl.abs(x))
                th = (1.0 - t) / (1.0 + t)
                th = tl.where(x < 0, -th, th)
                z = cap * th
            else:
                z = l
            p = tl.where(ok, tl.exp(z - lse[:, None]), 0.0)
            hit = ok & (cols[None, :] == tloc[:, None]) & valid[:, None]
            g = p - tl.where(hit, 1.0, 0.0)
            if HAS_CAP:
                g = g * (1.0 - th * th)
            g = g * rscale[:, None]
            tl.store(base + cols[None, :], cast_out(g, LOGITS.dtype.element_ty), mask=lmask)


def triton_chunk(logits, tgt, softcap, local_valid, vocab_start, ignore_index, scale, phase, lse=None):
    """phase: 'stats' -> (m, se, zt); 'grad' (needs lse); 'fused' -> (m, se, zt) + grad in place."""
    C, V = logits.shape
    dev = logits.device
    block_v = min(next_pow2(V), 1 << 14 if INTERPRET else 4096)
    target = (1 << 16) if INTERPRET else 4096
    block_m = max(1, min(next_pow2(C), target // block_v))
    grid = (cdiv(C, block_m),)
    do_stats = phase in ("stats", "fused")
    do_grad = phase in ("grad", "fused")
    m = torch.empty(C, device=dev, dtype=torch.float32) if do_stats else None
    se = torch.empty_like(m) if do_stats else None
    zt = torch.empty_like(m) if do_stats else None
    dummy = scale
    _softcap_ce_kernel[grid](
        logits, tgt, lse if lse is not None else dummy,
        m if do_stats else dummy, se if do_stats else dummy, zt if do_stats else dummy, scale,
        C, V, logits.stride(0), int(local_valid), int(vocab_start), int(ignore_index),
        float(softcap) if softcap is not None else 1.0,
        HAS_CAP=softcap is not None, DO_STATS=do_stats, DO_GRAD=do_grad,
        BLOCK_M=block_m, BLOCK_V=block_v, num_warps=8 if block_m * block_v >= 4096 else 4,
    )
    return m, se, zt
