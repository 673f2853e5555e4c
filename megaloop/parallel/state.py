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
    """This rank's layout and its process groups (None where the layout has no such group)."""

    layout: Layout
    tp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    mp_group: Optional[dist.ProcessGroup] = None
    pp_ranks: list[int] = field(default_factory=list)   # global ranks of this rank's pipeline
    dp_ranks: list[int] = field(default_factory=list)
    tp_ranks: list[int] = field(default_factory=list)

    def pp_neighbour(self, offset: int) -> int:
        """Global rank of the stage `offset` away in this rank's pipeline (same tp and dp index)."""
        return self.pp_ranks[self.layout.pp_rank + offset]


def initialize(layout: Layout) -> ParallelState:
    """Create all TP, DP, PP and model-parallel groups (collective: call on every rank). The
    returned state is the one record of this rank's groups: it is passed to whatever needs them."""
    st = ParallelState(layout)
    for kind in ("tp", "dp", "pp", "mp"):
        for ranks in getattr(layout, f"{kind}_groups")():
            group = dist.new_group(ranks)
            if layout.rank in ranks:
                setattr(st, f"{kind}_group", group)
                if kind != "mp":
                    setattr(st, f"{kind}_ranks", ranks)
    return st
