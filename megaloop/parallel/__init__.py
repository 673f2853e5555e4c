"""Parallelism applied from outside the model: process groups, tensor and pipeline parallel,
DeepSpeed ZeRO. `build_engine` picks the engine for the launch environment and the config; every
engine implements `Engine` (engine_api.py) with the one training step of base.py."""
from __future__ import annotations

from .engine_api import Engine, StepStats, autocast_for
from .engines import build_engine, local_engine

__all__ = ["Engine", "StepStats", "autocast_for", "build_engine", "local_engine"]
