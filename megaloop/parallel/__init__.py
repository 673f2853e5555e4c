"""Parallelism applied from outside the model: process groups, tensor and pipeline parallel,
DeepSpeed ZeRO. `build_engine` picks the engine for the launch environment and the config."""
from __future__ import annotations

import torch

from ..config import Config, ConfigError


def world_size_from_env() -> int:
    from .engines import rendezvous_from_env
    return rendezvous_from_env().world


def build_engine(cfg: Config, model: torch.nn.Module, device: torch.device):
    """LocalEngine for one process; otherwise the distributed engine (after validating the layout
    against the world size on every rank, before any collective)."""
    from ..engine import LocalEngine

    world = world_size_from_env()  # also raises when a rendezvous variable is missing
    p = cfg.parallel
    if world == 1 and p.tp == 1 and p.pp == 1:  # ZeRO has nothing to shard on one process
        return LocalEngine(cfg, model, device)
    if world == 1:
        raise ConfigError(
            f"parallel.tp={p.tp} x parallel.pp={p.pp} needs {p.tp * p.pp} processes, but this is a single "
            f"process. Launch with launch/torchrun.sh --nproc {p.tp * p.pp} (or set tp=pp=1)")
    from .engines import build_distributed_engine  # noqa: WPS433 - heavy imports only when distributed
    return build_distributed_engine(cfg, model, device)
