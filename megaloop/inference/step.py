"""One token per row through a block: the lean step of cached decoding.

A decoded token is one [d] row per sequence, so every op is tiny and a step costs what its number of ops
costs, not its FLOPs. `TokenBlock` runs the maths of `Block.forward` over a `CacheLayer` with
far fewer ops:

- q, k and v come out of one matmul (their weights concatenated once, when the decoder is built);
- the rotary embedding is one [D, D] rotation (`RopeRotations`), built once per step and shared
  by every layer, since all rows of a step sit at the same position;
- the keys and values are written in place at the position's ring index (`LoopKVCache.attend_one`),
  and attention gets no mask unless a row is padded.

Chunks of several tokens (the prompt) keep the module path; tests check both against the full
forward (tests/test_inference_cache.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..model import Block


class RopeRotations:
    """The half-split rotary embedding at one position as a [D, D] matrix R: x @ R rotates x the
    way K.qk_norm_rope does (y1 = x1 c + x2 s, y2 = x2 c - x1 s). R = I * [c, c] + P * [s, s]
    column-wise, P the signed half swap, so a step builds it in two ops from tables made once.
    Built in the model's compute dtype (fp32, or fp64 for an fp64 model)."""

    def __init__(self, model, dtype: torch.dtype):
        self.model, self.dtype = model, torch.promote_types(dtype, torch.float32)
        D = model.cfg.hdim
        h, dev = D // 2, model.rope_cos.device
        self.eye = torch.eye(D, dtype=self.dtype, device=dev)
        self.swap = torch.zeros(D, D, dtype=self.dtype, device=dev)
        i = torch.arange(h, device=dev)
        self.swap[i + h, i], self.swap[i, i + h] = 1.0, -1.0
        self.cc = self.ss = None

    def __call__(self, pos: int) -> torch.Tensor:
        m = self.model
        if self.cc is None or self.cc.size(0) != m.rope_cos.size(0):  # (again after the tables grow)
            cos, sin = m.rope_cos.to(self.dtype), m.rope_sin.to(self.dtype)
            self.cc, self.ss = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        return torch.addcmul(self.eye * self.cc[pos], self.swap, self.ss[pos])


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """K.rms_norm's formula (fp32 statistics) as one op: on a single row the reference's separate
    pow / mean / add / rsqrt / mul / casts cost more than their arithmetic."""
    if x.dtype in (torch.float32, torch.float64) and (weight is None or weight.dtype == x.dtype):
        return torch.rms_norm(x, (x.size(-1),), weight, eps)
    ct = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(ct), (x.size(-1),), None if weight is None else weight.to(ct), eps).to(x.dtype)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype) without the call when it would be a no-op (a call costs ~1 us per row op)."""
    return t if t.dtype == dtype else t.to(dtype)


class TokenBlock:
    """A Block's weights arranged for one-token steps: q/k/v concatenated, and every matrix
    stored transposed (in x out, contiguous): with the weights in cache, a one-row product in
    that layout ran ~1.7x faster than F.linear's (out x in) on the CPU we measured. These are
    copies, 1x the block weights per decoder, made when the decoder is built (so build it
    again after the weights change)."""

    def __init__(self, block: Block):
        a = block.attn
        t = lambda w: w.detach().t().contiguous()  # noqa: E731
        self.norm1, self.norm2, self.eps = block.norm1.weight, block.norm2.weight, block.norm1.eps
        self.wqkv = t(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
        self.wo, self.fc, self.proj = t(a.wo.weight), t(block.mlp.fc.weight), t(block.mlp.proj.weight)
        self.head_dim, self.qk_eps = a.head_dim, a.eps
        self.hq = a.wq.weight.size(0) // a.head_dim
        self.hk = a.wk.weight.size(0) // a.head_dim
        self.dims, self.head_dims = (self.norm1.size(0),), (a.head_dim,)
        self.plain = self.norm1.dtype in (torch.float32, torch.float64)

    def __call__(self, x: torch.Tensor, rot: torch.Tensor, cache, layer: int,
                 keep: Optional[torch.Tensor] = None, fallback: Optional[tuple] = None):
        """x [B, d] (one token per row) -> (the block's output [B, d], the (k, v) [B, Hk, 1, D]
        stored in cache layer `layer`). Rows where `keep` is False store `fallback` instead.
        Every Python-level op costs a few microseconds here, so views are kept to the minimum
        and the residual adds ride in the matmuls (addmm)."""
        B, hq, hk, D = x.size(0), self.hq, self.hk, self.head_dim
        norm = torch.rms_norm if self.plain else _rms_norm_args  # plain: fp32/fp64 end to end, no casts
        qkv = torch.mm(norm(x, self.dims, self.norm1, self.eps), self.wqkv).view(B, hq + 2 * hk, 1, D)
        qk = torch.matmul(cast(qkv.narrow(1, 0, hq + hk), rot.dtype), rot)  # rope (fp32, as K.qk_norm_rope)
        q, k = cast(norm(qk, self.head_dims, None, self.qk_eps), x.dtype).split((hq, hk), 1)  # then QK-norm
        v = qkv.narrow(1, hq + hk, hk)
        if keep is not None:
            k = torch.where(keep[:, None, None, None], k, fallback[0])
            v = torch.where(keep[:, None, None, None], v, fallback[1])
        h = torch.addmm(x, cache.attend_one(layer, q, k, v).reshape(B, hq * D), self.wo)
        mlp = torch.relu_(torch.mm(norm(h, self.dims, self.norm2, self.eps), self.fc)).square_()
        return torch.addmm(h, mlp, self.proj), (k, v)


def _rms_norm_args(x, dims, weight, eps):
    return rms_norm(x, weight, eps)
