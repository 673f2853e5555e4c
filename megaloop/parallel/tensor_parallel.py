"""Megatron-style tensor parallelism on plain tensors.

Each sharded weight is an ordinary `nn.Parameter` holding this rank's slice (so DeepSpeed ZeRO
and our optimiser see plain tensors) and carries three attributes:
  - `tp_split_dim`: the dimension it was cut along (0: output rows, 1: input columns), used to
    gather it back (Muon's Newton-Schulz) and to count it once in the grad norm;
  - `tp_group`: the process group of its shards;
  - `tp_full_size`: the whole tensor's size along that dimension, without the vocab padding, so
    a checkpoint places each shard in the single-process tensor (parallel/dcp_state.py).
The modules keep the plain model's parameter names (`weight`), so a state dict maps 1:1 to
shards and `apply_tensor_parallel` can slice a fully built model: every layout starts from the
same initial weights as the single-process run.

Attention's q, k, v and the MLP input are column-parallel (whole heads per rank); the attention
and MLP outputs are row-parallel (partial sums all-reduced). Activations between blocks stay
replicated, so norms, the injection adapter and hyperconnect lanes run unchanged and get
identical gradients on every TP rank (the backward all-reduce in `copy_to_tp_region` sums the
partial input gradients of the column-parallel layers). The model is dropout-free, so no RNG
state has to be coordinated.

The layers also take a weight on the meta device (shapes only): a parallel rank cuts its meta
model here and materialises only its shards (meta_init.py, through `shard_of`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import fp8
from .. import kernels as K
from ..kernels.dispatch import AUTO, KernelBackend


# ----------------------------------------------------------------------------- communication ops
def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce the gradient (each rank holds a partial input gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (sum of partial results); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    """Concatenate the ranks' slices along the last dim; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, -1)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(_size(ctx.group), -1)[_rank(ctx.group)].contiguous(), None


def copy_to_tp_region(x, group):
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x, group):
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp_region(x, group):
    return x if _size(group) == 1 else _GatherFromTP.apply(x, group)


# ----------------------------------------------------------------------------- layers
def _shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return full.detach().chunk(size, dim)[rank].clone().contiguous()


def _mark(p: nn.Parameter, dim: int, group, full: int) -> nn.Parameter:
    p.tp_split_dim = dim
    p.tp_group = group
    p.tp_full_size = full  # the whole tensor's size along dim, vocab padding excluded (checkpoints)
    return p


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T with W cut along its output rows; the input is replicated.
    float8: the torchao config of a linear converted for fp8 (megaloop/fp8.py), whose shard then
    multiplies in float8 too."""

    def __init__(self, full_weight: torch.Tensor, group, float8=None):
        super().__init__()
        self.group, self.float8 = group, float8
        self.weight = _mark(nn.Parameter(_shard(full_weight, 0, _rank(group), _size(group))), 0, group,
                            full_weight.size(0))
        self.in_features, self.out_features = full_weight.size(1), self.weight.size(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8.linear(copy_to_tp_region(x, self.group), self.weight, self.float8)


class RowParallelLinear(nn.Module):
    """y = sum_ranks x_local W_local^T with W cut along its input columns (float8: as above)."""

    def __init__(self, full_weight: torch.Tensor, group, float8=None):
        super().__init__()
        self.group, self.float8 = group, float8
        self.weight = _mark(nn.Parameter(_shard(full_weight, 1, _rank(group), _size(group))), 1, group,
                            full_weight.size(1))
        self.in_features, self.out_features = self.weight.size(1), full_weight.size(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp_region(fp8.linear(x, self.weight, self.float8), self.group)


def padded_vocab(vocab: int, tp: int) -> int:
    """The vocab rounded up so every TP rank holds the same number of rows."""
    return -(-vocab // tp) * tp


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    # Padding rows are zeros: their ids never occur as inputs and are masked out of the loss,
    # so they get zero gradients and zero AdamW updates and stay zero.
    return torch.cat([w.detach(), w.new_zeros(rows - w.size(0), w.size(1))]) if rows > w.size(0) else w.detach()


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of (padded) vocab rows; lookups of ids outside the
    block give zeros and the partial embeddings are all-reduced."""

    def __init__(self, full_weight: torch.Tensor, group):
        super().__init__()
        tp, rank = _size(group), _rank(group)
        self.group, self.vocab_size = group, full_weight.size(0)
        padded = _pad_rows(full_weight, padded_vocab(self.vocab_size, tp))
        self.weight = _mark(nn.Parameter(_shard(padded, 0, rank, tp)), 0, group, self.vocab_size)
        self.vocab_start = rank * self.weight.size(0)
        self.embedding_dim = full_weight.size(1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.weight.size(0))
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out, self.group)


