"""Parallelism applied to a built model from outside, and the one optimizer of every engine.

`parallelize(model, st, cfg, device)` makes a LoopedLM this rank's part of the layout, in order:
  1. tensor parallelism swaps the linears, embedding and head for shards (tensor_parallel.py);
  2. pipeline parallelism keeps this rank's stage (pipeline.py) and frees every other stage's
     parameters;
  3. the stages that hold a copy of the recurrent group get a tie group (their gradients are
     summed after each backward);
  4. a model built on the meta device is materialised: this rank's shards only, with the single
     process's values (meta_init.py);
  5. blocks are compiled when asked.
`make_optimizer` builds the optimizer over the parameters the rank holds, for both engines. The
engines (torch_engine.py, deepspeed_engine.py) take the result and keep the step, evaluation and
the collectives. A transform of the model (one that swaps its linears, say) goes between the
build and `parallelize`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Config
from ..optim import MuonAdamW, param_groups
from ..param_names import RECURRENT_GROUP
from .meta_init import MetaRecipe, is_meta, materialise
from .pipeline import StagePlan, owned_prefixes, plan_stages
from .sharded_optim import ShardedMuonAdamW
from .state import ParallelState
from .tensor_parallel import apply_tensor_parallel


@dataclass
class ParallelModel:
    """A model cut to this rank's part of the layout, and what the engines need of the cut."""

    module: nn.Module
    owned_names: list[str]               # the parameters this rank holds (its stage's), in model order
    plan: Optional[StagePlan] = None     # this rank's pipeline stage; None: the whole model
    tied: frozenset = frozenset()        # names of the recurrent group's tied copies (pp > 1)
    tie_group: Optional[dist.ProcessGroup] = None
    tie_leader: bool = True              # this rank's copy is the one counted (norm, checkpoint)

    @property
    def params(self) -> list[nn.Parameter]:
        owned = set(self.owned_names)
        return [p for n, p in self.module.named_parameters() if n in owned]

    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        return list(zip(self.owned_names, self.params))

    def counted_names(self) -> set[str]:
        """The parameters whose single copy this rank represents: a tied copy only on its leader."""
        return {n for n in self.owned_names if n not in self.tied or self.tie_leader}


def compile_blocks(model: nn.Module) -> None:
    """Compile each block's forward on its own: a different num_recur at evaluation does not
    recompile anything, and state-dict keys stay unchanged (no _orig_mod prefix)."""
    for block in model.blocks():
        block.forward = torch.compile(block.forward, dynamic=False)


def parallelize(model: nn.Module, st: ParallelState, cfg: Config, device: torch.device,
                compile: bool = False, partition: Optional[Callable[[nn.Parameter], None]] = None) -> ParallelModel:
    """This rank's part of `model` under st's layout (see the module doc). A model on the meta
    device comes out materialised with the values train.build_model's seed gives; `partition`
    (ZeRO-3's) takes each parameter as soon as it is materialised."""
    recipe = MetaRecipe.of(model) if is_meta(model) else None  # the full shapes, before TP cuts them
    apply_tensor_parallel(model, st.tp_group)
    pm = _carve_stage(model, st, cfg)
    if recipe is not None:
        materialise(model, recipe, cfg.train.seed, device, partition)
    pm.module = model.to(device)
    if compile:
        compile_blocks(model)
    return pm


def _carve_stage(model: nn.Module, st: ParallelState, cfg: Config) -> ParallelModel:
    """This rank's pipeline stage: its parameters kept, every other stage's emptied (before they
    are ever materialised, for a meta model), and the tie group of the recurrent group's copies."""
    lay = st.layout
    if lay.pp == 1:
        return ParallelModel(model, [n for n, _ in model.named_parameters()])
    plans = plan_stages(cfg.model, lay.pp)
    owned = owned_prefixes(plans[lay.pp_rank])
    tie_group, leader = _tie_group(st, plans[0].recur_stages)
    tied = frozenset(n for n, _ in model.named_parameters() if tie_group and n.startswith(RECURRENT_GROUP))
    names = [n for n, _ in model.named_parameters() if n.startswith(owned)]
    for n, p in model.named_parameters():
        if not n.startswith(owned):
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            p.requires_grad_(False)
    return ParallelModel(model, names, plans[lay.pp_rank], tied, tie_group, leader)


def _tie_group(st: ParallelState, recur_stages: list[int]) -> tuple[Optional[dist.ProcessGroup], bool]:
    """The group over the stages that hold a copy of the recurrent group, one per (tp, dp)
    index, created on every rank in the same order (new_group is collective); and whether this
    rank's copy leads (is counted once)."""
    lay = st.layout
    if len(recur_stages) < 2:
        return None, True
    mine = None
    for d in range(lay.dp):
        for t in range(lay.tp):
            ranks = [lay.rank_of(t, d, s) for s in recur_stages]
            g = dist.new_group(ranks)
            if lay.rank in ranks:
                mine = g
    return mine, lay.pp_rank == recur_stages[0]


def zero_stage_of(cfg: Config, st: ParallelState) -> int:
    """The ZeRO stage that applies: one replica has nothing to shard."""
    return cfg.parallel.zero_stage if st.layout.dp > 1 else 0


def make_optimizer(pm: ParallelModel, cfg: Config, st: ParallelState, shard: bool) -> MuonAdamW:
    """The optimizer of every engine: the reference study's parameter groups (optim.param_groups)
    over the parameters this rank holds. shard: the torch engine's ZeRO 1 / 2, whole parameters
    partitioned over the DP ranks (sharded_optim.py); DeepSpeed gets the plain optimizer and
    partitions it itself."""
    keep = {id(p) for p in pm.params}
    groups = [dict(g, params=[p for p in g["params"] if id(p) in keep]) for g in param_groups(pm.module, cfg.optim)]
    groups = [g for g in groups if g["params"]]
    if shard:
        return ShardedMuonAdamW(groups, {id(p): n for n, p in pm.module.named_parameters()}, st)
    return MuonAdamW(groups)
