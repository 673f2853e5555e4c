"""Parallelism applied from outside the model: process groups, tensor and pipeline parallel,
DeepSpeed ZeRO. `build_engine` picks the engine for the launch environment and the config."""
from __future__ import annotations

import os

import torch

from ..config import Config, ConfigError


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_engine(cfg: Config, model: torch.nn.Module, device: torch.device):
    from ..engine import LocalEngine

    world = world_size_from_env()
    p = cfg.parallel
    if world == 1 and p.tp == 1 and p.pp == 1 and p.engine != "deepspeed":
        return LocalEngine(cfg, model, device)
    if world == 1:
        raise ConfigError(
            f"parallel.tp={p.tp} x parallel.pp={p.pp} needs {p.tp * p.pp} processes, but this is a single "
            f"process. Launch with launch/torchrun.sh --nproc {p.tp * p.pp} (or set tp=pp=1)")
    from .engines import build_distributed_engine  # noqa: WPS433 - heavy imports only when distributed
    return build_distributed_engine(cfg, model, device)
