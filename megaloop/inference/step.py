"""One token per row through a block: the lean step of cached decoding.

A decoded token is a [B, 1, d] row, so every op is tiny and a step costs what its number of ops
costs, not its FLOPs. `TokenBlock` runs the maths of `Block.forward` over a `CacheLayer` with
far fewer ops:

- q, k and v come out of one matmul (their weights concatenated once, when the decoder is built);
- the rotary embedding is one [D, D] rotation (`rope_rotation`), built once per step and shared
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


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The half-split rotary embedding at one position as a [D, D] matrix R: x @ R rotates x the
    way K.qk_norm_rope does (y1 = x1 c + x2 s, y2 = x2 c - x1 s), in its compute dtype (fp32, or
    fp64 for an fp64 model). cos/sin: [D/2]; dtype: the model's."""
    ct = torch.promote_types(dtype, torch.float32)
    c, s = torch.diag(cos.to(ct)), torch.diag(sin.to(ct))
    return torch.cat([torch.cat([c, -s], 1), torch.cat([s, c], 1)], 0)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """K.rms_norm's formula (fp32 statistics) as one op: on a single row the reference's separate
    pow / mean / add / rsqrt / mul / casts cost more than their arithmetic."""
    if x.dtype in (torch.float32, torch.float64) and (weight is None or weight.dtype == x.dtype):
        return F.rms_norm(x, (x.size(-1),), weight, eps)
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

    def __call__(self, x: torch.Tensor, rot: torch.Tensor, cache, layer: int,
                 keep: Optional[torch.Tensor] = None, fallback: Optional[tuple] = None):
        """x [B, 1, d] (one token per row) -> (the block's output [B, 1, d], the (k, v)
        [B, 1, Hk, D] stored in cache layer `layer`). Rows where `keep` is False store `fallback`."""
        B, hq, hk, D = x.size(0), self.hq, self.hk, self.head_dim
        x = x.view(B, -1)
        qkv = torch.mm(rms_norm(x, self.norm1, self.eps), self.wqkv).view(B, hq + 2 * hk, D)
        qk = torch.matmul(cast(qkv.narrow(1, 0, hq + hk), rot.dtype), rot)  # rope (fp32, as K.qk_norm_rope)
        q, k = cast(rms_norm(qk, None, self.qk_eps), x.dtype).split((hq, hk), 1)  # then QK-norm
        v = qkv.narrow(1, hq + hk, hk)
        if keep is not None:
            k = torch.where(keep[:, None, None], k, fallback[0][:, 0])
            v = torch.where(keep[:, None, None], v, fallback[1][:, 0])
        y = cache.attend_one(layer, q, k, v)
        h = torch.mm(y.reshape(B, hq * D), self.wo).add_(x)
        mlp = torch.mm(torch.relu_(torch.mm(rms_norm(h, self.norm2, self.eps), self.fc)).square_(), self.proj)
        return mlp.add_(h).view(B, 1, -1), (k.unsqueeze(1), v.unsqueeze(1))
