"""TP x PP x DP training on plain torch.distributed: Muon, MuonH or AdamW, ZeRO stage 0, 1 or 2;
also the single process, which is this engine at world size 1 (no process group, every collective
skipped). The model arrives cut by parallelize.py, with its optimizer (make_optimizer).

- TP: the model's linears, embedding and head are shards (tensor_parallel.py).
- PP: this rank runs one stage (pipeline.py) under torch.distributed.pipelining's 1F1B schedule
  over the step's micro-batches; the parameters of other stages are not on this rank.
- DP: gradients are averaged over the data-parallel group in flat buckets after backward. At
  ZeRO 1 / 2 the optimiser is ShardedMuonAdamW (sharded_optim.py): whole parameters partitioned
  over the DP ranks, state on the owner only, ZeRO-2 reducing each gradient to its owner.
Then one global gradient norm (each parameter counted once: TP shards summed, replicated and
tied copies counted once; squares added up in float64, see `sum_of_squares`), clipping exactly
like torch.nn.utils.clip_grad_norm_, and the optimizer step, all in EngineBase's shared step, so
every layout reproduces the single process.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.utils import clip_grads_with_norm_

from ..config import Config
from ..optim import MuonAdamW
from .base import EngineBase
from .engine_api import Batch, autocast_for
from .parallelize import ParallelModel, zero_stage_of
from .pipeline import StageModule, eval_units, recv_tuple, run_units, send_tuple
from .state import ParallelState

BUCKET_ELEMS = 25_000_000  # gradient all-reduce bucket (elements): large enough to amortise latency


NORM_ROW = 128  # gradient entries per float32 partial sum of squares (sum_of_squares)


def sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the squared entries of `grads`: the float32 norms of rows of NORM_ROW entries,
    squared and added up in float64 (a 0-d float64 tensor).

    Not torch.nn.utils.get_total_norm: torch's float32 L2 norm on a CPU sums each SIMD lane into
    one float32 accumulator, without the cascade summation `sum` uses (pytorch/pytorch#169237),
    so its error grows with the tensor's size: -1.3e-3 relative on the 8.4 M-element head gradient
    of the s = 4 model, -6e-3 on 25 M elements. A TP shard, half the size, errs by less, and the
    grad norm differed between layouts by up to 6e-4 (benchmarks/scale.py). Short rows keep each
    float32 sum exact to ~1e-7 whatever the tensor's size (4e-8 measured on 25 M entries), and
    the same arithmetic in every layout. Not `dtype=torch.float64`: that casts a whole float64
    copy of each gradient (twice its bytes, at the step's memory peak); the partial sums are
    1 / NORM_ROW of it."""
    partial = []
    for g in grads:
        flat = g.detach().reshape(-1)
        whole_rows = flat.numel() // NORM_ROW * NORM_ROW
        if whole_rows:
            partial.append(torch.linalg.vector_norm(flat[:whole_rows].view(-1, NORM_ROW), dim=1, dtype=torch.float32))
        if whole_rows < flat.numel():
            partial.append(torch.linalg.vector_norm(flat[whole_rows:], dtype=torch.float32).reshape(1))
    if not partial:
        return torch.zeros((), dtype=torch.float64)
    return torch.cat(partial).double().square().sum()


