"""Backend switch for the fused kernels: Triton or the PyTorch reference.

Resolution order for the backend name:
1. the environment variable ``MEGALOOP_KERNELS`` (auto | triton | torch), when set;
2. the value given to :func:`set_backend` (the ``kernels:`` entry of the config);
3. ``auto``.

``auto`` picks Triton only when triton is importable AND the tensor lives on CUDA; otherwise
the PyTorch reference. ``triton`` forces the Triton kernels; on a CPU tensor that works only
under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported), and
raises a clear ``RuntimeError`` otherwise. ``torch`` always uses the reference.

Triton is an optional dependency, imported lazily (by :func:`triton_modules`, on the first call
that needs it), never when this package is imported: every op works (reference path) without
it, and importing megaloop does not pin the interpreter choice (TRITON_INTERPRET must be set
before triton is imported). Kernels are written as plain functions and jitted on first launch
(:class:`LazyKernel`), which binds ``tl`` and the ``cast_out`` helper into their module.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "MEGALOOP_KERNELS"

tl = None  # triton.language, bound by LazyKernel on the first launch

_configured = "auto"
_triton_cache: Optional[tuple] = None
_triton_error: Optional[str] = None


def set_backend(name: str) -> None:
    """Set the configured backend (the env var MEGALOOP_KERNELS still overrides it)."""
    global _configured
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {BACKENDS}, got {name!r}")
    _configured = name


def get_backend() -> str:
    """The requested backend name (auto | triton | torch) after the env override."""
    env = os.environ.get(ENV_VAR)
    if env:
        env = env.strip().lower()
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
        return env
    return _configured


def interpret_mode() -> bool:
    """True when the Triton interpreter is requested (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_modules():
    """(triton, triton.language) or None when triton cannot be imported."""
    global _triton_cache, _triton_error
    if _triton_cache is None and _triton_error is None:
        try:
            import triton
            import triton.language as tl

            _triton_cache = (triton, tl)
        except Exception as exc:  # ImportError, or a broken install
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_cache


def triton_available() -> bool:
    return triton_modules() is not None


def backend_for(tensor: torch.Tensor) -> str:
    """'triton' or 'torch' for an op whose main input is ``tensor``."""
    name = get_backend()
    if name == "torch":
        return "torch"
    if name == "auto":
        if tensor.is_cuda and triton_available():
            return "triton"
        return "torch"
    # name == "triton": forced.
    if not triton_available():
        raise RuntimeError(
            f"megaloop kernels backend 'triton' was requested but triton cannot be imported "
            f"({_triton_error}); install triton or use backend 'auto'/'torch'"
        )
    if not tensor.is_cuda:
        if not interpret_mode():
            raise RuntimeError(
                "megaloop kernels backend 'triton' on a CPU tensor needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before triton is imported, move the tensor to CUDA, or use "
                "backend 'auto'/'torch'"
            )
        if not _interpreter_loaded():
            raise RuntimeError(
                "TRITON_INTERPRET=1 is set but triton was imported before it was: the interpreter "
                "cannot run. Set TRITON_INTERPRET=1 before anything imports triton."
            )
    return "triton"


def _interpreter_loaded() -> bool:
    """True when triton's own library functions were built for the interpreter (import order)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(triton_modules()[1].sum, InterpretedFunction)
    except Exception:  # a triton layout we do not know: do not block
        return True


# ----------------------------------------------------------------------------- launch sizing
def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def num_warps_for(tile_elems: int) -> int:
    """A warp count for a tile of ``tile_elems`` fp32 values (GPU only; ignored by the interpreter)."""
    if tile_elems >= 32768:
        return 16
    if tile_elems >= 8192:
        return 8
    if tile_elems >= 2048:
        return 4
    return 2 if tile_elems >= 512 else 1


def rows_per_program(n_rows: int, block_cols: int) -> int:
    """Rows handled by one program of a row-wise kernel (a power of two).

    On a GPU the tile is kept at about 4k elements (one row for wide rows, several narrow rows
    per program). Under the interpreter each program costs a Python-level pass, so the tile is
    made as large as ~64k elements to keep the program count small.
    """
    target = (1 << 16) if interpret_mode() else 4096
    m = max(1, target // max(1, block_cols))
    m = 1 << (m.bit_length() - 1)  # floor to a power of two
    return max(1, min(m, next_pow2(max(1, n_rows))))


def elementwise_block(n: int) -> int:
    """Block size of a flat elementwise kernel."""
    if interpret_mode():
        return min(1 << 17, next_pow2(max(1, n)))
    return 2048


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 2


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ----------------------------------------------------------------------------- lazy jit
def _cast_out_native(x, dtype: tl.constexpr):
    return x.to(dtype)


def _cast_out_interp(x, dtype: tl.constexpr):
    # The interpreter converts fp32 -> bf16 by truncation (and mishandles subnormals, zero
    # included). Round to nearest even in the integer domain instead, as a GPU and torch do.
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


_helpers = {}


def _jit_helpers(triton_mod, mode):
    global tl
    tl = triton_mod.language
    h = _helpers.get(mode)
    if h is None:
        h = {"cast_out": triton_mod.jit(_cast_out_interp if mode else _cast_out_native)}
        _helpers[mode] = h
    return h


class LazyKernel:
    """A Triton kernel jitted on first launch.

    ``triton.jit`` decides between the compiler and the interpreter when it decorates, from
    TRITON_INTERPRET at that moment. Jitting lazily (and once per mode) lets the package be
    imported before a test sets TRITON_INTERPRET=1, and keeps triton optional.
    """

    def __init__(self, fn):
        self.fn = fn
        self._compiled = {}

    def _get(self):
        mode = interpret_mode()
        mods = triton_modules()
        if mods is None:
            raise RuntimeError(f"triton is not available ({_triton_error})")
        k = self._compiled.get(mode)
        if k is None:
            k = mods[0].jit(self.fn)
            self._compiled[mode] = k
        # kernels use ``tl`` and call ``cast_out(x, dtype)`` to store results: bind them (the
        # cast_out variant of this mode) into the kernel's module
        self.fn.__globals__.update(_jit_helpers(mods[0], mode), tl=mods[1])
        return k

    def __getitem__(self, grid):
        return self._get()[grid]


def lazy_jit(fn):
    return LazyKernel(fn)


def as_rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """A 2-D [rows, d] view of ``t`` with unit stride along d (copies only when needed)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    t2 = t.reshape(-1, d)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2
