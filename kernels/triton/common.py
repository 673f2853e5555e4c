"""What every Triton kernel module shares: the store helper ``cast_out`` and the launch sizes.

Both depend on whether the kernels run under the Triton interpreter (TRITON_INTERPRET=1) or are
compiled for a GPU. triton.jit decides that when it decorates, at import, from TRITON_INTERPRET;
``INTERPRET`` is read at the same moment so the helpers here agree with the kernels.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..dispatch import interpret_requested, next_pow2

INTERPRET = interpret_requested()


# cast_out(x, dtype): x.to(dtype) for a kernel's stores, rounding fp32 -> bf16 to nearest even.
if INTERPRET:
    @triton.jit
    def cast_out(x, dtype: tl.constexpr):
        # The interpreter converts fp32 -> bf16 by truncation (and mishandles subnormals, zero
        # included). Round to nearest even in the integer domain instead, as a GPU and torch do.
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(dtype)
else:
    @triton.jit
    def cast_out(x, dtype: tl.constexpr):
        return x.to(dtype)


# ----------------------------------------------------------------------------- launch sizes
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
    target = (1 << 16) if INTERPRET else 4096
    m = max(1, target // max(1, block_cols))
    m = 1 << (m.bit_length() - 1)  # floor to a power of two
    return max(1, min(m, next_pow2(max(1, n_rows))))


def elementwise_block(n: int) -> int:
    """Block size of a flat elementwise kernel."""
    if INTERPRET:
        return min(1 << 17, next_pow2(max(1, n)))
    return 2048


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 2


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def as_rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """A 2-D [rows, d] view of ``t`` with unit stride along d (copies only when needed)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    t2 = t.reshape(-1, d)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2
