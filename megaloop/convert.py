"""`megaloop checkpoint convert`: checkpoints written before DCP checkpoints, as DCP checkpoints.

The format before (one checkpoint folder):
    model.pt                 the plain single-process state dict, consolidated (every engine)
    optim_full.pt            {"format": "megaloop-optim-v1", "groups": {group: hyperparameters},
                              "state": {param name: {key: whole tensor or scalar}}} (every engine)
    optim.pt                 a single process's torch optimizer state dict (index-keyed)
    optim_tp*_pp*.pt         a torch-engine rank's own optimiser state (read for tp = pp = 1)
    deepspeed/               DeepSpeed's own checkpoint (not needed: optim_full.pt holds its state)
    trainer.pt, meta.json
`convert` writes state/ (megaloop/parallel/dcp_state.py) with trainer.pt and meta.json beside it.
A run directory becomes a new run directory (config.yaml with train.run_dir pointing at it,
metrics.jsonl, its latest checkpoint converted), which `megaloop train OUT/config.yaml --resume`
continues under any layout; a checkpoint folder becomes a checkpoint folder. The source is only read.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import torch

FULL_FORMAT = "megaloop-optim-v1"


def _error(msg: str):
    from .checkpoint import CheckpointError
    return CheckpointError(msg)


def _config_of(src: str, run_dir: Optional[str]):
    from .checkpoint import read_meta
    from .config import config_from_dict, load_config

    if run_dir and os.path.isfile(os.path.join(run_dir, "config.yaml")):
        return load_config(os.path.join(run_dir, "config.yaml"))
    if os.path.isfile(os.path.join(src, "meta.json")):
        cfg = read_meta(src).get("config")
        if cfg:
            return config_from_dict(cfg)
    return None


def _clone(v):
    return v.detach().cpu().clone() if torch.is_tensor(v) else v


def from_index_keyed(optim_sd: dict, cfg) -> tuple[dict, dict]:
    """(state by parameter name, group hyperparameters) of a single-process optim.pt (torch's
    index-keyed state dict): the index -> name map is rebuilt from the config (param_groups'
    order) on the meta device, without allocating."""
    from .model import LoopedLM
    from .optim import param_groups

    with torch.device("meta"):
        model = LoopedLM(cfg.model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg.optim)
    if len(groups) != len(optim_sd["param_groups"]):
        raise _error("optim.pt does not match the run's config (a different number of optimiser groups)")
    state, hp = {}, {}
    for g, saved in zip(groups, optim_sd["param_groups"]):
        if len(g["params"]) != len(saved["params"]) or g["name"] != saved.get("name"):
            raise _error(f"optim.pt does not match the run's config (group {saved.get('name')!r})")
        hp[saved["name"]] = {k: v for k, v in saved.items() if k != "params"}
        for p, idx in zip(g["params"], saved["params"]):
            if idx in optim_sd["state"]:
                state[name_of[id(p)]] = {k: _clone(v) for k, v in optim_sd["state"][idx].items()}
    return state, hp


def old_optimizer_state(path: str, run_dir: Optional[str]) -> tuple[dict, dict]:
    """(state by parameter name, group hyperparameters) of an old-format checkpoint folder."""
    from .checkpoint import load_file
    from .errors import UserError

    if os.path.isfile(os.path.join(path, "optim_full.pt")):
        full = load_file(path, "optim_full.pt")
        if not isinstance(full, dict) or full.get("format") != FULL_FORMAT:
            raise _error(f"{path}/optim_full.pt is not a megaloop optimiser state (format "
                         f"{full.get('format') if isinstance(full, dict) else type(full).__name__!r}, expected "
                         f"{FULL_FORMAT!r})")
        return full["state"], full["groups"]
    native = None
    if os.path.isfile(os.path.join(path, "optim.pt")):
        native = load_file(path, "optim.pt")
    elif os.path.isfile(os.path.join(path, "optim_tp0_pp0.pt")):
        shard = load_file(path, "optim_tp0_pp0.pt")
        if shard.get("layout") == [1, 1]:  # data parallel only: the whole state, as optim.pt
            native = shard["optim"]
    if native is None:
        raise UserError(
            f"{path} has no whole optimiser state (optim_full.pt, or a single process's optim.pt); it holds "
            f"{sorted(os.listdir(path))}. Checkpoints written before resharding support keep per-layout optimiser "
            f"shards only: resume it once under the layout that wrote it with the megaloop that wrote it, then "
            f"convert the checkpoint that run saves")
    cfg = _config_of(path, run_dir)
    if cfg is None:
        raise UserError(f"{path} has a single-process optim.pt but no config (meta.json or the run's config.yaml) "
                        f"to name its parameters; convert the run directory instead")
    return from_index_keyed(native, cfg)


def write_checkpoint(src: str, out: str, run_dir: Optional[str]) -> None:
    """The old-format checkpoint folder `src` as a DCP checkpoint folder `out` (which exists, empty)."""
    from .checkpoint import load_file
    from .parallel.dcp_state import GROUP, MODEL, STATE, write_whole

    weights = load_file(src, "model.pt")
    state, groups = old_optimizer_state(src, run_dir)
    sd = {MODEL + n: t.contiguous() for n, t in weights.items()}
    for name, st in state.items():
        if name not in weights:
            raise _error(f"{src}: optimiser state for {name!r}, which model.pt does not have")
        sd.update({f"{STATE}{name}.{k}": _clone(v) for k, v in st.items()})
    for g, hp in groups.items():
        sd.update({f"{GROUP}{g}.{k}": v for k, v in hp.items() if k != "params"})
    write_whole(out, sd)
    for name in ("trainer.pt", "meta.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))


def resolve_checkpoint(src: str) -> tuple[str, Optional[str]]:
    """(checkpoint folder, run dir or None) from a run directory or a checkpoint folder."""
    from . import checkpoint as ckpt
    from .errors import UserError

    if not os.path.isdir(src):
        raise UserError(f"{src} is not a folder; pass a run directory or one of its checkpoints/step_* folders")
    if os.path.isdir(ckpt.ckpt_root(src)):
        latest = ckpt.latest_path(src)
        if latest is None:
            raise UserError(f"{src} has no complete checkpoint yet; train it first")
        return latest, src
    from .parallel.dcp_state import has_state
    if not (os.path.isfile(os.path.join(src, "model.pt")) or has_state(src)):
        raise UserError(f"{src} is neither a run directory nor a checkpoint folder (no model.pt)")
    parent = os.path.dirname(os.path.dirname(os.path.abspath(src)))
    return src, parent if os.path.isfile(os.path.join(parent, "config.yaml")) else None


def convert(src: str, out: str, force: bool = False) -> str:
    """Convert `src` (a run directory: its latest checkpoint; or a checkpoint folder) into `out`."""
    from . import checkpoint as ckpt
    from .config import save_config
    from .errors import UserError
    from .parallel.dcp_state import has_state

    ckpt.check_out_dir(out, [src], force)
    path, run_dir = resolve_checkpoint(src)
    ckpt.check_out_dir(out, [src] + ([run_dir] if run_dir else []), force)
    if has_state(path):
        raise UserError(f"{path} is already a DCP checkpoint, which every layout resumes from: nothing to convert")
    whole_run = os.path.abspath(src) == os.path.abspath(run_dir or "")
    with ckpt.atomic_output_dir(out, prefix=".convert_") as tmp:
        if not whole_run:
            write_checkpoint(path, tmp, run_dir)
        else:
            name = os.path.basename(path)
            os.makedirs(os.path.join(ckpt.ckpt_root(tmp), name))
            write_checkpoint(path, os.path.join(ckpt.ckpt_root(tmp), name), run_dir)
            ckpt.write_atomic(os.path.join(ckpt.ckpt_root(tmp), "latest"), name.encode())
            cfg = _config_of(path, run_dir)
            if cfg is None:
                raise UserError(f"{run_dir} has no config.yaml and {path} no meta.json to take the run's config from")
            cfg.train.run_dir = os.path.abspath(out)
            save_config(cfg, os.path.join(tmp, "config.yaml"))
            for extra in ("metrics.jsonl", "summary.json"):
                if os.path.isfile(os.path.join(run_dir, extra)):
                    shutil.copy(os.path.join(run_dir, extra), os.path.join(tmp, extra))
    return out
