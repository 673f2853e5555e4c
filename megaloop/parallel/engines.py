"""Building an engine: read the launcher's environment, validate the layout on every rank
*before* any collective (so a bad layout is one clear error per rank, never a hang), start
torch.distributed, create the process groups, and pick the engine.

Engines (both implement megaloop.parallel.engine_api.Engine, with EngineBase's one step):
  - TorchEngine (megaloop.parallel.torch_engine): one process, or TP x PP x DP with ZeRO stage 0,
    1 or 2 (its own, partitioning whole parameters: sharded_optim.py); Muon, MuonH or AdamW.
    Pipeline parallelism runs here (torch.distributed.pipelining, 1F1B).
  - DeepSpeedEngine (megaloop.parallel.deepspeed_engine): TP x DP with ZeRO stages 1-3, pp = 1,
    AdamW only (DeepSpeed's partitions are flat slices, not whole matrices).
parallel.engine=auto picks DeepSpeed for AdamW with pp = 1 and ZeRO >= 1 on more than one
process, the torch engine otherwise; ZeRO stage 0 always runs the torch engine.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from . import failfast, state
from .engine_api import Engine
from .parallelize import make_optimizer, parallelize, zero_stage_of
from .pipeline import check_pipeline
from .state import Layout, ParallelState, make_layout

# Builds the model (train.build_model, with any transform of it) on the device it is given: the
# CPU for a single process, the meta device for a rank of a parallel layout.
ModelBuilder = Callable[[torch.device], torch.nn.Module]


@dataclass(frozen=True)
class Rendezvous:
    rank: int
    world: int
    local_rank: int
    source: str  # torchrun | slurm


def rendezvous_from_env(env=None) -> Rendezvous:
    """Rank, world size and local rank from torchrun / the deepspeed launcher (RANK, WORLD_SIZE,
    LOCAL_RANK) or from `srun` started directly (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
    SLURM_LOCALID). MASTER_ADDR and MASTER_PORT must be set either way."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        source = "torchrun"
        rank, world = env.get("RANK", "0"), env["WORLD_SIZE"]
        local = env.get("LOCAL_RANK", "0")
    elif "SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        source = "slurm"
        rank = env.get("SLURM_PROCID", "0")
        world = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
        local = env.get("SLURM_LOCALID", "0")
    else:
        return Rendezvous(0, 1, 0, "single")
    if missing:
        hint = ("export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) and "
                "MASTER_PORT in the batch script (launch/slurm/*.sbatch do)") if source == "slurm" else \
            "launch with torchrun or launch/torchrun.sh, which set them"
        raise ConfigError(f"distributed launch ({source}) without the rendezvous variable(s) "
                          f"{', '.join(missing)}: {hint}")
    try:
        return Rendezvous(int(rank), int(world), int(local), source)
    except ValueError:
        raise ConfigError(f"malformed rank variables from {source}: rank={rank!r} world={world!r}") from None


def choose_engine(cfg: Config) -> str:
    """DeepSpeed where ZeRO asks for it and it can run the run (AdamW, pp = 1), or where the
    config names it; the torch engine everywhere else (always at zero_stage 0)."""
    p = cfg.parallel
    if p.zero_stage == 0:
        return "torch"
    if p.engine != "auto":
        return p.engine
    return "deepspeed" if p.pp == 1 and cfg.optim.name == "adamw" else "torch"


def validate_layout(cfg: Config, world: int, rank: int = 0) -> Layout:
    """Every check that needs the world size. Pure: runs before torch.distributed starts."""
    p, m = cfg.parallel, cfg.model
    if m.n_head % p.tp or m.kv_heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide the attention heads (model.n_head={m.n_head}, "
                          f"kv heads={m.kv_heads}): each TP rank holds whole heads. Choose tp among the "
                          f"common divisors, or change the head counts")
    if (m.mlp_ratio * m.d_model) % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide the MLP width {m.mlp_ratio * m.d_model}")
    if m.vocab_size < p.tp:
        raise ConfigError(f"parallel.tp={p.tp} exceeds model.vocab_size={m.vocab_size}")
    check_pipeline(m, p.pp)
    layout = make_layout(world, p.tp, p.pp, rank)
    kind = choose_engine(cfg)
    matrix = cfg.optim.name in ("muon", "muonh")
    if kind == "deepspeed" and p.pp > 1:
        raise ConfigError(f"parallel.engine=deepspeed runs pp=1 only (got parallel.pp={p.pp}); pipeline "
                          f"parallelism runs on parallel.engine=torch (or auto) with zero_stage 0, 1 or 2")
    if p.zero_stage == 3 and matrix:
        raise ConfigError(
            f"optim.name={cfg.optim.name} with parallel.zero_stage=3: megaloop's sharded {cfg.optim.name} "
            f"partitions optimiser state and gradients by whole matrices but keeps the weights replicated, and "
            f"DeepSpeed's ZeRO-3 hands the optimiser flat slices, which cannot be orthogonalised. Use "
            f"parallel.zero_stage=2 (state and gradients sharded), or optim.name=adamw for ZeRO-3")
    if kind == "deepspeed" and p.zero_stage >= 1 and matrix:
        raise ConfigError(
            f"optim.name={cfg.optim.name} with parallel.engine=deepspeed and zero_stage={p.zero_stage}: DeepSpeed's "
            f"ZeRO hands the optimiser flat slices of the weights, but {cfg.optim.name} orthogonalises whole "
            f"matrices. Use parallel.engine=torch (or auto), whose ZeRO 1 / 2 partitions whole matrices")
    if p.zero_stage == 3 and kind == "torch":
        where = f"the pipeline (parallel.pp={p.pp}) runs" if p.pp > 1 else "parallel.engine=torch runs"
        raise ConfigError(
            f"parallel.zero_stage=3: {where} on the torch engine, whose ZeRO shards optimiser state and "
            f"gradients but keeps the weights replicated. Use parallel.zero_stage=2, or ZeRO-3 on DeepSpeed "
            f"(parallel.engine=auto or deepspeed, with parallel.pp=1)")
    if kind == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError(f"parallel.zero_stage={p.zero_stage} runs on DeepSpeed, which is not installed: "
                          "DS_BUILD_OPS=0 pip install deepspeed (or pip install -e .[distributed]), or use "
                          "parallel.zero_stage=0") from None
    return layout


