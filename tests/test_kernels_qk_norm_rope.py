from megaloop.kernels.testing import generator, select_test_device

select_test_device()  # before triton is imported: the interpreter on CPU, compiled kernels on CUDA

import pytest
import torch

from megaloop.kernels import qk_norm_rope, qk_norm_rope_reference
from megaloop.kernels.testing import atol_for, check_close, ref_dtype

triton = pytest.importorskip("triton")


def _rope_tables(T, D, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def _qk_from_linear(B, T, Hq, Hk, D, dtype, seed=0):
    """q, k as non-contiguous views of one fused projection output (as in a qkv linear)."""
    g = generator(seed)
    qkv = (torch.randn(B, T, (Hq + 2 * Hk) * D, generator=g) * 1.5).to(dtype)
    q = qkv[..., : Hq * D].view(B, T, Hq, D)
    k = qkv[..., Hq * D: (Hq + Hk) * D].view(B, T, Hk, D)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,Hq,Hk,D", [(2, 13, 4, 2, 32), (1, 7, 3, 1, 6), (1, 5, 2, 2, 130)])
def test_qk_norm_rope_matches_reference(B, T, Hq, Hk, D, dtype):
    q, k = _qk_from_linear(B, T, Hq, Hk, D, dtype)
    assert not q.is_contiguous()
    cos, sin = _rope_tables(T, D)
    g = generator(1)
    gq = torch.randn(B, T, Hq, D, generator=g).to(dtype)
    gk = torch.randn(B, T, Hk, D, generator=g).to(dtype)
    outs = {}
    rd = ref_dtype(dtype)
    for tag, dt in [("tri", dtype), ("pt", dtype), ("ref", rd)]:
        ql = q.detach().to(dt).requires_grad_()
        kl = k.detach().to(dt).requires_grad_()
        if tag == "tri":
            qo, ko = qk_norm_rope(ql, kl, cos, sin, 1e-6, backend="triton")
        else:
            qo, ko = qk_norm_rope_reference(ql, kl, cos, sin, 1e-6)
        assert qo.dtype == dt and qo.shape == (B, T, Hq, D) and ko.shape == (B, T, Hk, D)
        torch.autograd.backward([qo, ko], [gq.to(dt), gk.to(dt)])
        outs[tag] = (qo, ko, ql.grad, kl.grad)
    for i, name in enumerate(["q_out", "k_out", "dq", "dk"]):
        check_close(name, outs["tri"][i], outs["pt"][i], outs["ref"][i], atol=atol_for(dtype))


def test_qk_norm_rope_broadcast_tables_and_nograd():
    B, T, H, D = 1, 9, 2, 16
    q = torch.randn(B, T, H, D)
    k = torch.randn(B, T, H, D)
    cos, sin = _rope_tables(T, D)
    with torch.no_grad():
        qo, ko = qk_norm_rope(q, k, cos.view(1, T, 1, D // 2).bfloat16(), sin.view(1, T, 1, D // 2).bfloat16(), 1e-6,
                              backend="triton")
    qr, kr = qk_norm_rope_reference(q, k, cos.bfloat16(), sin.bfloat16(), 1e-6)
    torch.testing.assert_close(qo, qr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko, kr, rtol=1e-5, atol=1e-5)


def test_reference_equals_plain_formula():
    """Half-split rotary as a complex product, then x / rms(x)."""
    B, T, H, D = 2, 6, 3, 10
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    cos, sin = _rope_tables(T, D)
    theta = torch.atan2(sin.double(), cos.double())  # the angles
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.exp(-1j * theta)[None, :, None, :]
    y = torch.cat([z.real, z.imag], dim=-1)
    plain = y / torch.sqrt((y * y).mean(-1, keepdim=True) + 1e-6)
    out, _ = qk_norm_rope_reference(x, x, cos.double(), sin.double(), 1e-6)
    torch.testing.assert_close(out, plain)
