"""Helpers for the kernel tests (flash-attention style tolerances)."""
from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def backend(name: str):
    """Force a backend through MEGALOOP_KERNELS for the duration of the block."""
    old = os.environ.get("MEGALOOP_KERNELS")
    os.environ["MEGALOOP_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MEGALOOP_KERNELS", None)
        else:
            os.environ["MEGALOOP_KERNELS"] = old


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_close(name: str, out: torch.Tensor, out_pt: torch.Tensor, out_ref: torch.Tensor,
                rtol_factor: float = 2.0, atol: float = 1e-5) -> None:
    """|out - ref| <= rtol_factor * |out_pt - ref| + atol * max(1, |ref|_max).

    out: the tested result (input dtype); out_pt: the PyTorch result in the same dtype;
    out_ref: a higher-precision reference (fp64 for fp32 inputs, fp32 for bf16 inputs).
    """
    assert out.shape == out_pt.shape == out_ref.shape, (name, out.shape, out_pt.shape, out_ref.shape)
    assert out.dtype == out_pt.dtype, (name, out.dtype, out_pt.dtype)
    assert torch.isfinite(out.double()).all(), f"{name}: non-finite values"
    err = max_err(out, out_ref)
    base = max_err(out_pt, out_ref)
    scale = max(1.0, out_ref.double().abs().max().item() if out_ref.numel() else 1.0)
    bound = rtol_factor * base + atol * scale
    assert err <= bound, f"{name}: error {err:.3e} > {rtol_factor} x torch error {base:.3e} + atol {atol * scale:.3e}"


def ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def atol_for(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-3
