import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import subprocess
import sys
import textwrap

import pytest
import torch

from megaloop.kernels import dispatch
from megaloop.kernels.dispatch import backend_for, get_backend, set_backend


@pytest.fixture
def clean_backend(monkeypatch):
    monkeypatch.delenv("MEGALOOP_KERNELS", raising=False)
    old = dispatch._configured
    yield monkeypatch
    dispatch._configured = old


def test_set_backend_and_env_override(clean_backend):
    x = torch.zeros(3)
    set_backend("auto")
    assert get_backend() == "auto" and backend_for(x) == "torch"  # auto on CPU: the reference
    set_backend("torch")
    assert backend_for(x) == "torch"
    clean_backend.setenv("MEGALOOP_KERNELS", "auto")
    assert get_backend() == "auto"  # the environment wins over the config
    with pytest.raises(ValueError):
        set_backend("cuda")
    clean_backend.setenv("MEGALOOP_KERNELS", "fast")
    with pytest.raises(ValueError):
        get_backend()


def test_forced_triton_on_cpu_needs_the_interpreter(clean_backend):
    pytest.importorskip("triton")
    x = torch.zeros(3)
    set_backend("triton")
    assert backend_for(x) == "triton"  # TRITON_INTERPRET=1 here
    clean_backend.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for(x)


def test_without_triton(clean_backend):
    clean_backend.setattr(dispatch, "_triton_cache", None)
    clean_backend.setattr(dispatch, "_triton_error", "ImportError: no triton")
    set_backend("auto")
    assert backend_for(torch.zeros(1)) == "torch"
    set_backend("triton")
    with pytest.raises(RuntimeError, match="cannot be imported"):
        backend_for(torch.zeros(1))


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
        K.set_backend("triton")
        try:
            K.rms_norm(x, w, 1e-6)
        except RuntimeError as e:
            assert "cannot be imported" in str(e)
        else:
            raise AssertionError("forced triton without triton must raise")
        print("ok")
    """)
    env = dict(os.environ)
    env.pop("MEGALOOP_KERNELS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_interpreter_import_order_is_reported(clean_backend):
    pytest.importorskip("triton")
    assert dispatch._interpreter_loaded()  # this module set TRITON_INTERPRET before importing triton
    clean_backend.setattr(dispatch, "_interpreter_loaded", lambda: False)
    set_backend("triton")
    with pytest.raises(RuntimeError, match="imported before"):
        backend_for(torch.zeros(1))
