"""Process groups for a TP x DP x PP layout, the way Megatron's parallel_state lays them out.

Global rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank: tensor-parallel ranks are adjacent
(they exchange activations every layer, so they should share a node and its fast links), data-
parallel replicas come next, and pipeline stages are outermost (one point-to-point transfer per
micro-batch crosses them, which tolerates the slow inter-node links).

Every rank must create every group, in the same order (torch.distributed.new_group is a
collective over the whole world), even the groups it is not a member of.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from ..config import ConfigError


@dataclass(frozen=True)
class Layout:
    """A validated TP x DP x PP factorisation of the world and this rank's coordinates in it."""

    world: int
    tp: int
    pp: int
    rank: int = 0

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    # Rank lists of every group of each kind (the same lists on every rank).
    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(t, d, p) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(t, d, p) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(t, d, p) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def mp_groups(self) -> list[list[int]]:
        """Model-parallel groups (TP x PP of one replica): what holds one whole copy of the model."""
        return [[self.rank_of(t, d, p) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]


def make_layout(world: int, tp: int, pp: int, rank: int = 0) -> Layout:
    """Check that tp x pp divides the world; raise a ConfigError that names the fix otherwise."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"parallel.tp and parallel.pp must be >= 1, got tp={tp} pp={pp}")
    if world % (tp * pp) != 0:
        fits = [n for n in range(1, world + 1) if world % n == 0]
        raise ConfigError(
            f"the layout parallel.tp={tp} x parallel.pp={pp} = {tp * pp} does not divide the world size "
            f"{world} (processes launched). Launch a multiple of {tp * pp} processes, or choose tp x pp "
            f"among the divisors of {world}: {fits}")
    return Layout(world, tp, pp, rank)


@dataclass
class ParallelState:
    layout: Layout
    tp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    mp_group: Optional[dist.ProcessGroup] = None
    pp_ranks: list[int] = field(default_factory=list)   # global ranks of this rank's pipeline
    dp_ranks: list[int] = field(default_factory=list)
    tp_ranks: list[int] = field(default_factory=list)


_STATE: Optional[ParallelState] = None


def initialize(layout: Layout) -> ParallelState:
    """Create all TP, DP, PP and model-parallel groups (collective: call on every rank)."""
    global _STATE
    st = ParallelState(layout)
    for kind in ("tp", "dp", "pp", "mp"):
        for ranks in getattr(layout, f"{kind}_groups")():
            group = dist.new_group(ranks)
            if layout.rank in ranks:
                setattr(st, f"{kind}_group", group)
                if kind != "mp":
                    setattr(st, f"{kind}_ranks", ranks)
    _STATE = st
    return st


def destroy() -> None:
    global _STATE
    _STATE = None


def get_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("megaloop.parallel.state.initialize() has not been called")
    return _STATE


def is_initialized() -> bool:
    return _STATE is not None


# Helpers every module uses; they answer for a single process too (size 1, rank 0, no group).
def get_tp_group() -> Optional[dist.ProcessGroup]:
    return _STATE.tp_group if _STATE else None


def get_tp_size() -> int:
    return _STATE.layout.tp if _STATE else 1


def get_tp_rank() -> int:
    return _STATE.layout.tp_rank if _STATE else 0


def get_dp_group() -> Optional[dist.ProcessGroup]:
    return _STATE.dp_group if _STATE else None


def get_dp_size() -> int:
    return _STATE.layout.dp if _STATE else 1


def get_dp_rank() -> int:
    return _STATE.layout.dp_rank if _STATE else 0


def get_pp_group() -> Optional[dist.ProcessGroup]:
    return _STATE.pp_group if _STATE else None


def get_pp_size() -> int:
    return _STATE.layout.pp if _STATE else 1


def get_pp_rank() -> int:
    return _STATE.layout.pp_rank if _STATE else 0


def is_pipeline_first() -> bool:
    return get_pp_rank() == 0


def is_pipeline_last() -> bool:
    return get_pp_rank() == get_pp_size() - 1


def pp_neighbour(offset: int) -> int:
    """Global rank of the stage `offset` away in this rank's pipeline (same tp and dp index)."""
    st = get_state()
    return st.pp_ranks[st.layout.pp_rank + offset]
