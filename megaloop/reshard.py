"""Layout-independent optimiser state, so a checkpoint resumes under another parallel layout.

Every engine writes, next to its own exact per-layout optimiser files, `optim_full.pt`:

    {"format": "megaloop-optim-v1",
     "layout": {"engine", "tp", "pp", "dp", "zero_stage"},      # who wrote it (informational)
     "groups": {group name: hyperparameters (lr, initial_lr, betas, eps, momentum, kind, ...)},
     "state":  {plain LoopedLM parameter name: {"momentum_buffer" | "step" | "exp_avg" |
                                                "exp_avg_sq": whole tensor or scalar}}}

Tensors are the *whole* unsharded state of the plain single-process parameter (TP shards
concatenated along their split dim, vocab padding stripped, every pipeline stage's parameters,
one copy of tied and replicated ones), the same way model.pt holds the whole weights. Any engine
loads it by slicing each tensor like the parameter it belongs to (`shard_of`), so TP / PP / DP
may all change between save and resume. AdamW's step counter and Muon's momentum survive
exactly; the learning rate is recomputed from the training step.

`megaloop checkpoint convert SRC --out DIR` writes a layout-independent checkpoint folder
(model.pt, optim_full.pt, trainer.pt, meta.json) from any checkpoint (`convert`).
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Iterable, Optional

import torch

FORMAT = "megaloop-optim-v1"
FULL_OPTIM = "optim_full.pt"
LOCAL_OPTIM = "optim.pt"


def _error(msg: str):
    from .checkpoint import CheckpointError
    return CheckpointError(msg)


def group_hparams(optimizer: torch.optim.Optimizer) -> dict:
    """Hyperparameters of each named param group (everything but the params)."""
    return {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups}


def _clone(v):
    return v.detach().cpu().clone() if torch.is_tensor(v) else v


def local_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: dict) -> dict:
    """optim_full.pt of a single-process model (plain, unsharded parameters)."""
    state = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if st:
            state[name] = {k: _clone(v) for k, v in st.items()}
    return dict(format=FORMAT, layout=layout, groups=group_hparams(optimizer), state=state)


def check_full(full, path: str) -> dict:
    if not isinstance(full, dict) or full.get("format") != FORMAT:
        raise _error(f"{path}/{FULL_OPTIM} is not a megaloop layout-independent optimiser state "
                     f"(format {full.get('format') if isinstance(full, dict) else type(full).__name__!r}, "
                     f"expected {FORMAT!r}); re-create it with `megaloop checkpoint convert`")
    return full


def apply_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: Iterable[str],
                     full: dict, path: str,
                     slicer: Optional[Callable[[torch.nn.Parameter, torch.Tensor], torch.Tensor]] = None) -> None:
    """Load a layout-independent optimiser state into `optimizer` for the parameters `names`
    (this rank's parameters, plain names), slicing whole tensors like each (possibly sharded)
    parameter. Group hyperparameters come from the checkpoint, as torch's load_state_dict does."""
    from .parallel.tensor_parallel import shard_of

    slicer = slicer or shard_of
    check_full(full, path)
    saved_groups = full["groups"]
    for g in optimizer.param_groups:
        saved = saved_groups.get(g.get("name"))
        if saved is None:
            raise _error(f"{path}/{FULL_OPTIM} has no optimiser group {g.get('name')!r} (it has "
                         f"{sorted(saved_groups)}): it was written with another optim.name or model; resume "
                         f"with the run's own config")
        if saved.get("kind") != g.get("kind"):
            raise _error(f"{path}/{FULL_OPTIM}: group {g['name']!r} is {saved.get('kind')} there and "
                         f"{g.get('kind')} now (optim.name changed); resume with the run's own config")
        for k, v in saved.items():
            g[k] = tuple(v) if isinstance(v, list) and k == "betas" else v
    params = dict(model.named_parameters())
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    unknown = [n for n in full["state"] if n not in params]
    if unknown:
        raise _error(f"{path}/{FULL_OPTIM} holds state for {unknown[0]!r}, which this model does not have; "
                     f"the config's model shape differs from the run that wrote it")
    for n in names:
        p = params[n]
        if id(p) not in in_opt:
            continue
        saved = full["state"].get(n)
        if not saved:
            optimizer.state.pop(p, None)
            continue
        st = {}
        for k, v in saved.items():
            if torch.is_tensor(v) and v.dim() > 0:
                t = slicer(p, v)
                if t.shape != p.shape:
                    raise _error(f"{path}/{FULL_OPTIM}: state {k!r} of {n} has shape {tuple(v.shape)}, which "
                                 f"does not fit this model; the config's model shape differs from the saved run")
                st[k] = t.to(device=p.device, dtype=v.dtype).clone().contiguous()
            else:
                st[k] = _clone(v)
        optimizer.state[p] = st


# ---------------------------------------------------------------------------- offline conversion
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


def full_from_local(optim_sd: dict, cfg) -> dict:
    """optim_full.pt from a single-process optim.pt (torch's index-keyed state dict): the
    index -> name map is rebuilt from the config (param_groups' order), without allocating."""
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
    layout = dict(engine="local", tp=1, pp=1, dp=1, zero_stage=0)
    return dict(format=FORMAT, layout=layout, groups=hp, state=state)


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
    if not os.path.isfile(os.path.join(src, "model.pt")):
        raise UserError(f"{src} is neither a run directory nor a checkpoint folder (no model.pt)")
    parent = os.path.dirname(os.path.dirname(os.path.abspath(src)))
    return src, parent if os.path.isfile(os.path.join(parent, "config.yaml")) else None


def convert(src: str, out: str, force: bool = False) -> str:
    """Write a layout-independent checkpoint folder: model.pt, optim_full.pt, and trainer.pt /
    meta.json when the source has them. Resumable under any layout (copy it into a run's
    checkpoints/ and point `latest` at it, or pass it to the test harness's --resume)."""
    from .checkpoint import atomic_output_dir, check_out_dir, load_file, torch_save_synced
    from .errors import UserError

    check_out_dir(out, [src], force)
    path, run_dir = resolve_checkpoint(src)
    check_out_dir(out, [src] + ([run_dir] if run_dir else []), force)
    if os.path.isfile(os.path.join(path, FULL_OPTIM)):
        full = None  # copied as is
    elif os.path.isfile(os.path.join(path, LOCAL_OPTIM)):
        cfg = _config_of(path, run_dir)
        if cfg is None:
            raise UserError(f"{path} has a single-process optim.pt but no config (meta.json or the run's "
                            f"config.yaml) to name its parameters; convert the run directory instead")
        full = full_from_local(load_file(path, LOCAL_OPTIM), cfg)
    else:
        have = sorted(os.listdir(path))
        raise UserError(
            f"{path} has no layout-independent optimiser state ({FULL_OPTIM}); it holds {have}. Checkpoints "
            f"written before resharding support keep per-layout optimiser shards only: resume it once under "
            f"the layout that wrote it and save again (every save now writes {FULL_OPTIM})")
    with atomic_output_dir(out, prefix=".convert_") as tmp:
        for name in ("model.pt", "trainer.pt", "meta.json", FULL_OPTIM):
            if name == FULL_OPTIM and full is not None:
                torch_save_synced(full, os.path.join(tmp, name))
            elif os.path.isfile(os.path.join(path, name)):
                shutil.copy(os.path.join(path, name), os.path.join(tmp, name))
        check_full(torch.load(os.path.join(tmp, FULL_OPTIM), map_location="cpu", weights_only=False), path)
    return out
