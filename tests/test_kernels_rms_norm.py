from megaloop.kernels.testing import generator, select_test_device

select_test_device()  # before triton is imported: the interpreter on CPU, compiled kernels on CUDA

import pytest
import torch

from megaloop.kernels import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from megaloop.kernels.testing import atol_for, check_close, ref_dtype

triton = pytest.importorskip("triton")

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(3, 7, 3000), (1, 1, 5), (2, 37, 130), (1, 300, 96)]


def _inputs(shape, dtype, seed=0, weight=True):
    g = generator(seed)
    d = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype) if weight else None
    gy = torch.randn(shape, generator=g).to(dtype)
    gh = torch.randn(shape, generator=g).to(dtype)
    return x, r, w, gy, gh


def _leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_matches_reference(shape, dtype, weight):
    x, _, w, gy, _ = _inputs(shape, dtype, weight=weight)
    rd = ref_dtype(dtype)
    outs = {}
    for tag, dt, fn in [("tri", dtype, rms_norm), ("pt", dtype, rms_norm_reference), ("ref", rd, rms_norm_reference)]:
        xl, wl = _leaves(x, w, dtype=dt)
        if tag == "tri":
            y = fn(xl, wl, 1e-6, backend="triton")
        else:
            y = fn(xl, wl, 1e-6)
        assert y.dtype == dt
        y.backward(gy.to(dt))
        outs[tag] = (y, xl.grad, wl.grad if wl is not None else None)
    names = ["y", "dx", "dw"]
    for i, name in enumerate(names):
        if outs["tri"][i] is None:
            continue
        check_close(name, outs["tri"][i], outs["pt"][i], outs["ref"][i], atol=atol_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 3000), (1, 1, 5), (2, 37, 130)])
def test_add_rms_norm_matches_reference(shape, dtype):
    x, r, w, gy, gh = _inputs(shape, dtype, seed=1)
    rd = ref_dtype(dtype)
    outs = {}
    for tag, dt, fn in [("tri", dtype, add_rms_norm), ("pt", dtype, add_rms_norm_reference),
                        ("ref", rd, add_rms_norm_reference)]:
        xl, rl, wl = _leaves(x, r, w, dtype=dt)
        if tag == "tri":
            y, h = fn(xl, rl, wl, 1e-6, backend="triton")
        else:
            y, h = fn(xl, rl, wl, 1e-6)
        assert y.dtype == dt and h.dtype == dt
        torch.autograd.backward([y, h], [gy.to(dt), gh.to(dt)])
        outs[tag] = (y, h, xl.grad, rl.grad, wl.grad)
    for i, name in enumerate(["y", "h", "dx", "dres", "dw"]):
        check_close(name, outs["tri"][i], outs["pt"][i], outs["ref"][i], atol=atol_for(dtype))


def test_rms_norm_noncontiguous_nograd_and_partial_grads():
    base = torch.randn(4, 9, 3 * 130)
    x = base[..., 130:260]  # a non-contiguous view
    w = torch.randn(130)
    with torch.no_grad():
        y = rms_norm(x, w, 1e-5, backend="triton")
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    # only the weight needs a gradient
    wl = w.clone().requires_grad_()
    rms_norm(x, wl, 1e-5, backend="triton").sum().backward()
    wr = w.clone().requires_grad_()
    rms_norm_reference(x, wr, 1e-5).sum().backward()
    torch.testing.assert_close(wl.grad, wr.grad, rtol=1e-4, atol=1e-4)
    # only h used downstream of add_rms_norm (the norm output unused)
    xl, rl = x.clone().requires_grad_(), x.clone().requires_grad_()
    _, h = add_rms_norm(xl, rl, w, 1e-5, backend="triton")
    h.sum().backward()
    assert torch.equal(xl.grad, torch.ones_like(x)) and torch.equal(rl.grad, torch.ones_like(x))


def test_reference_equals_plain_formula():
    x = torch.randn(5, 77, dtype=torch.float64)
    w = torch.randn(77, dtype=torch.float64)
    eps = 1e-6
    plain = torch.stack([row / (row.pow(2).sum() / row.numel() + eps).sqrt() * w for row in x])
    torch.testing.assert_close(rms_norm_reference(x, w, eps), plain)
    torch.testing.assert_close(rms_norm_reference(x, None, eps), plain / w)
    r = torch.randn_like(x)
    y, h = add_rms_norm_reference(x, r, w, eps)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, rms_norm_reference(x + r, w, eps))
