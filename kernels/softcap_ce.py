"""Fused LM head + logit softcap + cross-entropy, chunked over rows, optionally vocab-parallel.

    softcap_cross_entropy(hidden, weight, targets, softcap, ignore_index=-100, tp_group=None,
                          vocab_start=0, vocab_valid=None, chunk_size=None) -> loss

loss = mean over non-ignored rows of  logsumexp(z) - z[target],  z = softcap*tanh(h W^T / softcap)
(softcap None: z = h W^T), z computed in fp32 from the logits matmul in the input dtype.

- hidden [N, d] (or [..., d]), weight [V_local, d] = this rank's LM-head rows, targets [N] (or
  [...]) int64 GLOBAL vocab ids; ignore_index rows add nothing. If every row is ignored the
  loss is 0 (F.cross_entropy would return nan).
- Rows are processed in chunks of ``chunk_size`` so only a [chunk, V_local] logits block exists
  at a time. The backward is done in the same pass: per chunk the logits block is overwritten
  with dloss/dlogits, then grad_hidden[chunk] = dlogits @ W and grad_weight += dlogits^T @ h
  (accumulated in fp32). Both are stored and returned in backward scaled by grad_output.
  Under torch.no_grad (or when neither input needs a gradient) only the loss is computed.
- Vocab-parallel (tp_group of size > 1): local column j is global id vocab_start + j; per chunk
  the row max is all-reduced (MAX), then the rescaled sum of exp and the target logit (taken
  on the rank that owns it) in one SUM all-reduce. grad_hidden is this rank's partial sum (the
  caller all-reduces it); grad_weight is for the local shard.
- Columns with global id >= vocab_valid are padding: logit -inf, zero gradient (also without
  tensor parallelism).

Backends (``backend``): Triton (megaloop.kernels.triton.softcap_ce, a per-chunk kernel doing the
softcap, online max/sum-exp, target pick and the in-place gradient of the logits) or the same
chunked algorithm in plain torch. The unfused
reference ``softcap_cross_entropy_reference`` (F.linear -> softcap -> F.cross_entropy) is for
tests.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import AUTO, Backend, next_pow2, use_triton


# ----------------------------------------------------------------------------- unfused reference
def softcap_cross_entropy_reference(hidden, weight, targets, softcap, ignore_index=-100, vocab_valid=None):
    """Plain single-process formula: F.linear -> fp32 softcap -> mask padding -> F.cross_entropy."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if vocab_valid is not None and vocab_valid < logits.shape[-1]:
        pad = torch.arange(logits.shape[-1], device=logits.device) >= vocab_valid
        logits = logits.masked_fill(pad, float("-inf"))
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index)


# ----------------------------------------------------------------------------- torch chunk math
def _torch_capped(logits, softcap, local_valid):
    z = logits.to(torch.float32, copy=True)  # never alias the logits buffer
    th = None
    if softcap is not None:
        th = torch.tanh(z / softcap)
        z = softcap * th
    if local_valid < z.shape[1]:
        z[:, local_valid:] = float("-inf")
    return z, th


def _torch_chunk(logits, tgt, softcap, local_valid, vocab_start, ignore_index, scale, phase, lse=None):
    C, V = logits.shape
    z, th = _torch_capped(logits, softcap, local_valid)
    valid = tgt != ignore_index
    tloc = tgt - vocab_start
    owned = valid & (tloc >= 0) & (tloc < local_valid)
    idx = torch.where(owned, tloc, torch.zeros_like(tloc)).unsqueeze(1)
    m = se = zt = None
    if phase in ("stats", "fused"):
        m = z.max(dim=1).values
        m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
        se = torch.exp(z - m_safe[:, None]).sum(1)
        zt = torch.where(owned, z.gather(1, idx).squeeze(1), torch.zeros_like(m))
        lse = m + torch.log(se)
    if phase in ("grad", "fused"):
        g = torch.exp(z - lse[:, None])
        g.scatter_add_(1, idx, -owned.to(g.dtype).unsqueeze(1))
        if th is not None:
            g.mul_(1.0 - th * th)
        if local_valid < V:
            g[:, local_valid:] = 0.0
        g.mul_(torch.where(valid, scale, torch.zeros_like(scale)).unsqueeze(1))
        logits.copy_(g)
    return m, se, zt


# ----------------------------------------------------------------------------- driver
def _default_chunk(n_rows, d, V):
    # Keep a chunk's logits about as large as the hidden states (Liger's heuristic), 256..n_rows.
    ratio = max(1, math.ceil(V / max(1, d)))
    return max(1, min(n_rows, max(256, next_pow2(math.ceil(n_rows / ratio)))))


def _tp_size(group):
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_initialized() else 1


class SoftcapCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, ignore_index, tp_group, vocab_start, vocab_valid,
                chunk_size, chunk_fn, need_grad):
        d = hidden.shape[-1]
        h2 = hidden.reshape(-1, d)
        tg = targets.reshape(-1)
        N, V = h2.shape[0], weight.shape[0]
        if tg.shape[0] != N:
            raise ValueError(f"targets has {tg.shape[0]} rows, hidden has {N}")
        tp = _tp_size(tp_group) > 1
        local_valid = V if vocab_valid is None else max(0, min(V, int(vocab_valid) - int(vocab_start)))
        chunk = int(chunk_size) if chunk_size else _default_chunk(N, d, V)
        need_h = need_grad and ctx.needs_input_grad[0]
        need_w = need_grad and ctx.needs_input_grad[1]
        do_grad = need_h or need_w

        n_valid = (tg != ignore_index).sum()
        scale = (1.0 / n_valid.clamp(min=1).to(torch.float32)).reshape(1)
        loss_sum = torch.zeros((), device=h2.device, dtype=torch.float32)
        gh = torch.empty_like(h2) if need_h else None
        gw = torch.zeros((V, d), device=h2.device, dtype=torch.float32) if need_w else None
        tgc = tg.contiguous()
        # One compute dtype for every product of the chunk loop: under autocast the head matmul
        # runs in the autocast dtype (bf16), and `out=` products are not autocast-eligible, so
        # cast explicitly and run the loop with autocast off.
        dev = h2.device.type
        if torch.is_autocast_enabled(dev):
            cdt = torch.get_autocast_dtype(dev)
        else:
            cdt = torch.promote_types(h2.dtype, weight.dtype)
        w_c = weight.to(cdt)
        with torch.autocast(dev, enabled=False):
            loss_sum = SoftcapCEFn._chunks(h2.to(cdt), w_c, tgc, N, chunk, tp, tp_group, chunk_fn, softcap,
                                           local_valid, vocab_start, ignore_index, scale, do_grad, need_h,
                                           need_w, gh, gw, loss_sum)
        loss = loss_sum * scale[0]
        ctx.save_for_backward(gh if need_h else None, gw if need_w else None)
        ctx.shapes = (hidden.shape, weight.dtype, need_h, need_w)
        return loss

    @staticmethod
    def _chunks(h2, weight, tgc, N, chunk, tp, tp_group, chunk_fn, softcap, local_valid, vocab_start,
                ignore_index, scale, do_grad, need_h, need_w, gh, gw, loss_sum):
        for i0 in range(0, N, chunk):
            i1 = min(N, i0 + chunk)
            hc = h2[i0:i1]
            t = tgc[i0:i1]
            logits = hc @ weight.t()  # [C, V] in the input dtype
            if tp:
                import torch.distributed as dist

                m, se, zt = chunk_fn(logits, t, softcap, local_valid, vocab_start, ignore_index, scale, "stats")
                m_g = m.clone()
                dist.all_reduce(m_g, op=dist.ReduceOp.MAX, group=tp_group)
                m_safe = torch.where(torch.isinf(m_g) & (m_g < 0), torch.zeros_like(m_g), m_g)
                both = torch.stack([se * torch.exp(m - m_safe), zt])
                dist.all_reduce(both, op=dist.ReduceOp.SUM, group=tp_group)
                lse = m_safe + torch.log(both[0])
                zt = both[1]
                if do_grad:
                    chunk_fn(logits, t, softcap, local_valid, vocab_start, ignore_index, scale, "grad", lse=lse)
            else:
                m, se, zt = chunk_fn(logits, t, softcap, local_valid, vocab_start, ignore_index, scale,
                                     "fused" if do_grad else "stats")
                lse = m + torch.log(se)
            loss_sum += torch.where(t != ignore_index, lse - zt, torch.zeros_like(lse)).sum()
            if do_grad:
                # logits now holds dloss/dlogits (already divided by the number of valid rows)
                if need_h:
                    if gh.dtype == logits.dtype:
                        torch.mm(logits, weight, out=gh[i0:i1])
                    else:
                        gh[i0:i1].copy_(logits @ weight)
                if need_w:
                    if logits.dtype == torch.float32:
                        gw.addmm_(logits.t(), hc)
                    else:
                        gw.add_(torch.mm(logits.t(), hc))
            del logits
        return loss_sum

    @staticmethod
    def backward(ctx, go):
        gh, gw = ctx.saved_tensors
        h_shape, w_dtype, need_h, need_w = ctx.shapes
        dh = dw = None
        if need_h and ctx.needs_input_grad[0]:
            dh = (gh * go.to(gh.dtype)).view(h_shape)
        if need_w and ctx.needs_input_grad[1]:
            dw = (gw * go.float()).to(w_dtype)
        return dh, dw, None, None, None, None, None, None, None, None, None


def softcap_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          softcap: Optional[float], ignore_index: int = -100, tp_group=None,
                          vocab_start: int = 0, vocab_valid: Optional[int] = None,
                          chunk_size: Optional[int] = None, backend: Backend = AUTO) -> torch.Tensor:
    """Mean cross-entropy of softcap(hidden @ weight.T) against targets, without full logits."""
    chunk_fn = _torch_chunk
    if use_triton(backend, hidden):
        from .triton.softcap_ce import triton_chunk as chunk_fn
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return SoftcapCEFn.apply(hidden, weight, targets, softcap, ignore_index, tp_group, vocab_start,
                             vocab_valid, chunk_size, chunk_fn, need_grad)
