"""One token per row through a block: the lean step of cached decoding.

A decoded token is one [d] row per sequence, so every op is tiny and a step costs what its
number of ops costs (a few microseconds each on CPU) plus streaming the weights, not its FLOPs.
`TokenBlock` runs the maths of `Block.forward` over a `CacheLayer` with far fewer ops:

- q, k and v come out of one matmul (their weights concatenated once, when the decoder is built),
  and the norm scales are folded into the matrices after them;
- the rotary embedding is one [D, D] rotation (`RopeRotations`), built once per step and shared
  by every layer, since all rows of a step sit at the same position;
- the keys and values are written in place at the position's ring index
  (`LoopKVCache.attend_one`), and attention gets no mask unless a row is padded;
- RMSNorm takes three one-kernel calls (`RowNorm`), the residual adds ride in the matmuls.

Chunks of several tokens (the prompt) keep the module path; tests check both against the full
forward (tests/test_inference_cache.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import kernels as K
from ..kernels.dispatch import AUTO, KernelBackend
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


class RowNorm:
    """RMSNorm of one-token rows (x [..., dim]) by K.rms_norm's formula, x * rsqrt(mean(x^2) +
    eps) * weight. On fp32/fp64 rows it takes three one-kernel calls (vector_norm; eps + n^2/dim
    in one addcmul; rsqrt), which cost less than torch.rms_norm's composite (about 5 against 9
    us a row on the CPU we measured); other dtypes go through K.rms_norm (fp32 statistics)."""

    def __init__(self, dim: int, eps: float, weight: Optional[torch.Tensor], dtype: torch.dtype, device=None,
                 kernels: KernelBackend = AUTO):
        self.weight, self.eps, self.inv_dim, self.kernels = weight, eps, 1.0 / dim, kernels
        self.plain = dtype in (torch.float32, torch.float64) and (weight is None or weight.dtype == dtype)
        self.eps_t = torch.tensor(eps, dtype=dtype, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.plain:
            return K.rms_norm(x, self.weight, self.eps, self.kernels)
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        y = x * torch.addcmul(self.eps_t, n, n, value=self.inv_dim).rsqrt_()
        return y if self.weight is None else y.mul_(self.weight)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype) without the call when it would be a no-op (a call costs ~1 us per row op)."""
    return t if t.dtype == dtype else t.to(dtype)


class TokenBlock:
    """A Block's weights arranged for one-token steps: q/k/v concatenated; the two RMSNorm
    scales folded into the matrices they feed (norm(x) W = x_hat (diag(w) W)); every matrix
    stored transposed (in x out, contiguous): with the weights in cache, a one-row product in
    that layout ran ~1.7x faster than F.linear's (out x in) on the CPU we measured. These are
    copies, 1x the block weights per decoder, made when the decoder is built (so build it
    again after the weights change)."""

    def __init__(self, block: Block):
        a, w = block.attn, block.attn.wq.weight
        def fold(m, scale):  # m [out, in] -> diag(scale) m.T, [in, out]
            return (m.detach().t().float() * scale.detach().float()[:, None]).to(m.dtype).contiguous()
        self.wqkv = fold(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]), block.norm1.weight)
        self.fc = fold(block.mlp.fc.weight, block.norm2.weight)
        self.wo, self.proj = a.wo.weight.detach().t().contiguous(), block.mlp.proj.weight.detach().t().contiguous()
        self.head_dim = a.head_dim
        self.hq, self.hk = w.size(0) // a.head_dim, a.wk.weight.size(0) // a.head_dim
        d = block.norm1.weight.size(0)
        self.norm1 = RowNorm(d, block.norm1.eps, None, w.dtype, w.device, block.kernels)
        self.norm2 = RowNorm(d, block.norm2.eps, None, w.dtype, w.device, block.kernels)
        self.qk_norm = RowNorm(a.head_dim, a.eps, None, torch.promote_types(w.dtype, torch.float32), w.device,
                               block.kernels)

    def __call__(self, x: torch.Tensor, rot: torch.Tensor, cache, layer: int,
                 keep: Optional[torch.Tensor] = None, fallback: Optional[tuple] = None):
        """x [B, d] (one token per row) -> (the block's output [B, d], the (k, v) [B, Hk, 1, D]
        stored in cache layer `layer`). Rows where `keep` is False store `fallback` instead.
        Every Python-level op costs a few microseconds here, so views are kept to the minimum
        and the residual adds ride in the matmuls (addmm)."""
        B, hq, hk, D = x.size(0), self.hq, self.hk, self.head_dim
        qkv = torch.mm(self.norm1(x), self.wqkv).view(B, hq + 2 * hk, 1, D)
        qk = torch.matmul(cast(qkv.narrow(1, 0, hq + hk), rot.dtype), rot)  # rope (fp32, as K.qk_norm_rope)
        q, k = cast(self.qk_norm(qk), x.dtype).split((hq, hk), 1)  # then QK-norm
        v = qkv.narrow(1, hq + hk, hk)
        if keep is not None:
            k = torch.where(keep[:, None, None, None], k, fallback[0])
            v = torch.where(keep[:, None, None, None], v, fallback[1])
        h = torch.addmm(x, cache.attend_one(layer, q, k, v).reshape(B, hq * D), self.wo)
        mlp = torch.relu_(torch.mm(self.norm2(h), self.fc)).square_()
        return torch.addmm(h, mlp, self.proj), (k, v)
