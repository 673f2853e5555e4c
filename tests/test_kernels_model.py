"""End to end: a tiny looped model gives the same loss and gradients with the Triton kernels
(under the interpreter on CPU, compiled with MEGALOOP_TEST_DEVICE=cuda) as with the PyTorch references."""
from megaloop.kernels.testing import select_test_device

select_test_device()  # before triton is imported anywhere (the import is lazy)

import pytest  # noqa: E402
import torch  # noqa: E402

from megaloop.config import load_config  # noqa: E402
from megaloop.model import LoopedLM  # noqa: E402

pytest.importorskip("triton")


def loss_and_grads(model, idx, tgt):
    model.zero_grad(set_to_none=True)
    loss = model(idx, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["linear", "hyperconnect"])
def test_model_kernels_on_off_equal(mode):
    """Contract: loss and every parameter gradient agree between a model built with kernels=triton
    and one built with kernels=torch from the same weights (fp32, rtol 1e-4), for the linear
    injection (with truncated backprop) and hyperconnect lanes."""
    cfg = load_config(raw={"model": dict(d_model=40, n_head=4, n_kv_head=2, vocab_size=101, seq_len=12,
                                         n_prelude=1, n_recur_block=1, n_coda=1, num_recur=3,
                                         bptt_k=2 if mode == "linear" else None, input_injection=mode),
                           "train": {"steps": 1}}).model
    torch.manual_seed(0)
    model = LoopedLM(cfg, kernels="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = LoopedLM(cfg, kernels="triton")
    fused.load_state_dict(model.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    tgt = torch.roll(idx, -1, 1)
    l_ref, g_ref = loss_and_grads(model, idx, tgt)
    l_tri, g_tri = loss_and_grads(fused, idx, tgt)
    assert torch.allclose(l_tri, l_ref, rtol=1e-5)
    for n in g_ref:
        assert torch.allclose(g_tri[n], g_ref[n], rtol=1e-4, atol=1e-6), n
