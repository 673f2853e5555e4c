"""What the distributed engines share for checkpoints: consolidated state dicts.

model.pt is always the plain LoopedLM state dict (whole tensors, vocab padding trimmed), gathered
to rank 0, so evaluation, export and resuming under another layout's model weights do not care
how the run was parallelised.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..param_names import VOCAB_PARAMS
from .state import ParallelState
from .tensor_parallel import full_tensor, shard_of


def consolidate_state_dict(model: torch.nn.Module, names: list[str], vocab: int,
                           st: ParallelState) -> Optional[dict]:
    """Whole tensors of `names` (this rank's share of the model) gathered to global rank 0.
    Collective over the world; returns the merged state dict on rank 0, None elsewhere."""
    lay = st.layout
    params = dict(model.named_parameters())
    mine = {}
    for n in names:  # same order on every TP rank of a stage: full_tensor all-gathers over TP
        t = full_tensor(params[n], vocab if n in VOCAB_PARAMS else None)
        if lay.tp_rank == 0 and lay.dp_rank == 0:
            mine[n] = t.cpu().clone()
    gathered = [None] * lay.world if lay.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if lay.rank != 0:
        return None
    merged = {}
    for part in gathered:
        merged.update(part)
    order = [n for n in model.state_dict().keys()]
    return {n: merged[n] for n in order if n in merged}


def load_consolidated(model: torch.nn.Module, names: list[str], full: dict, path: str) -> None:
    """Copy this rank's slices of a consolidated state dict into its (sharded) parameters."""
    from ..checkpoint import CheckpointError

    params = dict(model.named_parameters())
    missing = [n for n in params if n not in full]
    if missing:
        raise CheckpointError(f"checkpoint {path} does not fit this model (missing {missing[0]}); the config's "
                              f"model shape differs from the run that wrote it")
    with torch.no_grad():
        for n in names:
            p = params[n]
            src = shard_of(p, full[n])
            if src.shape != p.shape:
                raise CheckpointError(f"checkpoint {path}: {n} has shape {tuple(full[n].shape)}, which does not "
                                      f"fit this model; the config's model shape differs from the saved run")
            p.copy_(src.to(p.device, p.dtype))


def _full_like(t: torch.Tensor, p: torch.Tensor, vocab: Optional[int]) -> torch.Tensor:
    """The whole tensor behind `t`, a tensor sharded like the parameter `p` (collective over p's
    TP group when p is a shard), vocab padding trimmed for vocab-parallel parameters."""
    dim, group = getattr(p, "tp_split_dim", None), getattr(p, "tp_group", None)
    t = t.detach()
    if dim is None or group is None or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    full = torch.cat(parts, dim)
    return full[:vocab] if vocab is not None and dim == 0 else full


def consolidate_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: list[str],
                                vocab: int, st: ParallelState, layout: dict,
                                get_state=None) -> Optional[dict]:
    """The layout-independent optimiser state (megaloop.reshard's optim_full.pt format) gathered to
    global rank 0, like consolidate_state_dict gathers the weights: `names` is this rank's share
    (the same list on every TP rank of a stage), TP shards are concatenated along their split dim,
    replicas (DP, tied copies) contribute once. `get_state(name, param)` returns a parameter's state
    dict of tensors shaped like the (sharded) parameter, or scalars; default: optimizer.state.
    Collective over the world; returns the dict on rank 0, None elsewhere."""
    from ..reshard import FORMAT, group_hparams

    lay = st.layout
    params = dict(model.named_parameters())
    keep = lay.tp_rank == 0 and lay.dp_rank == 0
    mine = {}
    for n in names:
        p = params[n]
        state = get_state(n, p) if get_state is not None else optimizer.state.get(p, {})
        full = {}
        for k in sorted(state):  # the same keys in the same order on every TP rank of the stage
            v = state[k]
            if torch.is_tensor(v) and v.dim() > 0:  # shaped like the (sharded) parameter
                v = _full_like(v, p, vocab if n in VOCAB_PARAMS else None)
            if keep:
                full[k] = v.detach().cpu().clone() if torch.is_tensor(v) else v
        if keep and full:
            mine[n] = full
    part = (mine, group_hparams(optimizer) if keep else {})
    gathered = [None] * lay.world if lay.rank == 0 else None
    dist.gather_object(part, gathered, dst=0)
    if lay.rank != 0:
        return None
    state, groups = {}, {}
    for s, g in gathered:
        state.update(s)
        for name, hp in g.items():
            groups.setdefault(name, hp)
    order = [n for n, _ in model.named_parameters()]
    return dict(format=FORMAT, layout=layout, groups=groups, state={n: state[n] for n in order if n in state})
