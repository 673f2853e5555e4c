"""The one training step and the one evaluation, shared by every engine.

A step is: micro-batching (forward and backward of each micro-batch, gradients accumulated),
gradient synchronisation, the global gradient norm and clipping, the finite check, and the
optimizer step. `EngineBase.train_step` writes that sequence once; an engine changes only the
pieces its parallelism changes, through small hooks:
  - `_forward` / `_train_mode`: what runs the model (DeepSpeed's wrapper under ZeRO);
  - `_accumulate`: the micro-batch loop (a pipeline stage runs its 1F1B schedule instead);
  - `_backward`: DeepSpeed scales, accumulates and steps inside its own backward/step;
  - `_sync_grads` / `_clip_grads`: the torch engine's all-reduces and global norm;
  - `_update`: DeepSpeed's ZeRO optimiser reduces, clips and steps itself, so it reports.
Collectives are skipped on a single process, which is the torch engine at world size 1.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from ..config import Config, recurrences
from ..model import IGNORE_INDEX
from ..optim import set_lr
from .engine_api import Batch, StepStats, autocast_for
from .state import ParallelState


def finite_step(loss: float, grad_norm: float) -> bool:
    """The finite check: an update is applied only when the loss and the gradient norm are finite."""
    return math.isfinite(loss) and math.isfinite(grad_norm)


class EngineBase:
    """Rank bookkeeping, collectives, and the shared train_step / eval_loss (see the module doc)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    failfast = None  # the fail-fast watchdog, set by build_engine when distributed

    def __init__(self, cfg: Config, device: torch.device, st: ParallelState):
        self.cfg, self.device, self.st = cfg, device, st
        lay = st.layout
        self.world, self.rank = lay.world, lay.rank
        self.is_main = lay.rank == 0
        self.dp_rank, self.dp_size = lay.dp_rank, lay.dp

    # ------------------------------------------------------------------ the step
    def train_step(self, batches: Iterable[Batch], lr_factor: float,
                   num_recur: Optional[int] = None) -> StepStats:
        """One optimizer step over this rank's micro-batches at num_recur recurrences (None: the
        model's; every rank is handed the same draw). A non-finite loss or gradient on any rank
        skips the update on every rank, because the loss and the grad norm are global."""
        set_lr(self.optimizer, lr_factor)
        r = recurrences(num_recur, self.cfg.model.num_recur)
        loss_t = self._accumulate(list(batches), r)
        if self.dp_size > 1:
            dist.all_reduce(loss_t, group=self.st.dp_group)
            loss_t /= self.dp_size
        loss = float(loss_t)
        grad_norm, skipped = self._update(loss)
        return StepStats(loss, grad_norm, skipped)

    def _accumulate(self, batches: list[Batch], r: int) -> torch.Tensor:
        """Micro-batching: forward and backward of each micro-batch, gradients accumulated.
        Returns this replica's mean micro-batch loss."""
        n = len(batches)
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            with autocast_for(self.cfg, self.device):
                loss = self._forward(x.to(self.device), y.to(self.device), r)
            self._backward(loss, n)
            total += loss.detach().float()
        return total / n

    def _forward(self, x: torch.Tensor, y: torch.Tensor, r: int) -> torch.Tensor:
        return self.model(x, y, num_recur=r)

    def _backward(self, loss: torch.Tensor, n_micro: int) -> None:
        (loss / n_micro).backward()

    def _update(self, loss: float) -> tuple[float, bool]:
        """Gradient synchronisation, clipping, the finite check and the optimizer step.
        Returns (grad norm before clipping, skipped)."""
        self._sync_grads()
        grad_norm = self._clip_grads()
        skipped = not finite_step(loss, grad_norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    def _sync_grads(self) -> None:
        """Make every rank's gradients the layout's whole-batch gradients (nothing on one process)."""

    def _clip_grads(self) -> float:
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluation
    def _eval_replicas(self) -> int:
        """How many data-parallel replicas share the evaluation batches (round-robin)."""
        return self.dp_size

    def _eval_loss_of(self, x: torch.Tensor, y: torch.Tensor, r: int) -> Optional[torch.Tensor]:
        """The mean loss of one batch, or None on a rank that does not compute it (a pipeline
        stage before the last)."""
        return self._forward(x, y, r)

    def _eval_reduce(self, tot: torch.Tensor, replicas: int) -> None:
        if replicas > 1:
            dist.all_reduce(tot, group=self.st.dp_group)

    def _train_mode(self, on: bool) -> None:
        self.model.train(on)

    @torch.no_grad()
    def eval_loss(self, batches: Iterable[Batch], num_recur: Optional[int] = None) -> float:
        """Mean loss per target token; the batches are dealt round-robin over the DP replicas."""
        r = recurrences(num_recur, self.cfg.model.num_recur)
        replicas = self._eval_replicas()
        mine = self.dp_rank if replicas > 1 else 0
        self._train_mode(False)
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        for k, (x, y) in enumerate(batches):
            if k % replicas != mine:
                continue
            with autocast_for(self.cfg, self.device):
                loss = self._eval_loss_of(x.to(self.device), y.to(self.device), r)
            if loss is not None:  # the loss is a mean over the targets that count: weigh it by them
                n = int((y != IGNORE_INDEX).sum())
                tot += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=self.device)
        self._train_mode(True)
        self._eval_reduce(tot, replicas)
        return float(tot[0] / tot[1].clamp(min=1))

    # ------------------------------------------------------------------ ranks
    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce_flag(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def per_rank(self, value: float) -> list[float]:
        """`value` from every rank, in rank order (a collective; one process: [value])."""
        if self.world == 1:
            return [value]
        t = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        t[self.rank] = value
        dist.all_reduce(t)
        return t.tolist()

    def abort(self, exc: BaseException) -> Optional[BaseException]:
        """This rank failed: tell the others (no collective) and return the error to report
        (another rank's, when it failed first), or None to report `exc` itself."""
        return self.failfast.fail(exc) if self.failfast is not None else None

    def close(self) -> None:
        # Destroying the group at exit avoids occasional aborts at shutdown (see REFERENCES).
        if self.failfast is not None:  # before the last barrier: a rank that finished may now exit
            self.failfast.stop()
        if self.world > 1 and dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