def init_torch_distributed(rdv: Rendezvous, device: torch.device, timeout_s: int = 600) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", rank=rdv.rank, world_size=rdv.world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_config(cfg: Config, rank: int) -> None:
    """Every rank must run the same config: the nodes of a multi-node job each read their own
    copy of the YAML (and their own --set), and two that differ would train different models in
    lockstep, or hang. The ranks exchange a hash of the resolved config; where they differ, every
    rank raises the same ConfigError naming the first differing key (in config order)."""
    flat = _flat(cfg.to_dict())
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()
    hashes: list = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, digest)
    if len(set(hashes)) == 1:
        return
    everyone: list = [None] * dist.get_world_size()  # only now the whole configs, to name the key
    dist.all_gather_object(everyone, (socket.gethostname(), flat))
    host0, ref = everyone[0]
    for other, (host, theirs) in enumerate(everyone):
        for key in [*ref, *(k for k in theirs if k not in ref)]:
            if ref.get(key, "<unset>") != theirs.get(key, "<unset>"):
                raise ConfigError(
                    f"the ranks disagree on the config: {key} is {ref.get(key, '<unset>')!r} on rank 0 (host {host0}) "
                    f"but {theirs.get(key, '<unset>')!r} on rank {other} (host {host}). Every node must start the "
                    f"same config file and --set overrides")


def make_engine(cfg: Config, model: torch.nn.Module, device: torch.device, st: ParallelState,
                compile: bool = False) -> Engine:
    """parallelize the model for st's layout, build its optimizer, and hand both to the engine."""
    if st.layout.world > 1 and choose_engine(cfg) == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine, zero3_partitioner
        pm = parallelize(model, st, cfg, device, compile, zero3_partitioner(cfg, st, device))
        return DeepSpeedEngine(cfg, pm, make_optimizer(pm, cfg, st, shard=False), device, st)
    pm = parallelize(model, st, cfg, device, compile)
    from .torch_engine import TorchEngine
    return TorchEngine(cfg, pm, make_optimizer(pm, cfg, st, shard=zero_stage_of(cfg, st) > 0), device, st)


def local_engine(cfg: Config, model: torch.nn.Module, device: torch.device, compile: bool = False) -> Engine:
    """The torch engine on this process alone (world size 1: no process group, no collective),
    whatever cfg.parallel says: for `megaloop eval` and other single-process tools on a plain model."""
    return make_engine(cfg, model, device, ParallelState(Layout(1, 1, 1)), compile)


def build_engine(cfg: Config, build_model: ModelBuilder, device: torch.device) -> Engine:
    """The engine for the launch environment and the config. One process: the model built on the
    CPU, the torch engine at world size 1 (ZeRO has nothing to shard there). Several: the layout
    is validated on every rank before any collective, then torch.distributed starts, each rank
    builds the model on the meta device and parallelize() materialises its own part, and
    DeepSpeed runs where ZeRO asks for it, the torch engine everywhere else."""
    rdv = rendezvous_from_env()  # also raises when a rendezvous variable is missing
    p = cfg.parallel
    if rdv.world == 1:
        if p.tp * p.pp > 1:
            raise ConfigError(
                f"parallel.tp={p.tp} x parallel.pp={p.pp} needs {p.tp * p.pp} processes, but this is a single "
                f"process. Launch with launch/torchrun.sh --nproc {p.tp * p.pp} (or set tp=pp=1)")
        return local_engine(cfg, build_model(torch.device("cpu")), device, cfg.train.compile)
    layout = validate_layout(cfg, rdv.world, rdv.rank)  # before any collective: errors on every rank
    if device.type == "cuda":
        device = torch.device("cuda", rdv.local_rank)
    init_torch_distributed(rdv, device)
    watch = failfast.start(rdv.rank, rdv.world)  # from here on, one failed rank stops every rank
    try:
        check_same_config(cfg, rdv.rank)
        st = state.initialize(layout)
        engine = make_engine(cfg, build_model(torch.device("meta")), device, st, cfg.train.compile)
    except BaseException as e:
        peer = watch.fail(e)
        if peer is None:
            raise
        raise peer from None
    engine.failfast = watch
    return engine
