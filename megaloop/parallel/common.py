"""What the distributed engines share: rank bookkeeping, barriers, failure reporting.

(Checkpoints: megaloop/parallel/dcp_state.py, one format for every layout.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import Config
from .state import ParallelState


class DistributedEngineBase:
    def __init__(self, cfg: Config, st: ParallelState):
        self.cfg, self.st = cfg, st
        lay = st.layout
        self.rank = lay.rank
        self.is_main = lay.rank == 0
        self.dp_rank, self.dp_size = lay.dp_rank, lay.dp

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_flag(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank."""
        t = torch.tensor([1.0 if flag else 0.0], device=getattr(self, "device", torch.device("cpu")))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    failfast = None  # set by build_distributed_engine

    def abort(self, exc: BaseException):
        """This rank failed: tell the others (no collective) and return the error to report
        (another rank's, when it failed first), or None to report `exc` itself."""
        return self.failfast.fail(exc) if self.failfast is not None else None

    def close(self) -> None:
        # Destroying the group at exit avoids occasional aborts at shutdown (see REFERENCES).
        from . import state
        if self.failfast is not None:  # before the last barrier: a rank that finished may now exit
            self.failfast.stop()
        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
        state.destroy()
