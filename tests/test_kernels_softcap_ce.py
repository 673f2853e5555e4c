import os

from megaloop.kernels.testing import generator, select_test_device

select_test_device()  # before triton is imported: the interpreter on CPU, compiled kernels on CUDA

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megaloop.kernels import softcap_cross_entropy, softcap_cross_entropy_reference
from megaloop.kernels.testing import check_close, ref_dtype, test_device

triton = pytest.importorskip("triton")


def _data(N, d, V, dtype, seed=0, n_ignore=3, vocab_valid=None):
    g = generator(seed)
    h = torch.randn(N, d, generator=g).to(dtype)
    w = (torch.randn(V, d, generator=g) * 2.0 / d ** 0.5).to(dtype)  # logits of O(1-3): softcap matters
    t = torch.randint(0, vocab_valid or V, (N,), generator=g)
    t[torch.randperm(N, generator=g)[:n_ignore]] = -100
    return h, w, t


def _run(fn, h, w, t, dt, **kw):
    hl = h.detach().to(dt).requires_grad_()
    wl = w.detach().to(dt).requires_grad_()
    loss = fn(hl, wl, t, **kw)
    loss.backward()
    return loss.detach(), hl.grad, wl.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("be", ["triton", "torch"])
@pytest.mark.parametrize("N,d,V,cap,chunk,vv", [
    (37, 48, 1001, 15.0, 16, None),   # several chunks, a ragged last one
    (1, 40, 300, None, None, None),   # one row, no softcap
    (50, 33, 1004, 2.0, 64, 1001),    # padded head: 3 masked columns, strong cap
])
def test_softcap_ce_matches_reference(N, d, V, cap, chunk, vv, be, dtype):
    h, w, t = _data(N, d, V, dtype, vocab_valid=vv, n_ignore=min(3, N - 1))
    kw = dict(softcap=cap, vocab_valid=vv)
    tri = _run(softcap_cross_entropy, h, w, t, dtype, chunk_size=chunk, backend=be, **kw)
    pt = _run(softcap_cross_entropy_reference, h, w, t, dtype, **kw)
    ref = _run(softcap_cross_entropy_reference, h, w, t, ref_dtype(dtype), **kw)
    assert tri[0].dtype == torch.float32 and tri[1].dtype == dtype and tri[2].dtype == dtype
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for name, a, b, c in zip(["loss", "dhidden", "dweight"], tri, pt, ref):
        check_close(f"{be}:{name}", a, b.to(a.dtype), c, atol=atol)
    if vv is not None:
        assert torch.all(tri[2][vv:] == 0)


def test_softcap_ce_grad_output_scaling_nograd_and_3d():
    h, w, t = _data(24, 16, 130, torch.float32)
    hl = h.view(2, 12, 16).clone().requires_grad_()
    wl = w.clone().requires_grad_()
    loss = softcap_cross_entropy(hl, wl, t.view(2, 12), 15.0, chunk_size=7, backend="triton")
    (3.0 * loss).backward()
    with torch.no_grad():
        loss_ng = softcap_cross_entropy(h, w, t, 15.0, backend="triton")
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = softcap_cross_entropy_reference(hr, wr, t, 15.0)
    (3.0 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(loss_ng, ref.detach())
    torch.testing.assert_close(hl.grad.view(24, 16), hr.grad)
    torch.testing.assert_close(wl.grad, wr.grad)
    # only the weight needs a gradient (frozen hidden): still right
    wl2 = w.clone().requires_grad_()
    softcap_cross_entropy(h, wl2, t, 15.0, chunk_size=5, backend="triton").backward()
    torch.testing.assert_close(wl2.grad, wr.grad / 3.0)


def test_reference_equals_plain_formula():
    h, w, t = _data(20, 12, 50, torch.float64, n_ignore=4)
    vv = 47
    t[t >= vv] = 3
    z = 15.0 * torch.tanh((h @ w.t()) / 15.0)
    z = z[:, :vv]
    rows = [torch.logsumexp(z[i], 0) - z[i, t[i]] for i in range(20) if t[i] != -100]
    plain = torch.stack(rows).mean()
    torch.testing.assert_close(softcap_cross_entropy_reference(h, w, t, 15.0, vocab_valid=vv), plain)


# ----------------------------------------------------------------------------- vocab parallel (gloo)
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_check(rank, world, V_pad, vocab_valid, be):
    N, d = 29, 24
    h, w_full, t = _data(N, d, V_pad, torch.float32, seed=5, vocab_valid=vocab_valid)
    shard = V_pad // world
    v0 = rank * shard
    hl = h.clone().requires_grad_()
    wl = w_full[v0:v0 + shard].clone().requires_grad_()
    loss = softcap_cross_entropy(hl, wl, t, 15.0, tp_group=dist.group.WORLD, vocab_start=v0,
                                 vocab_valid=vocab_valid, chunk_size=8, backend=be)
    loss.backward()
    gh = hl.grad.clone()
    dist.all_reduce(gh)  # what the caller's copy-to-tensor-parallel-region backward does
    shards = [torch.empty_like(wl.grad) for _ in range(world)]
    dist.all_gather(shards, wl.grad)
    gw = torch.cat(shards)
    # the single-process unfused reference on the unpadded head
    hr = h.clone().requires_grad_()
    wr = w_full[:vocab_valid].clone().requires_grad_()
    ref = softcap_cross_entropy_reference(hr, wr, t, 15.0)
    ref.backward()
    msg = f"rank {rank}, backend {be}, vocab {vocab_valid} padded to {V_pad}"
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{msg}: loss {m}")
    torch.testing.assert_close(gh, hr.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{msg}: dhidden {m}")
    torch.testing.assert_close(gw[:vocab_valid], wr.grad, rtol=1e-4, atol=1e-6,
                               msg=lambda m: f"{msg}: dweight {m}")
    assert torch.all(gw[vocab_valid:] == 0), msg


def _tp_worker(rank, world, port):
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for V_pad in (1002, 1004):  # 1001 real ids: 1 or 3 padding columns on the last rank
            for be in ("triton", "torch"):
                _tp_check(rank, world, V_pad, 1001, be)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(test_device() != "cpu", reason="gloo process group on CPU tensors")
def test_softcap_ce_vocab_parallel_gloo():
    mp.spawn(_tp_worker, args=(2, _free_port()), nprocs=2, join=True)
