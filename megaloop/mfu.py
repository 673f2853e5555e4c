"""Peak FLOP/s for model-FLOPs utilisation: a table for common GPUs, a measurement on CPU.

MFU uses the loop-aware FLOPs per token of megaloop.accounting (the recurrent group counted r
times), never 6N with shared weights counted once, which undercounts a looped model ~r times.
"""
from __future__ import annotations

import json
import os
import time

import torch

# Dense peak FLOP/s (no sparsity) by device-name substring: (bf16, fp32 / tf32-off).
GPU_PEAKS = {
    "H200": (989e12, 67e12), "H100": (989e12, 67e12), "GH200": (989e12, 67e12),
    "A100": (312e12, 19.5e12), "A6000": (154.8e12, 38.7e12), "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12), "A10": (125e12, 31.2e12), "V100": (125e12, 15.7e12),
    "B200": (2250e12, 80e12), "MI300X": (1307e12, 163.4e12), "4090": (165e12, 82.6e12),
}
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "megaloop", "cpu_peak.json")


def measure_matmul_flops(dtype: torch.dtype, n: int = 1024, reps: int = 8) -> float:
    """Achieved FLOP/s of square matmuls on this CPU (the practical peak for MFU on CPU)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, precision: str) -> float:
    bf16 = precision == "bf16"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (pb, pf) in GPU_PEAKS.items():
            if key in name:
                return pb if bf16 else pf
        return 0.0  # unknown GPU: set logging.peak_flops for MFU
    key = f"{'bf16' if bf16 else 'fp32'}_threads{torch.get_num_threads()}"
    try:
        with open(CACHE) as f:
            cached = json.load(f)
        if key in cached:
            return cached[key]
    except (OSError, ValueError):
        cached = {}
    value = measure_matmul_flops(torch.bfloat16 if bf16 else torch.float32)
    try:
        os.makedirs(os.path.dirname(CACHE), exist_ok=True)
        cached[key] = value
        with open(CACHE + ".tmp", "w") as f:
            json.dump(cached, f)
        os.replace(CACHE + ".tmp", CACHE)
    except OSError:
        pass
    return value