def vocab_parallel_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 softcap: Optional[float], group, vocab_start: int, vocab_valid: int,
                                 ignore_index: int = -100, kernels: KernelBackend = AUTO) -> torch.Tensor:
    """h [N, d] replicated, weight [V/tp, d] local shard -> mean loss over non-ignored targets."""
    h = copy_to_tp_region(h, group)  # the fused, chunked kernel all-reduces its max and sums over the group
    return K.softcap_cross_entropy(h, weight, targets, softcap, ignore_index=ignore_index, tp_group=group,
                                   vocab_start=vocab_start, vocab_valid=vocab_valid, backend=kernels)


class VocabParallelHead(nn.Module):
    """The untied LM head with its (padded) vocab rows split across the TP group."""

    def __init__(self, full_weight: torch.Tensor, softcap: Optional[float], group,
                 kernels: KernelBackend = AUTO):
        super().__init__()
        tp, rank = _size(group), _rank(group)
        self.group, self.softcap, self.vocab_size = group, softcap, full_weight.size(0)
        self.kernels = kernels
        padded = _pad_rows(full_weight, padded_vocab(self.vocab_size, tp))
        self.weight = _mark(nn.Parameter(_shard(padded, 0, rank, tp)), 0, group, self.vocab_size)
        self.vocab_start = rank * self.weight.size(0)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        z = F.linear(copy_to_tp_region(h, self.group), self.weight).float()
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return gather_from_tp_region(z, self.group)[..., : self.vocab_size]

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(h.reshape(-1, h.size(-1)), self.weight, targets.reshape(-1),
                                            self.softcap, self.group, self.vocab_start, self.vocab_size,
                                            kernels=self.kernels)


# ----------------------------------------------------------------------------- model surgery
def apply_tensor_parallel(model: nn.Module, group) -> nn.Module:
    """Swap the linears, embedding and head of a built LoopedLM for TP shards of its weights
    (a linear converted for fp8 gives a shard that multiplies in float8)."""
    if _size(group) == 1:
        return model
    for block in model.blocks():
        a, m = block.attn, block.mlp
        a.wq, a.wk, a.wv = (ColumnParallelLinear(lin.weight, group, fp8.config_of(lin)) for lin in (a.wq, a.wk, a.wv))
        a.wo = RowParallelLinear(a.wo.weight, group, fp8.config_of(a.wo))
        m.fc = ColumnParallelLinear(m.fc.weight, group, fp8.config_of(m.fc))
        m.proj = RowParallelLinear(m.proj.weight, group, fp8.config_of(m.proj))
    model.embed = VocabParallelEmbedding(model.embed.weight, group)
    model.head = VocabParallelHead(model.head.weight, model.head.softcap, group, model.head.kernels)
    return model


def shard_of(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `full` for the shard `p` (pads vocab rows the way the layers do);
    `full` itself for a parameter that is not sharded."""
    dim, group = getattr(p, "tp_split_dim", None), getattr(p, "tp_group", None)
    if dim is None or _size(group) == 1:
        return full
    if dim == 0 and full.size(0) < p.size(0) * _size(group):  # vocab padding
        full = _pad_rows(full, p.size(0) * _size(group))
    return _shard(full, dim, _rank(group), _size(group))
