"""What the training loop may ask of an engine, written down once.

An engine owns the model replica of this process (sharded or not), its optimiser and whatever
parallelism the layout asks for. The loop, `megaloop eval` and the benchmarks use only what the
`Engine` protocol names; every engine (megaloop.parallel.torch_engine, .deepspeed_engine)
provides all of it, so no caller probes for attributes.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Optional, Protocol, runtime_checkable

import torch

from ..config import Config

Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens, targets) of one micro-batch


@dataclass
class StepStats:
    loss: float          # mean micro-batch loss of the step (over every data-parallel replica)
    grad_norm: float     # global gradient norm before clipping
    skipped: bool        # non-finite loss or gradient: no update was applied


@runtime_checkable
class Engine(Protocol):
    model: torch.nn.Module            # this rank's LoopedLM (TP shards, or one pipeline stage's weights)
    optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int                         # global rank (0 on one process)
    is_main: bool                     # the rank that writes the run directory's shared files
    dp_rank: int                      # this rank's data-parallel replica: which share of the batch it reads
    dp_size: int

    def train_step(self, batches: Iterable[Batch], lr_factor: float,
                   num_recur: Optional[int] = None) -> StepStats:
        """One optimizer step over this rank's micro-batches at num_recur recurrences (None: the
        model's). A non-finite loss or gradient skips the update on every rank."""

    def eval_loss(self, batches: Iterable[Batch], num_recur: Optional[int] = None) -> float:
        """Mean loss per target token over `batches` (the same list on every rank)."""

    def save_files(self, path: str, background: bool = False):
        """Write this rank's share of the checkpoint into the folder `path` (called on every rank;
        megaloop/parallel/dcp_state.py). background: return once the state is copied, with the
        pending save that finishes the writes (None when written in the foreground)."""

    def load_files(self, path: str) -> None:
        """Load the weights and optimiser state of the checkpoint folder `path`, whatever layout wrote it."""

    def barrier(self) -> None:
        ...

    def all_reduce_flag(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank."""

    def per_rank(self, value: float) -> list[float]:
        """`value` from every rank, in rank order (called on every rank: a collective)."""

    def abort(self, exc: BaseException) -> Optional[BaseException]:
        """This rank failed with `exc`: tell the other ranks without a collective. Returns the error
        to report instead (another rank's, when it failed first), or None to report `exc`."""

    def close(self) -> None:
        """The run finished on every rank: release the process groups."""


def autocast_for(cfg: Config, device: torch.device):
    """bf16 runs the forward and backward under autocast over fp32 master weights; so does fp8,
    around the float8 linears (megaloop/fp8.py), as the reference study runs it."""
    if cfg.parallel.precision in ("bf16", "fp8"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
