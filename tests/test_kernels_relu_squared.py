from megaloop.kernels.testing import generator, select_test_device

select_test_device()  # before triton is imported: the interpreter on CPU, compiled kernels on CUDA

import pytest
import torch

from megaloop.kernels import relu_squared, relu_squared_reference
from megaloop.kernels.testing import atol_for, check_close, ref_dtype

triton = pytest.importorskip("triton")
from megaloop.kernels.triton.relu_squared import ReluSquaredFn  # noqa: E402 - the Triton module imports triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 3000), (1, 1, 5), (1, 257, 130)])
def test_relu_squared_matches_reference(shape, dtype):
    g = generator(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    outs = {}
    for tag, dt in [("tri", dtype), ("pt", dtype), ("ref", ref_dtype(dtype))]:
        xl = x.detach().to(dt).requires_grad_()
        if tag == "tri":
            y = relu_squared(xl, backend="triton")
        else:
            y = relu_squared_reference(xl)
        assert y.dtype == dt
        y.backward(gy.to(dt))
        outs[tag] = (y, xl.grad)
    check_close("y", outs["tri"][0], outs["pt"][0], outs["ref"][0], atol=atol_for(dtype))
    check_close("dx", outs["tri"][1], outs["pt"][1], outs["ref"][1], atol=atol_for(dtype))


def test_relu_squared_saves_only_x_and_handles_views():
    x = torch.randn(6, 40).requires_grad_()
    v = x[:, ::2]  # non-contiguous
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = relu_squared(v, backend="triton")
    assert len(saved) == 1 and saved[0].shape == v.shape
    torch.testing.assert_close(saved[0], v.detach())
    y.sum().backward()
    expect = torch.zeros_like(x)
    expect[:, ::2] = 2 * torch.relu(v.detach())
    torch.testing.assert_close(x.grad, expect)
    with torch.no_grad():
        torch.testing.assert_close(relu_squared(v, backend="triton"), relu_squared_reference(v))
    assert ReluSquaredFn is not None


def test_reference_equals_plain_formula():
    x = torch.randn(1000, dtype=torch.float64)
    plain = torch.where(x > 0, x * x, torch.zeros_like(x))
    torch.testing.assert_close(relu_squared_reference(x), plain)
