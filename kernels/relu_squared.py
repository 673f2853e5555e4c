"""ReLU^2 activation: y = relu(x)^2, backward dx = 2 * relu(x) * dy.

Only x is saved for backward (never the squared intermediate). fp32 math, output in x.dtype.
"""
from __future__ import annotations

import torch

from .dispatch import backend_for, cdiv, elementwise_block, lazy_jit

tl = None  # triton.language and cast_out are bound by dispatch.LazyKernel on the first launch
cast_out = None  # (so triton stays optional and is never imported with this package)


def relu_squared_reference(x: torch.Tensor) -> torch.Tensor:
    # relu is exact and square rounds once, so this equals the fp32-then-cast result
    return torch.relu(x).square()


def _relu2_fwd_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.maximum(x, 0.0)
    tl.store(Y + offs, cast_out(r * r, Y.dtype.element_ty), mask=mask)


def _relu2_bwd_kernel(X, DY, DX, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    dx = 2.0 * tl.maximum(x, 0.0) * dy
    tl.store(DX + offs, cast_out(dx, DX.dtype.element_ty), mask=mask)


_fwd = lazy_jit(_relu2_fwd_kernel)
_bwd = lazy_jit(_relu2_bwd_kernel)


class ReluSquaredFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        if n:
            block = elementwise_block(n)
            _fwd[(cdiv(n, block),)](x, y, n, BLOCK=block, num_warps=8)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        n = x.numel()
        if n:
            block = elementwise_block(n)
            _bwd[(cdiv(n, block),)](x, dy, dx, n, BLOCK=block, num_warps=8)
        return dx


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)**2 (fp32 math, x.dtype out); saves only x for backward."""
    if backend_for(x) == "triton":
        return ReluSquaredFn.apply(x)
    return relu_squared_reference(x)

