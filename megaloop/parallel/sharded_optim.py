"""ZeRO-1/2 for matrix optimisers: MuonAdamW with its parameters partitioned, whole, across the
data-parallel ranks.

DeepSpeed's ZeRO hands an optimiser flat slices of many tensors. That is exact for elementwise
AdamW and wrong for Muon / MuonH, which orthogonalise whole matrices. Here the unit of
partitioning is the parameter instead:
  - `assign_owners` gives every parameter one owner among the DP ranks (largest state first, to
    the least-loaded rank; deterministic, so every rank computes the same map without
    communicating). Same-shaped matrices come one after another in that order and land
    round-robin, so each rank still orthogonalises its share of them as one batch.
  - ZeRO-1: gradients are all-reduced as at ZeRO-0. ZeRO-2 (`reduce_gradients`): each gradient
    is summed onto its owner only (a reduce, half the traffic of an all-reduce) and the other
    ranks drop their copy before the optimiser step.
  - `step` runs MuonAdamW's own per-kind `update` on the owned parameters (the same maths as one
    process), then every owner broadcasts its updated parameters to the other DP ranks.
  - Optimiser state (momentum, Adam moments, MuonH's norms) exists only on the owner.
Under tensor parallelism the owner is a DP index: all TP ranks of that replica own the matrix's
shards and gather it whole over their TP group for the orthogonalisation (optim._tp_whole). Under
pipeline parallelism each stage partitions its own parameters over its DP group.

Parameters stay replicated for the forward and backward (that would be ZeRO-3, which needs
gathering each layer's weights around its use; the torch engine does not do it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..optim import MuonAdamW
from .state import ParallelState

BUCKET_ELEMS = 25_000_000  # elements per reduce / broadcast: large enough to amortise latency


# fp32 tensors of optimiser state per parameter element, by MuonAdamW kind: Muon's and MuonH's
# momentum, Adam's two moments. The partition balances these bytes.
STATE_PER_ELEMENT = {"muon": 1, "muonh": 1, "adamw": 2}


def assign_owners(group_costs: list[list[int]], n_ranks: int) -> list[list[int]]:
    """The owning rank of every parameter, given each group's per-parameter costs (state bytes).

    All parameters together, largest first, each to the rank with the least cost so far (ties:
    the lowest rank): the longest-processing-time rule, so no rank ends more than one parameter's
    cost above another. Pure and deterministic: every rank computes the same map."""
    load = [0] * n_ranks
    owners = [[0] * len(c) for c in group_costs]
    items = [(g, i) for g, costs in enumerate(group_costs) for i in range(len(costs))]
    for g, i in sorted(items, key=lambda gi: (-group_costs[gi[0]][gi[1]], gi)):
        r = min(range(n_ranks), key=lambda r: (load[r], r))
        owners[g][i] = r
        load[r] += group_costs[g][i]
    return owners


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in an optimiser's state on this rank."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if torch.is_tensor(v))


def _buckets(tensors: list[torch.Tensor]):
    """Consecutive runs of same-dtype tensors of at most BUCKET_ELEMS elements (one tensor may exceed it)."""
    run: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if run and (size + t.numel() > BUCKET_ELEMS or t.dtype != run[0].dtype):
            yield run
            run, size = [], 0
        run.append(t)
        size += t.numel()
    if run:
        yield run


class ShardedMuonAdamW(MuonAdamW):
    """MuonAdamW whose parameters are partitioned, whole, across the data-parallel group.

    `names` maps each parameter (by id) to its plain LoopedLM name: the owner map and the state
    dict are keyed by name, so checkpoints do not depend on the parameter order. ZeRO-1 or 2 is
    the caller's choice: it all-reduces the gradients, or calls `reduce_gradients`."""

    def __init__(self, param_groups: list[dict], names: dict[int, str], st: ParallelState):
        super().__init__(param_groups)
        lay = st.layout
        self.group, self.ranks, self.dp_rank = st.dp_group, st.dp_ranks, lay.dp_rank
        costs = [[p.numel() * STATE_PER_ELEMENT[g["kind"]] for p in g["params"]] for g in self.param_groups]
        owners = assign_owners(costs, lay.dp)
        self._owner = {id(p): o for g, og in zip(self.param_groups, owners) for p, o in zip(g["params"], og)}
        self._name = {id(p): names[id(p)] for g in self.param_groups for p in g["params"]}
        # plain parameter name -> the DP rank that owns it (holds its state, computes its update)
        self.owners = {self._name[id(p)]: self._owner[id(p)] for g in self.param_groups for p in g["params"]}
        # each rank's parameters in one fixed order: the order of every reduce and broadcast
        self._by_owner: list[list[torch.Tensor]] = [[] for _ in range(lay.dp)]
        for g in self.param_groups:
            for p in g["params"]:
                self._by_owner[self._owner[id(p)]].append(p)

    # ------------------------------------------------------------------ the owner map
    def owned(self, params) -> list:
        """The parameters among `params` that this rank owns."""
        return [p for p in params if self._owner[id(p)] == self.dp_rank]

    def owned_names(self) -> list[str]:
        """Plain names of the parameters whose state this rank holds."""
        return [n for n, o in self.owners.items() if o == self.dp_rank]

    # ------------------------------------------------------------------ gradients and the step
    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """ZeRO-2: average each gradient onto its owner (sum-reduce, then / dp); the other ranks
        drop their copy. Every DP rank has the same set of gradients here (same model, same draw)."""
        dp = len(self.ranks)
        for owner, params in enumerate(self._by_owner):
            grads = [p.grad for p in params if p.grad is not None]
            for bucket in _buckets(grads):
                flat = _flatten_dense_tensors(bucket)
                dist.reduce(flat, dst=self.ranks[owner], group=self.group)
                if owner == self.dp_rank:
                    flat /= dp
                    for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                        dst.copy_(src)
            if owner != self.dp_rank:
                for p in params:
                    p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        """Update the owned parameters with MuonAdamW's own maths, then share them: each owner
        broadcasts its parameters to the DP group (bucketed), so every replica ends equal."""
        for group in self.param_groups:
            self.update(group, self.owned(group["params"]))
        for owner, params in enumerate(self._by_owner):
            for bucket in _buckets([p.data for p in params]):
                flat = _flatten_dense_tensors(bucket) if owner == self.dp_rank else \
                    torch.empty(sum(t.numel() for t in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
                dist.broadcast(flat, src=self.ranks[owner], group=self.group)
                if owner != self.dp_rank:
                    for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                        dst.copy_(src)
