"""The Triton ReLU^2 (megaloop.kernels.relu_squared): y = relu(x)^2, dx = 2 relu(x) dy, saving only x."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import cdiv
from .common import cast_out, elementwise_block


@triton.jit
def _relu2_fwd_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.maximum(x, 0.0)
    tl.store(Y + offs, cast_out(r * r, Y.dtype.element_ty), mask=mask)


@triton.jit
def _relu2_bwd_kernel(X, DY, DX, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    dx = 2.0 * tl.maximum(x, 0.0) * dy
    tl.store(DX + offs, cast_out(dx, DX.dtype.element_ty), mask=mask)


class ReluSquaredFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        if n:
            block = elementwise_block(n)
            _relu2_fwd_kernel[(cdiv(n, block),)](x, y, n, BLOCK=block, num_warps=8)
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
            _relu2_bwd_kernel[(cdiv(n, block),)](x, dy, dx, n, BLOCK=block, num_warps=8)
        return dx
