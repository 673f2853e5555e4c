from megaloop.kernels.testing import generator, select_test_device

select_test_device()  # before triton is imported: the interpreter on CPU, compiled kernels on CUDA

import pytest
import torch

from megaloop.kernels import (
    hc_combine,
    hc_combine_reference,
    hc_update,
    hc_update_reference,
    inject,
    inject_e_half,
    inject_reference,
    recur_norm_inject,
    recur_norm_inject_reference,
)
from megaloop.kernels.testing import atol_for, check_close, ref_dtype

triton = pytest.importorskip("triton")


def _randn(shape, g, dtype, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["additive", "passthrough", "linear"])
@pytest.mark.parametrize("shape", [(2, 11, 96), (1, 3, 300)])
def test_recur_norm_inject_matches_reference(shape, mode, dtype):
    g = generator(0)
    d = shape[-1]
    h = _randn(shape, g, dtype, 2.0)
    e = _randn(shape, g, dtype)
    w = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype)
    W = _randn((d, 2 * d), g, dtype, d ** -0.5) if mode == "linear" else None
    gs, gu = _randn(shape, g, dtype), _randn(shape, g, dtype)
    outs = {}
    for tag, dt in [("tri", dtype), ("pt", dtype), ("ref", ref_dtype(dtype))]:
        hl, el, wl = (t.detach().to(dt).requires_grad_() for t in (h, e, w))
        Wl = W.detach().to(dt).requires_grad_() if W is not None else None
        if tag == "tri":
            s, u = recur_norm_inject(hl, el, wl, 1e-6, mode, Wl, backend="triton")
        else:
            s, u = recur_norm_inject_reference(hl, el, wl, 1e-6, mode, Wl)
        assert s.dtype == dt and u.dtype == dt and u.shape == shape
        torch.autograd.backward([s, u], [gs.to(dt), gu.to(dt)])
        res = [s, u, hl.grad, wl.grad]
        if mode != "passthrough":
            res.append(el.grad)
        if Wl is not None:
            res.append(Wl.grad)
        outs[tag] = res
    names = ["s", "u", "dh", "dw", "de", "dW"]
    for i in range(len(outs["tri"])):
        check_close(names[i], outs["tri"][i], outs["pt"][i], outs["ref"][i], atol=atol_for(dtype))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("shape", [(2, 11, 96), (1, 3, 37)])
def test_linear_inject_with_a_shared_e_half_matches_reference(shape, autocast):
    """Linear injection over several passes with its e-half computed once (inject_e_half, then
    inject(..., e_half=) per pass: only the state half is per pass) equals the plain formula
    u_i = W [e ; s_i] per pass, forward and backward (e, every s_i and W), on odd shapes; under
    bf16 autocast the products run in bf16 like the plain formula's."""
    g = generator(5)
    d = shape[-1]
    e0 = torch.randn(shape, generator=g)
    s0 = [torch.randn(shape, generator=g) for _ in range(3)]
    W0 = torch.randn(d, 2 * d, generator=g) * d ** -0.5
    gus = [torch.randn(shape, generator=g) for _ in range(3)]

    def run(shared: bool):
        e, W = e0.clone().requires_grad_(), W0.clone().requires_grad_()
        ss = [t.clone().requires_grad_() for t in s0]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            if shared:
                half = inject_e_half(e, W)
                us = [inject(e, s, "linear", W, e_half=half) for s in ss]
            else:
                us = [inject_reference(e, s, "linear", W) for s in ss]
        torch.autograd.backward([u.float() for u in us], gus)
        return [u.float() for u in us] + [e.grad, W.grad] + [s.grad for s in ss]

    for got, want in zip(run(True), run(False)):
        if autocast:  # bf16 products, summed in another order: compare by norm
            assert float((got.detach().float() - want.detach().float()).norm() / want.detach().float().norm()) < 1e-2
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["additive", "passthrough", "linear"])
def test_inject_and_first_pass(mode):
    g = generator(3)
    e = torch.randn(2, 5, 64, generator=g)
    W = torch.cat([torch.eye(64), torch.zeros(64, 64)], dim=1)  # the [I | 0] init
    s = e.clone()
    u = inject(e, s, mode, W if mode == "linear" else None)  # the same torch code in every backend
    torch.testing.assert_close(u, inject_reference(e, s, mode, W))
    if mode == "linear":
        torch.testing.assert_close(u, e)
    with pytest.raises(ValueError):
        inject(e, s, "bogus")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,shape", [(2, (2, 7, 96)), (3, (1, 5, 130)), (4, (1, 1, 3000))])
