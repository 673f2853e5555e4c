import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import subprocess
import sys
import textwrap

import pytest
import torch

from megaloop.kernels import dispatch
from megaloop.kernels.dispatch import AUTO, KernelBackend, as_backend, use_triton


def test_backend_names_and_the_choice_on_cpu():
    """Contract: a backend is one of auto | triton | torch (a name is normalised, anything else is a
    ValueError naming the choices); on a CPU tensor auto and torch run the reference; None means auto."""
    x = torch.zeros(3)
    assert not KernelBackend("auto").use_triton(x) and not KernelBackend("torch").use_triton(x)
    assert as_backend(" Torch ") == KernelBackend("torch") and as_backend(None) is AUTO
    assert as_backend(AUTO) is AUTO
    with pytest.raises(ValueError, match="auto"):
        KernelBackend("cuda")
    with pytest.raises(ValueError, match="fast"):
        use_triton("fast", x)


def test_the_environment_does_not_choose(monkeypatch):
    """Contract: the backend is the value passed in; the old MEGALOOP_KERNELS variable is not read."""
    monkeypatch.setenv("MEGALOOP_KERNELS", "triton")
    assert not use_triton("torch", torch.zeros(1)) and not use_triton("auto", torch.zeros(1))


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    """Contract: triton on a CPU tensor runs under the interpreter, and says how to get it otherwise."""
    pytest.importorskip("triton")
    x = torch.zeros(3)
    assert KernelBackend("triton").use_triton(x)  # TRITON_INTERPRET=1 here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        KernelBackend("triton").use_triton(x)


def test_without_triton(monkeypatch):
    """Contract: without triton, auto runs the reference and a forced triton is a clear error."""
    monkeypatch.setattr(dispatch, "_triton_checked", True)
    monkeypatch.setattr(dispatch, "_triton_error", "ImportError: no triton")
    assert not KernelBackend("auto").use_triton(torch.zeros(1))
    with pytest.raises(RuntimeError, match="cannot be imported"):
        KernelBackend("triton").use_triton(torch.zeros(1))


def test_every_op_runs_when_triton_is_not_installed():
    """A fresh interpreter where `import triton` fails: all ops work through the references."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        sys.modules["triton.language"] = None
        import torch
        import megaloop.kernels as K
        assert not K.triton_available()
        x = torch.randn(2, 5, 16, requires_grad=True)
        w = torch.ones(16, requires_grad=True)
        y = K.rms_norm(x, w, 1e-6); y2, h = K.add_rms_norm(x, x, w, 1e-6)
        q = torch.randn(2, 5, 4, 16, requires_grad=True)
        cos, sin = torch.ones(5, 8), torch.zeros(5, 8)
        qo, ko = K.qk_norm_rope(q, q[:, :, :2], cos, sin, 1e-6)
        r = K.relu_squared(x)
        W = torch.randn(16, 32, requires_grad=True)
        s, u = K.recur_norm_inject(x, x, w, 1e-6, "linear", W)
        lanes = torch.randn(2, 2, 5, 16, requires_grad=True)
        c = K.hc_combine(lanes, torch.ones(2)); nl = K.hc_update(lanes, s, torch.eye(2), torch.ones(2))
        loss = K.softcap_cross_entropy(x.reshape(-1, 16), torch.randn(30, 16), torch.randint(0, 30, (10,)), 15.0)
        total = sum(t.float().sum() for t in (y, y2, h, qo, ko, r, s, u, c, nl)) + loss
        total.backward()
        try:
            K.rms_norm(x, w, 1e-6, backend="triton")
        except RuntimeError as e:
            assert "cannot be imported" in str(e)
        else:
            raise AssertionError("forced triton without triton must raise")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_importing_megaloop_does_not_import_triton():
    """Contract: importing megaloop and megaloop.kernels, building a model and running it with the
    auto backend on CPU never imports triton (so the interpreter choice stays open, triton optional)."""
    code = textwrap.dedent("""
        import sys
        import megaloop, megaloop.kernels
        assert "triton" not in sys.modules, "import"
        import torch
        from megaloop.config import ModelConfig
        from megaloop.model import LoopedLM
        cfg = ModelConfig(d_model=32, n_head=2, vocab_size=61, seq_len=8, n_prelude=1, n_recur_block=1, n_coda=1,
                          num_recur=2)
        idx = torch.randint(0, 61, (1, 8))
        LoopedLM(cfg, kernels="auto")(idx, idx).backward()
        assert "triton" not in sys.modules, "auto on CPU"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_triton_modules_define_their_kernels_plainly():
    """Contract: the Triton code sits in megaloop.kernels.triton, whose kernels are triton.jit
    functions made at import (interpreted here: TRITON_INTERPRET=1 was set first), and the op
    modules hold no triton names."""
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from megaloop.kernels.triton import common
    from megaloop.kernels.triton import recurrence as t_rec
    from megaloop.kernels.triton import rms_norm as t_rms

    assert common.INTERPRET and common.tl is triton.language
    for kernel in (common.cast_out, t_rms._rms_fwd_kernel, t_rec._hc_update_bwd_kernel):
        assert isinstance(kernel, InterpretedFunction), kernel
    for name in ("rms_norm", "qk_norm_rope", "relu_squared", "recurrence", "softcap_ce"):
        module = sys.modules[f"megaloop.kernels.{name}"]
        assert not {"tl", "cast_out", "triton"} & set(vars(module)), name


def test_interpreter_import_order_is_reported(monkeypatch):
    """Contract: TRITON_INTERPRET=1 set after triton was imported is named as the problem."""
    pytest.importorskip("triton")
    assert dispatch._interpreter_loaded()  # this module set TRITON_INTERPRET before importing triton
    monkeypatch.setattr(dispatch, "_interpreter_loaded", lambda: False)
    with pytest.raises(RuntimeError, match="imported before"):
        KernelBackend("triton").use_triton(torch.zeros(1))
