"""ReLU^2 activation: y = relu(x)^2, backward dx = 2 * relu(x) * dy.

Only x is saved for backward (never the squared intermediate). fp32 math, output in x.dtype.
``backend`` picks the reference below or the Triton kernels of megaloop.kernels.triton.relu_squared.
"""
from __future__ import annotations

import torch

from .dispatch import AUTO, Backend, use_triton


def relu_squared_reference(x: torch.Tensor) -> torch.Tensor:
    # relu is exact and square rounds once, so this equals the fp32-then-cast result
    return torch.relu(x).square()


def relu_squared(x: torch.Tensor, backend: Backend = AUTO) -> torch.Tensor:
    """relu(x)**2 (fp32 math, x.dtype out); saves only x for backward."""
    if use_triton(backend, x):
        from .triton.relu_squared import ReluSquaredFn
        return ReluSquaredFn.apply(x)
    return relu_squared_reference(x)

