"""MuonH, the reference study's matrix optimiser, against a plain re-implementation.

Contracts:
  - several steps of `optim.name=muonh` on tall, wide and square matrices of odd shapes equal a
    straightforward float64 implementation written here from the published recipe (Nesterov
    momentum 0.95, 5 Polar Express iterations with the published coefficients, update rescaled
    to ||W_0||_F, projection back onto the sphere), to 1e-5;
  - every matrix keeps its initial Frobenius norm to 1e-5, every step;
  - the AdamW groups (embeddings, head, norms) are untouched by the choice of matrix optimiser;
  - bad MuonH settings (ns_steps > 5, weight decay) are refused by the config;
  - a MuonH step's transient memory is one matrix's working set, not a copy of every gradient
    (peak resident memory of a step over 24 matrices of distinct shapes, Linux).
TP=2 / DP=2 / PP=2 equality with the single process runs in tests/test_parallel_equality.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megaloop.config import ConfigError, config_from_dict
from megaloop.optim import MuonAdamW, build_optimizer, polar_express

# The published Polar Express coefficients, typed in again (not imported) so a changed table fails.
COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def reference_muonh(w0: torch.Tensor, grads: list[torch.Tensor], lr: float, beta: float = 0.95) -> list[torch.Tensor]:
    """The recipe step by step in float64, with the wide-matrix Gram form for every shape."""
    w, buf = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64)
    radius = w.norm()
    out = []
    for g in grads:
        g = g.double()
        buf = buf + (1 - beta) * (g - buf)
        g = g + beta * (buf - g)
        x = g / (1.02 * g.norm() + 1e-6)
        for a, b, c in COEFFS:
            gram = x @ x.T
            x = a * x + b * gram @ x + c * gram @ gram @ x
        x = x * radius / x.norm()
        w = w - lr * x
        w = w * radius / w.norm()
        out.append(w.clone())
    return out


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (29, 29), (7, 130)])
def test_muonh_matches_plain_reimplementation(shape):
    """Six MuonH steps on one matrix equal the float64 re-implementation to 1e-5 (relative)."""
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.nn.Parameter(torch.randn(*shape, generator=g) / shape[1] ** 0.5)
    grads = [torch.randn(*shape, generator=g) for _ in range(6)]
    ref = reference_muonh(w.detach(), grads, lr=0.014)
    opt = MuonAdamW([dict(kind="muonh", params=[w], lr=0.014, momentum=0.95, ns_steps=5)])
    for step, (grad, expect) in enumerate(zip(grads, ref), 1):
        w.grad = grad.clone()
        opt.step()
        rel = float((w.detach().double() - expect).norm() / expect.norm())
        assert rel < 1e-5, f"{shape}: step {step} differs from the reference by {rel:.2e}"


def test_polar_express_orthogonalises():
    """Five iterations bring every singular value of a random matrix close to 1 (the polynomial
    keeps them in a band around 1, it does not hit 1 exactly)."""
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 96), (96, 64)]:
        s = torch.linalg.svdvals(polar_express(torch.randn(*shape, generator=g), 5))
        assert float(s.min()) > 0.6 and float(s.max()) < 1.25, (shape, s.min(), s.max())


def _tiny_cfg(**optim):
    return config_from_dict({
        "model": dict(d_model=48, n_head=2, n_kv_head=1, vocab_size=67, seq_len=16, n_prelude=1,
                      n_recur_block=1, n_coda=1, num_recur=3, input_injection="linear"),
        "optim": dict(name="muonh", lr=0.014, **optim),
        "train": dict(steps=4, device="cpu"),
    })


def test_muonh_keeps_every_matrix_on_its_sphere():
    """In a real LoopedLM trained with muonh, every matrix (blocks and injection adapter) keeps
    the Frobenius norm it had at initialisation to 1e-5, while it does move."""
    from megaloop.train import build_model

    torch.manual_seed(0)
    cfg = _tiny_cfg()
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optim)
    kinds = {g["name"]: g["kind"] for g in opt.param_groups}
    assert kinds["matrices"] == "muonh" and kinds["embed"] == "adamw"
    matrices = [p for g in opt.param_groups if g["kind"] == "muonh" for p in g["params"]]
    assert any(p.shape[1] == 2 * cfg.model.d_model for p in matrices), "the injection adapter is a MuonH matrix"
    start = [p.detach().clone() for p in matrices]
    x = torch.randint(0, cfg.model.vocab_size, (2, 17))
    for _ in range(5):
        opt.zero_grad()
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
    for p0, p in zip(start, matrices):
        assert abs(float(p.detach().norm() / p0.norm()) - 1) < 1e-5
        assert float((p.detach() - p0).norm()) > 1e-3 * float(p0.norm())


def test_adamw_groups_do_not_depend_on_matrix_optimiser():
    """muonh and muon differ only in the matrices: embeddings, head and norms take the same steps."""
    from megaloop.train import build_model

    results = {}
    for name in ("muonh", "muon"):
        torch.manual_seed(0)
        cfg = _tiny_cfg()
        cfg.optim.name = name
        model = build_model(cfg)
        for p in model.parameters():  # identical gradients for both: a fixed random direction
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        build_optimizer(model, cfg.optim).step()
        results[name] = {k: v.detach().clone() for k, v in model.named_parameters()}
    for k in results["muon"]:
        same = torch.equal(results["muon"][k], results["muonh"][k])
        is_matrix = results["muon"][k].ndim == 2 and not k.startswith(("embed.", "head."))
        assert same != is_matrix, k


@pytest.mark.parametrize("optim,needle", [({"ns_steps": 6}, "ns_steps"), ({"weight_decay": 0.1}, "weight_decay")])
def test_muonh_bad_settings_refused(optim, needle):
    """ns_steps beyond the 5 published coefficients, or weight decay, are config errors."""
    with pytest.raises(ConfigError, match=needle):
        _tiny_cfg(**optim)


STEP_MEMORY = r"""
import ctypes, torch
from megaloop.optim import MuonAdamW
# every allocation of 64 KiB or more mmapped and unmapped on free: resident memory tracks the
# live tensors, not what glibc keeps of freed ones
ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
def peak():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM"))
ps = [torch.nn.Parameter(torch.randn(256, 1024 + 64 * i)) for i in range(24)]  # 24 shapes: 24 batches of one
opt = MuonAdamW([dict(kind="muonh", params=ps, lr=0.01, momentum=0.95, ns_steps=2)])
for step in range(2):  # the first step allocates the momentum buffers; the second is measured
    for p in ps:
        p.grad = torch.randn_like(p)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = peak()
    opt.step()
print(peak() - base, sum(p.numel() * 4 for p in ps), max(p.numel() * 4 for p in ps))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures Linux's peak resident size")
def test_muonh_step_memory_is_one_matrix_not_every_gradient():
    """The step's peak resident growth stays below half the gradients' bytes (measured: 14.5 MiB,
    ~6 times the largest matrix, against 41.2 MiB of gradients); a step that makes every
    matrix's Nesterov update up front, as before, holds a copy of all of them at once (46.9 MiB)."""
    out = subprocess.run([sys.executable, "-c", STEP_MEMORY], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    growth, grads, largest = map(int, out.stdout.split())
    assert growth <= grads / 2, f"a MuonH step grew by {growth / 2**20:.1f} MB over {grads / 2**20:.1f} MB of gradients"
