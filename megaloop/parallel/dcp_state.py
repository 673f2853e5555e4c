"""Model and optimiser state on torch.distributed.checkpoint (DCP), one format for every layout.

A checkpoint's `state/` folder is one DCP checkpoint whose keys are the single-process model's:

    model.<param>               the weight, in its whole (single-process) shape
    optim.state.<param>.<key>   one optimiser state entry of that parameter: a tensor shaped like it
                                (momentum_buffer, exp_avg, exp_avg_sq) or a scalar (step, w0_norm)
    optim.group.<group>.<hp>    a parameter group's hyperparameters (kind, lr, initial_lr, betas, ...)

Each rank writes what it holds: a tensor-parallel shard as a DTensor on its TP group's DeviceMesh
with a Shard(dim) placement (vocab-parallel rows cut back to the real vocabulary, so padding never
reaches the disk), a pipeline stage its own parameters; of what several ranks hold (data-parallel
replicas, norms replicated over TP, tied copies) DCP writes one copy. Loading asks each rank for
the pieces its own layout needs and DCP reads the chunks that overlap them, so any TP / PP / DP /
ZeRO layout, or one process, resumes any checkpoint. Optimiser state is keyed by parameter, so a
rank may hold (save, and ask for) the state of only some of its parameters (`owns_state`).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

STATE_DIR = "state"
MODEL, STATE, GROUP = "model.", "optim.state.", "optim.group."

Named = Iterable[tuple[str, torch.Tensor]]
# A single process saves and loads without a process group, on purpose: DCP says so every time.
_NO_DIST = "torch.distributed is disabled, unavailable or uninitialized"
warnings.filterwarnings("ignore", message=_NO_DIST)  # for the writes in a background thread


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST)
        yield


def _error(msg: str):
    from ..errors import CheckpointError
    return CheckpointError(msg)


def has_state(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_DIR, ".metadata"))


# ---------------------------------------------------------------------------- where a piece lies
def _tp(p: torch.Tensor):
    """(split dim, group) of a tensor-parallel shard (megaloop.parallel.tensor_parallel marks
    them), None for a whole tensor."""
    dim, group = getattr(p, "tp_split_dim", None), getattr(p, "tp_group", None)
    if dim is None or group is None or dist.get_world_size(group) == 1:
        return None
    return dim, group


def local_shape(p: torch.Tensor) -> torch.Size:
    """The shape of this rank's piece of a parameter (ZeRO-3 hides it behind an empty tensor)."""
    return torch.Size(getattr(p, "ds_shape", None) or p.shape)


def whole_shape(shape: torch.Size, like: torch.Tensor) -> torch.Size:
    """The single-process shape of the tensor whose piece, shaped `shape`, this rank holds for
    the parameter `like` (unpadded along a vocab-parallel split)."""
    tp = _tp(like)
    if tp is None:
        return torch.Size(shape)
    dim, group = tp
    out = list(shape)
    out[dim] = getattr(like, "tp_full_size", shape[dim] * dist.get_world_size(group))
    return torch.Size(out)


_MESHES: dict = {}


def _mesh(group, device_type: str):
    hit = _MESHES.get((id(group), device_type))
    if hit is None or hit[0] is not group:
        from torch.distributed.device_mesh import DeviceMesh
        hit = _MESHES[(id(group), device_type)] = (group, DeviceMesh.from_group(group, device_type))
    return hit[1]