def test_hyperconnect_matches_reference(N, shape, dtype):
    g = generator(N)
    lanes = _randn((N, *shape), g, dtype)
    s = _randn(shape, g, dtype)
    alpha = torch.randn(N, generator=g)
    M = torch.eye(N) + 0.3 * torch.randn(N, N, generator=g)
    beta = 1 + 0.1 * torch.randn(N, generator=g)
    gu = _randn(shape, g, dtype)
    gl = _randn((N, *shape), g, dtype)
    outs = {}
    for tag, dt in [("tri", dtype), ("pt", dtype), ("ref", ref_dtype(dtype))]:
        Ll, sl = lanes.detach().to(dt).requires_grad_(), s.detach().to(dt).requires_grad_()
        pdt = torch.float64 if dt == torch.float64 else torch.float32
        al, Ml, bl = (p.detach().to(pdt).requires_grad_() for p in (alpha, M, beta))
        if tag == "tri":
            u = hc_combine(Ll, al, backend="triton")
            new = hc_update(Ll, sl, Ml, bl, backend="triton")
        else:
            u = hc_combine_reference(Ll, al)
            new = hc_update_reference(Ll, sl, Ml, bl)
        assert u.dtype == dt and new.dtype == dt and new.shape == lanes.shape
        torch.autograd.backward([u, new], [gu.to(dt), gl.to(dt)])
        outs[tag] = (u, new, Ll.grad, sl.grad, al.grad, Ml.grad, bl.grad)
    for i, name in enumerate(["u", "new_lanes", "dlanes", "ds", "dalpha", "dM", "dbeta"]):
        a, b, c = outs["tri"][i], outs["pt"][i], outs["ref"][i]
        if name in ("dalpha", "dM", "dbeta"):  # fp32 reductions over all elements
            check_close(name, a, b, c.to(a.dtype) if a.dtype != c.dtype else c, atol=1e-4)
        else:
            check_close(name, a, b, c, atol=atol_for(dtype))


def test_hyperconnect_list_input_and_nograd():
    lanes = [torch.randn(3, 40) for _ in range(2)]
    alpha = torch.tensor([1.0, 0.0])
    with torch.no_grad():
        u = hc_combine(lanes, alpha, backend="triton")
        new = hc_update(lanes, u, torch.eye(2), torch.ones(2), backend="triton")
    torch.testing.assert_close(u, lanes[0])
    torch.testing.assert_close(new, torch.stack([lanes[0] + u, lanes[1] + u]))


def test_references_equal_plain_formulas():
    g = generator(7)
    d, N = 24, 3
    e = torch.randn(4, d, generator=g, dtype=torch.float64)
    s = torch.randn(4, d, generator=g, dtype=torch.float64)
    W = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    plain = torch.stack([W[:, :d] @ e[i] + W[:, d:] @ s[i] for i in range(4)])
    torch.testing.assert_close(inject_reference(e, s, "linear", W), plain)
    torch.testing.assert_close(inject(e, s, "linear", W), plain)  # the no-concat matmuls
    lanes = torch.randn(N, 4, d, generator=g, dtype=torch.float64)
    alpha = torch.randn(N, generator=g, dtype=torch.float64)
    M = torch.randn(N, N, generator=g, dtype=torch.float64)
    beta = torch.randn(N, generator=g, dtype=torch.float64)
    u = sum(alpha[n] * lanes[n] for n in range(N))
    torch.testing.assert_close(hc_combine_reference(lanes, alpha), u)
    new = torch.stack([sum(M[i, j] * lanes[j] for j in range(N)) + beta[i] * s for i in range(N)])
    torch.testing.assert_close(hc_update_reference(lanes, s, M, beta), new)
