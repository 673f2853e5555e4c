"""FP8 training (`parallel.precision: fp8`): torchao's float8 linears, tensorwise scaling.

What it does. Each converted linear runs its three matrix products (the forward, the input
gradient and the weight gradient) on float8 operands: the input and the weight in e4m3, the
output gradient in e5m2, each with one dynamic scale per tensor (amax / the format's largest
value, recomputed every step: "tensorwise"). The fp32 master weights, the optimiser and
everything outside the converted linears stay as under `precision: bf16` (bf16 autocast).
On a GPU of compute capability 8.9 or newer the products are `torch._scaled_mm`; on a CPU
torchao emulates them (`Float8LinearConfig(emulate=True)`: the operands are rounded to float8
exactly as on the GPU, then multiplied in high precision), which is what the tests run.

Which linears convert: the reference study's rule (kschwethelm/looped-lm-scaling,
scripts/base_train.py with nanochat/fp8.py): every nn.Linear whose in and out features are
multiples of 16 and at least 128. In megaloop the nn.Linear modules are the blocks' q, k, v, o
and MLP projections (prelude, recurrent group, coda). The recurrent group's blocks are single
modules applied r times, so each shared weight is converted once and every pass runs the same
float8 linear (a fresh tensorwise scale per call: each pass's input gets its own amax).
The reference's own lm_head and injection adapter are nn.Linear modules and pass its filter;
megaloop's are not (the head is the fused, chunked softcap cross-entropy and the injection the
fused norm + injection kernel, both taking the weight directly), so they stay in bf16 here,
as do the embedding and the norms. docs/speed.md keeps that difference on record.

Tensor parallelism: the TP layers (megaloop.parallel.tensor_parallel) are not nn.Linear. A
linear converted here keeps its torchao config, and the TP layer built from it multiplies its
shard through `float8_linear`, torchao's own float8 matmul (the autograd function its
Float8Linear calls). Each shard is scaled by its own amax, so a TP run is not bitwise the
single-process fp8 run; both stay within float8's error of the bf16 product.

The filter reads the whole (unsharded) shapes, so the same layers convert under every layout;
`megaloop.config.check_fp8_config` (run by the config validation) refuses the sizes a float8 matmul cannot
take, the shards included, before anything is built.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn

from .config import FP8_ALIGN, ConfigError

ALIGN = FP8_ALIGN       # float8 matmuls (cuBLAS _scaled_mm) need both dims to be multiples of 16
MIN_FEATURES = 128      # the reference's cut: smaller linears are not worth the casts, stay bf16
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (sm_89), Hopper (sm_90) and newer
TORCHAO_HINT = "pip install -e .[fp8] (torchao==0.18.0)"


def block_linear_shapes(m) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear of a block, from a ModelConfig."""
    d, q, kv, ffn = m.d_model, m.n_head * m.hdim, m.kv_heads * m.hdim, m.mlp_ratio * m.d_model
    return {"attn.wq": (d, q), "attn.wk": (d, kv), "attn.wv": (d, kv), "attn.wo": (q, d),
            "mlp.fc": (d, ffn), "mlp.proj": (ffn, d)}


def converts(in_features: int, out_features: int) -> bool:
    """The reference's filter: both sizes multiples of 16 and at least 128."""
    return (in_features % ALIGN == 0 and out_features % ALIGN == 0
            and min(in_features, out_features) >= MIN_FEATURES)


@contextmanager
def _quiet_import():
    """torchao's import logs a line per optional CUDA extension it cannot load (every CPU host)
    and torch warns about one of its enums; neither concerns a user."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def require_runtime(device: torch.device):
    """torchao.float8, after checking this device can run float8; one ConfigError otherwise."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if tuple(cap) < MIN_CAPABILITY:
            raise ConfigError(
                f"parallel.precision=fp8 needs float8 tensor cores (compute capability "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer: Ada, Hopper, Blackwell), but "
                f"{torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]}. Use parallel.precision=bf16 on this GPU")
    try:
        with _quiet_import():
            import torchao.float8 as float8
    except ImportError as e:
        raise ConfigError(f"parallel.precision=fp8 needs torchao, which is not importable here ({e}): "
                          f"{TORCHAO_HINT}, or use parallel.precision=bf16") from None
    return float8


def float8_config(device: torch.device):
    """Tensorwise dynamic scaling (torchao's default recipe, the reference's); emulated off CUDA."""
    float8 = require_runtime(device)
    return float8.Float8LinearConfig(emulate=device.type != "cuda")


def kernel_name(config) -> str:
    """What runs a converted product under `config` (recorded by the benchmarks)."""
    return "emulated (float8-rounded operands, high-precision torch.mm)" if config.emulate else "torch._scaled_mm"


def config_of(module: nn.Module):
    """The torchao float8 config a converted linear carries, or None for any other module."""
    return getattr(module, "config", None) if type(module).__name__ == "Float8Linear" else None


def convert_for_fp8(model: nn.Module, cfg, device: torch.device) -> list[str]:
    """Swap the linears the reference's rule selects for torchao Float8Linear, in place, when
    cfg.parallel.precision is fp8 (otherwise nothing). Apply after building the model and before
    parallelising or compiling it. Returns the converted modules' names. The weights stay the
    same Parameter objects, so state dicts and checkpoints are unchanged."""
    if cfg.parallel.precision != "fp8":
        return []
    config = float8_config(device)
    with _quiet_import():
        from torchao.float8 import convert_to_float8_training
    blocks = {id(b) for b in model.blocks()}
    names: list[str] = []

    def wanted(mod: nn.Module, fqn: str) -> bool:
        # only the blocks' linears (the head and injection are not nn.Linear in megaloop anyway)
        parent = model.get_submodule(fqn.rsplit(".", 2)[0]) if fqn.count(".") >= 2 else None
        ok = (isinstance(mod, nn.Linear) and parent is not None and id(parent) in blocks
              and converts(mod.in_features, mod.out_features))
        if ok:
            names.append(fqn)
        return ok

    convert_to_float8_training(model, config=config, module_filter_fn=wanted)
    return names


def float8_linear(x: torch.Tensor, weight: torch.Tensor, config) -> torch.Tensor:
    """x @ weight.T through torchao's float8 matmul (the autograd function Float8Linear runs):
    for the TP layers, which hold a shard of a converted linear's weight."""
    with _quiet_import():
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
        from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig
    mm = LinearMMConfig(*(ScaledMMConfig(config.emulate, g.use_fast_accum, False, config.pad_inner_dim)
                          for g in (config.gemm_config_output, config.gemm_config_grad_input,
                                    config.gemm_config_grad_weight)))
    if torch.is_autocast_enabled():  # exactly as Float8Linear.forward (CUDA autocast): same numerics
        x = x.to(torch.get_autocast_gpu_dtype())
    return matmul_with_hp_or_float8_args.apply(x, weight.t(), mm, config)


def linear(x: torch.Tensor, weight: torch.Tensor, config: Optional[object]) -> torch.Tensor:
    """F.linear, or its float8 version when `config` (a converted linear's) is given."""
    return torch.nn.functional.linear(x, weight) if config is None else float8_linear(x, weight, config)