class TorchEngine(EngineBase):
    """The step, evaluation and collectives over a model parallelize() cut for this rank."""

    def __init__(self, cfg: Config, pm: ParallelModel, optimizer: MuonAdamW, device: torch.device,
                 st: ParallelState):
        super().__init__(cfg, device, st)
        lay = st.layout
        self.model, self.plan = pm.module, pm.plan
        self.owned_names, self.params = pm.owned_names, pm.params
        self.tied, self.tie_group, self.tie_leader = pm.tied, pm.tie_group, pm.tie_leader
        self.optimizer = optimizer
        self.zero_stage = zero_stage_of(cfg, st)
        # The parameters whose gradients enter the global norm: each counted once over the layout.
        self.counted_names = pm.counted_names()  # tied copies once
        self.counted = [p for n, p in pm.named_params() if n in self.counted_names
                        and (getattr(p, "tp_split_dim", None) is not None or lay.tp_rank == 0)]  # TP replicas once
        self._schedules: dict[int, object] = {}
        self._recur = cfg.model.num_recur  # this step's recurrence count (read by the pipeline stage)
        self._pipe_stage = None

    # ------------------------------------------------------------------ pipeline plumbing
    def _schedule(self, n_micro: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if n_micro not in self._schedules:
            lay = self.st.layout
            if self._pipe_stage is None:
                mod = StageModule(self.model, self.plan, lambda: autocast_for(self.cfg, self.device),
                                  lambda: self._recur)
                self._pipe_stage = PipelineStage(mod, lay.pp_rank, lay.pp, self.device, group=self.st.pp_group)

            def loss_fn(h, y):
                with autocast_for(self.cfg, self.device):
                    return self.model.head.loss(h, y)
            # 1F1B needs at least as many micro-batches as stages to fill the pipe; with fewer,
            # GPipe is the same schedule with all forwards first.
            cls = Schedule1F1B if n_micro >= lay.pp else ScheduleGPipe
            self._schedules[n_micro] = cls(self._pipe_stage, n_micro, loss_fn=loss_fn)
        return self._schedules[n_micro]

    # ------------------------------------------------------------------ the step's hooks
    def _accumulate(self, batches: list[Batch], r: int) -> torch.Tensor:
        if self.plan is None:
            return super()._accumulate(batches, r)
        # A pipeline stage: the schedule runs every micro-batch's forward and backward (1F1B).
        self._recur = r
        n = len(batches)
        x = torch.cat([b[0] for b in batches]).to(self.device)
        y = torch.cat([b[1] for b in batches]).to(self.device)
        sched, losses = self._schedule(n), []
        if self.plan.first:
            sched.step(x)
        elif self.plan.last:
            sched.step(target=y, losses=losses)
        else:
            sched.step()
        loss_t = (torch.stack([l.detach().float() for l in losses]).sum() / n if losses
                  else torch.zeros((), device=self.device))
        dist.all_reduce(loss_t, group=self.st.pp_group)  # only the last stage has it
        return loss_t

    def _sync_grads(self) -> None:
        # Tied copies of the recurrent group: sum the stages' contributions.
        if self.tie_group is not None:
            tied = [p for n, p in self.model.named_parameters() if n in self.tied]
            for p in tied:
                if p.grad is None:  # e.g. a stage whose passes all ran detached (bptt_k)
                    p.grad = torch.zeros_like(p)
            self._all_reduce_flat([p.grad for p in tied], self.tie_group, 1)
        if self.zero_stage == 2:  # each gradient to its owner only
            self.optimizer.reduce_gradients()
        elif self.dp_size > 1:
            self._all_reduce_flat([p.grad for p in self.params if p.grad is not None], self.st.dp_group,
                                  self.dp_size)

    @staticmethod
    def _all_reduce_flat(grads: list[torch.Tensor], group, divide: int) -> None:
        bucket: list[torch.Tensor] = []
        size = 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel()
            if bucket and (g is None or size >= BUCKET_ELEMS):
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat, group=group)
                if divide > 1:
                    flat /= divide
                for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    dst.copy_(src)
                bucket, size = [], 0

    def _clip_grads(self) -> float:
        """The global grad norm over the whole model replica (sums of squares in float64: this
        rank's share, summed over TP x PP and, under ZeRO-2, DP), then clip_grad_norm_'s scaling
        by the float32 norm."""
        sq = sum_of_squares([p.grad for p in self.counted if p.grad is not None]).to(self.device)
        lay = self.st.layout
        if lay.tp * lay.pp > 1:  # this rank's share: sum the squares over TP x PP
            dist.all_reduce(sq, group=self.st.mp_group)
        if self.zero_stage == 2:  # each rank holds its owned gradients only
            dist.all_reduce(sq, group=self.st.dp_group)
        norm = sq.sqrt().float()
        clip_grads_with_norm_(self.params, self.cfg.optim.grad_clip or float("inf"), norm)
        return float(norm)

    # ------------------------------------------------------------------ evaluation hooks
    def _eval_loss_of(self, x: torch.Tensor, y: torch.Tensor, r: int) -> Optional[torch.Tensor]:
        if self.plan is None:
            return self.model(x, y, num_recur=r)
        return self._relay_forward(x, y, r)

    def _eval_reduce(self, tot: torch.Tensor, replicas: int) -> None:
        if self.plan is not None:
            dist.all_reduce(tot, group=self.st.pp_group)
        super()._eval_reduce(tot, replicas)

    def _relay_forward(self, x: torch.Tensor, y: torch.Tensor, r: int) -> Optional[torch.Tensor]:
        plan = self.plan
        carry = (x,) if plan.first else recv_tuple(self.st.pp_neighbour(-1), self.device)
        out = run_units(self.model, eval_units(plan, self.cfg.model, r), carry, plan.first, plan.last, r)
        if not plan.last:
            send_tuple(out, self.st.pp_neighbour(1), self.device)
            return None
        return self.model.head.loss(out[0], y)

    # ------------------------------------------------------------------ checkpoints
    def save_files(self, path: str, background: bool = False):
        """This rank's pieces (parallel/dcp_state.py): its stage's parameters, a tied copy of the
        recurrent group from its first stage only."""
        from .dcp_state import save, state_dict

        named = [(n, p) for n, p in self.model.named_parameters() if n in self.counted_names]
        return save(path, state_dict(named, self.optimizer), background)

    def load_files(self, path: str) -> None:
        from .dcp_state import load

        params = dict(self.model.named_parameters())
        # sharded over DP (ZeRO 1 / 2), a rank asks only for the state of the parameters it owns
        owns = (lambda name: self.optimizer.owners[name] == self.st.layout.dp_rank) if self.zero_stage else None
        load(path, [(n, params[n]) for n in self.owned_names], self.optimizer, known=params, owns_state=owns)