def canonical(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t`, this rank's piece shaped like the parameter `like`, as DCP should see it: the tensor
    itself when it is whole, else a DTensor (a view of t, no copy) placed in the whole tensor."""
    tp = _tp(like)
    if tp is None:
        return t
    from torch.distributed.tensor import DTensor, Shard

    dim, group = tp
    shape = whole_shape(t.shape, like)
    rows = t.size(dim)
    if rows != -(-shape[dim] // dist.get_world_size(group)):  # DTensor's uneven Shard: torch.chunk's sizes
        raise RuntimeError(f"a TP shard of {rows} along dim {dim} does not chunk a whole {shape[dim]}")
    keep = max(0, min(rows, shape[dim] - dist.get_rank(group) * rows))  # vocab padding is not saved
    return DTensor.from_local(t.narrow(dim, 0, keep), _mesh(group, t.device.type), [Shard(dim)],
                              run_check=False, shape=shape, stride=torch.empty(shape, device="meta").stride())


# ---------------------------------------------------------------------------- building the state
def state_dict(named: Named, optimizer: torch.optim.Optimizer,
               weight: Optional[Callable[[str, torch.Tensor], Optional[torch.Tensor]]] = None,
               state: Optional[Callable[[str, torch.Tensor], dict]] = None) -> dict:
    """The DCP state dict this rank writes for the parameters `named` ((name, parameter) pairs,
    the names the single-process model's): their weights, their optimiser state (the entries this
    rank holds) and its groups' hyperparameters. `weight(name, p)` and `state(name, p)` stand in
    for p.detach() and optimizer.state[p] where the engine keeps them elsewhere (ZeRO); they are
    called in order on every rank (so they may be collectives) and may return None / {} for a
    parameter another rank writes."""
    sd: dict = {}
    for name, p in named:
        w = p.detach() if weight is None else weight(name, p)
        if w is not None:
            sd[MODEL + name] = canonical(w, p)
        for k, v in (optimizer.state.get(p, {}) if state is None else state(name, p)).items():
            if torch.is_tensor(v) and v.dim() > 0:
                if v.shape != local_shape(p):
                    raise RuntimeError(f"optimiser state {k!r} of {name} is shaped {tuple(v.shape)}, not like "
                                       f"the parameter {tuple(local_shape(p))}")
                v = canonical(v, p)
            sd[f"{STATE}{name}.{k}"] = v
    for g in optimizer.param_groups:
        for k, v in g.items():
            if k != "params":
                sd[f"{GROUP}{g['name']}.{k}"] = v
    return sd


# ---------------------------------------------------------------------------- writing
_GROUP: list = [None, None]


def checkpoint_group():
    """A gloo group over every rank for DCP's own coordination (None in a single process): its
    own, so a save that writes in the background never shares a group with training's
    collectives, and gloo, which an asynchronous save needs. Created collectively at the first
    checkpoint, which every rank reaches at the same point."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _GROUP[0] is not dist.group.WORLD:
        _GROUP[:] = [dist.group.WORLD, dist.new_group(backend="gloo")]
    return _GROUP[1]


def _cause(e: BaseException) -> BaseException:
    """The error behind DCP's CheckpointException (which wraps every rank's failure): an OSError
    when there is one, so the caller can name the disk problem and its fix."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException):
        causes = []
        for rank, (exc, _) in sorted(e.failures.items()):
            cause = _cause(exc)
            if isinstance(cause, OSError) and not hasattr(cause, "failed_rank"):
                cause.failed_rank = rank  # (its group spans every rank) the error message names it and its host
            causes.append(cause)
        return next((c for c in causes if isinstance(c, OSError)), causes[0] if causes else e)
    return e


class Background:
    """A save whose writes continue in a thread after the state was copied to host memory."""

    def __init__(self, future: Future):
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def wait(self) -> None:
        """Block until every rank's files are written; raise what the writes met."""
        try:
            self.future.result()
        except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
            raise _cause(e) from None


def save(path: str, sd: dict, background: bool = False) -> Optional[Background]:
    """Write `sd` into path/state: collective over every rank, each writing its own file. With
    `background`, return once the state is copied; the files are complete when the returned
    handle's wait() returns."""
    from torch.distributed import checkpoint as dcp

    writer = dcp.FileSystemWriter(os.path.join(path, STATE_DIR), sync_files=True)
    group = checkpoint_group()
    try:
        if background:
            return Background(dcp.async_save(sd, storage_writer=writer, process_group=group, no_dist=group is None))
        with _quiet():
            dcp.save(sd, storage_writer=writer, process_group=group, no_dist=group is None)
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
        cause = _cause(e)
        if cause is e:
            raise
        raise cause from None
    return None


def write_whole(path: str, sd: dict) -> None:
    """Write whole tensors (keys as in the module docstring) from one process."""
    from torch.distributed import checkpoint as dcp
    with _quiet():
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(os.path.join(path, STATE_DIR), sync_files=True), no_dist=True)


# ---------------------------------------------------------------------------- reading
def metadata(path: str) -> dict:
    """key -> DCP storage metadata (TensorStorageMetadata: size, properties.dtype; or bytes)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not has_state(path):
        raise _error(not_a_checkpoint(path))
    try:
        return FileSystemReader(os.path.join(path, STATE_DIR)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - any parse failure is corruption
        raise _corrupt(path, e) from None


def not_a_checkpoint(path: str) -> str:
    if os.path.isfile(os.path.join(path, "model.pt")):
        return (f"{path} is a checkpoint in the format written before DCP checkpoints (model.pt, optim_full.pt); "
                f"convert it: megaloop checkpoint convert RUN_DIR --out NEW_RUN_DIR (or a checkpoint folder "
                f"--out a new folder), then resume the converted run")
    return (f"checkpoint {path} has no model and optimiser state ({STATE_DIR}/.metadata missing): it is incomplete; "
            f"resume from another one or start a fresh run directory")


def _corrupt(path: str, e: BaseException):
    return _error(f"checkpoint {path}/{STATE_DIR} is corrupt or incomplete ({type(_cause(e)).__name__}). Delete "
                  f"that checkpoint folder and resume from an earlier one")


def _read(path: str, sd: dict, distributed: bool) -> None:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    group = checkpoint_group() if distributed else None
    try:
        with _quiet():
            dcp.load(sd, storage_reader=dcp.FileSystemReader(os.path.join(path, STATE_DIR)), process_group=group,
                     no_dist=group is None)
    except CheckpointException as e:  # a rank could not read its pieces (a collective's failure is not one)
        raise _corrupt(path, e) from None


def read_whole(path: str, prefix: str = "") -> dict:
    """Every entry under `prefix` as whole tensors (or values), in this one process."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
          for k, m in metadata(path).items() if k.startswith(prefix)}
    _read(path, sd, distributed=False)
    return sd


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The single-process model's state dict of a checkpoint (export, evaluation, tests)."""
    return {k[len(MODEL):]: v for k, v in read_whole(path, MODEL).items()}


def split_optim(sd: dict) -> tuple[dict, dict]:
    """(per-parameter state {name: {key: value}}, group hyperparameters {group: {hp: value}}) of
    a state dict keyed as in the module docstring."""
    state: dict = {}
    groups: dict = {}
    for k, v in sd.items():
        if k.startswith(STATE):
            name, _, key = k[len(STATE):].rpartition(".")
            state.setdefault(name, {})[key] = v
        elif k.startswith(GROUP):
            group, _, hp = k[len(GROUP):].partition(".")
            groups.setdefault(group, {})[hp] = v
    return state, groups


@dataclass
class Loaded:
    weights: dict = field(default_factory=dict)   # name -> this rank's piece (a view of the parameter in place)
    states: dict = field(default_factory=dict)    # name -> {key: this rank's piece or value}, owned only


def load(path: str, named: Named, optimizer: torch.optim.Optimizer, known: Iterable[str],
         owns_state: Optional[Callable[[str], bool]] = None, in_place: bool = True) -> Loaded:
    """Fill this rank's parameters `named` and its optimiser from the checkpoint at `path`,
    whatever layout wrote it (collective over every rank). `known`: every parameter name of the
    model (a checkpoint with others does not fit it). owns_state(name): whether this rank holds
    that parameter's optimiser state (default: all). The groups' hyperparameters are set from the
    checkpoint, as torch's load_state_dict does. in_place=False: the weights and state come back
    in fresh tensors shaped like local_shape(p) instead, for an engine that keeps them elsewhere."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    named = list(named)
    md = metadata(path)
    known = set(known)
    per_param: dict[str, list[str]] = {}
    for k in md:
        if k.startswith(MODEL) and k[len(MODEL):] not in known:
            raise _error(f"checkpoint {path} holds {k[len(MODEL):]!r}, which this model does not have; the "
                         f"config's model shape differs from the run that wrote it")
        if k.startswith(STATE):
            name = k[len(STATE):].rpartition(".")[0]
            if name not in known:
                raise _error(f"checkpoint {path} holds optimiser state for {name!r}, which this model does not "
                             f"have; the config's model shape differs from the run that wrote it")
            per_param.setdefault(name, []).append(k)
    sd: dict = {}
    out = Loaded()
    for name, p in named:
        meta = md.get(MODEL + name)
        if meta is None:
            raise _error(f"checkpoint {path} does not fit this model (missing {name}); the config's model shape "
                         f"differs from the run that wrote it")
        shape = local_shape(p)
        if whole_shape(shape, p) != meta.size:
            raise _error(f"checkpoint {path}: {name} has shape {tuple(meta.size)}, which does not fit this model "
                         f"({tuple(whole_shape(shape, p))}); the config's model shape differs from the saved run")
        w = p.detach() if in_place else torch.empty(shape, dtype=meta.properties.dtype, device=p.device)
        out.weights[name] = w
        sd[MODEL + name] = canonical(w, p)
        if owns_state is not None and not owns_state(name):
            continue
        st = out.states[name] = {}
        for k in per_param.get(name, []):
            m, key = md[k], k.rpartition(".")[2]
            if not isinstance(m, TensorStorageMetadata):
                sd[k] = st[key] = None  # a plain value, filled in by the load
            elif len(m.size) == 0:
                sd[k] = st[key] = torch.zeros((), dtype=m.properties.dtype)
            elif whole_shape(shape, p) == m.size:
                st[key] = torch.zeros(shape, dtype=m.properties.dtype, device=p.device)
                sd[k] = canonical(st[key], p)
            else:
                raise _error(f"checkpoint {path}: optimiser state {key!r} of {name} has shape {tuple(m.size)}, "
                             f"which does not fit this model; the config's model shape differs from the saved run")
    for k in md:
        if k.startswith(GROUP):
            sd[k] = None
    _read(path, sd, distributed=True)
    for name, st in out.states.items():
        for key in st:
            if st[key] is None:
                st[key] = sd[f"{STATE}{name}.{key}"]
    _set_groups(optimizer, split_optim({k: v for k, v in sd.items() if k.startswith(GROUP)})[1], path)
    if in_place:
        params = dict(named)
        for name, st in out.states.items():
            if st:
                optimizer.state[params[name]] = st
            else:
                optimizer.state.pop(params[name], None)
    return out


def _set_groups(optimizer: torch.optim.Optimizer, saved_groups: dict, path: str) -> None:
    for g in optimizer.param_groups:
        saved = saved_groups.get(g.get("name"))
        if saved is None:
            raise _error(f"checkpoint {path} has no optimiser group {g.get('name')!r} (it has {sorted(saved_groups)}): "
                         f"it was written with another optim.name or model; resume with the run's own config")
        if saved.get("kind") != g.get("kind"):
            raise _error(f"checkpoint {path}: optimiser group {g['name']!r} is {saved.get('kind')} there and "
                         f"{g.get('kind')} now (optim.name changed); resume with the run's own config")
        g.update({k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"})
