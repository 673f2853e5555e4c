"""The kernel backend: which implementation an op runs, Triton or the PyTorch reference.

The backend is a value the caller passes in: every public op takes ``backend=`` (a
:class:`KernelBackend`, or its name), and the model is built with the one that the config's
``kernels:`` entry names (``LoopedLM(cfg.model, kernels=cfg.kernels)``); its modules carry it to
every op they call. No environment variable or module-level setting chooses the backend
(TRITON_INTERPRET, Triton's own switch, only decides whether a forced ``triton`` can run on CPU).

- ``torch``: always the reference.
- ``triton``: always the Triton kernels. On a CUDA tensor they are compiled; on a CPU tensor they
  run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported),
  and a clear ``RuntimeError`` says so otherwise.
- ``auto`` (the default): Triton when the tensor lives on CUDA and triton is importable, the
  reference otherwise, decided per call from the tensor.

Triton is optional. It is imported only when an op is about to use it (``auto`` on a CUDA tensor,
or ``triton``), never when this package is imported, so every op works without it and importing
megaloop does not fix the interpreter choice. The Triton code itself lives in the
``megaloop.kernels.triton`` modules, which import triton at their top.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class KernelBackend:
    """The implementation the ops run: 'auto' | 'triton' | 'torch' (see the module docstring)."""

    name: str = "auto"

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"kernels backend must be one of {BACKENDS}, got {self.name!r}")

    def use_triton(self, tensor: torch.Tensor) -> bool:
        """True when an op whose main input is ``tensor`` runs its Triton kernel."""
        if self.name == "torch":
            return False
        if self.name == "auto":
            return tensor.is_cuda and triton_available()
        if not triton_available():
            raise RuntimeError(
                f"megaloop kernels backend 'triton' was requested but triton cannot be imported "
                f"({_triton_error}); install triton or use backend 'auto'/'torch'"
            )
        if not tensor.is_cuda:
            if not interpret_requested():
                raise RuntimeError(
                    "megaloop kernels backend 'triton' on a CPU tensor needs the Triton interpreter: set "
                    "TRITON_INTERPRET=1 before triton is imported, move the tensor to CUDA, or use backend "
                    "'auto'/'torch'"
                )
            if not _interpreter_loaded():
                raise RuntimeError(
                    "TRITON_INTERPRET=1 is set but triton was imported before it was: the interpreter "
                    "cannot run. Set TRITON_INTERPRET=1 before anything imports triton."
                )
        return True


Backend = Union[KernelBackend, str]
AUTO = KernelBackend("auto")


def as_backend(backend: Optional[Backend]) -> KernelBackend:
    """A KernelBackend from a backend or its name (None: auto)."""
    if isinstance(backend, KernelBackend):
        return backend
    return AUTO if backend is None else KernelBackend(str(backend).strip().lower())


def use_triton(backend: Optional[Backend], tensor: torch.Tensor) -> bool:
    """What ``backend`` decides for an op whose main input is ``tensor``."""
    return as_backend(backend).use_triton(tensor)


# ----------------------------------------------------------------------------- triton presence
# A cache of one fact about this Python environment (is triton importable?), filled on the first
# question; it chooses nothing by itself.
_triton_checked = False
_triton_error: Optional[str] = None


def triton_available() -> bool:
    """True when triton can be imported (it is imported by this question, once)."""
    global _triton_checked, _triton_error
    if not _triton_checked:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            _triton_error = f"{type(exc).__name__}: {exc}"
        _triton_checked = True
    return _triton_error is None


def interpret_requested() -> bool:
    """True when TRITON_INTERPRET asks for the Triton interpreter (Triton's own switch: triton.jit
    reads it when a kernel module is imported, megaloop.kernels.triton.common too)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _interpreter_loaded() -> bool:
    """True when triton's library functions were built for the interpreter, i.e. TRITON_INTERPRET=1
    was set before triton was imported (the interpreter replaces them at import)."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(tl.sum, InterpretedFunction)
    except Exception:  # a triton layout we do not know: do not block
        return True


# ----------------------------------------------------------------------------- sizes
def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
