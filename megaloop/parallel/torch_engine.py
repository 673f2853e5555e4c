"""TP x PP x DP training on plain torch.distributed: Muon, MuonH or AdamW, ZeRO stage 0, 1 or 2.

- TP: the model's linears, embedding and head are swapped for shards (tensor_parallel.py).
- PP: this rank runs one stage (pipeline.py) under torch.distributed.pipelining's 1F1B schedule
  over the step's micro-batches; the parameters of other stages are dropped from this rank.
- DP: gradients are averaged over the data-parallel group in flat buckets after backward. At
  ZeRO 1 / 2 the optimiser is ShardedMuonAdamW (sharded_optim.py): whole parameters partitioned
  over the DP ranks, state on the owner only, ZeRO-2 reducing each gradient to its owner.
Then one global gradient norm (each parameter counted once: TP shards summed, replicated and
tied copies counted once), clipping like torch.nn.utils.clip_grad_norm_, and the same
MuonAdamW step as the single-process engine, so every layout reproduces its losses.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..config import Config
from ..engine import StepStats, autocast_for
from ..optim import MuonAdamW, param_groups, set_lr
from .common import DistributedEngineBase
from .pipeline import StageModule, eval_units, owned_prefixes, plan_stages, recv_tuple, run_units, send_tuple
from .sharded_optim import ShardedMuonAdamW
from .state import ParallelState
from .tensor_parallel import apply_tensor_parallel

BUCKET_ELEMS = 25_000_000  # gradient all-reduce bucket (elements): large enough to amortise latency


class TorchEngine(DistributedEngineBase):
    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, st: ParallelState):
        super().__init__(cfg, st)
        self.device = device
        lay = st.layout
        apply_tensor_parallel(model, st.tp_group)
        self.model = model.to(device)
        self.plan = None
        self.tie_group, self.tied, self.tie_leader = None, set(), True
        owned = None
        if lay.pp > 1:
            plans = plan_stages(cfg.model, lay.pp)
            self.plan = plans[lay.pp_rank]
            owned = owned_prefixes(self.plan)
            self._make_tie_groups(plans[0].recur_stages)
        self.owned_names = [n for n, _ in model.named_parameters() if owned is None or n.startswith(owned)]
        names = set(self.owned_names)
        for n, p in model.named_parameters():
            if n not in names:  # another stage's weights: free them on this rank
                p.data = torch.empty(0, dtype=p.dtype, device=device)
                p.requires_grad_(False)
        self.params = [p for n, p in model.named_parameters() if n in names]
        keep = {id(p) for p in self.params}
        groups = [dict(g, params=[p for p in g["params"] if id(p) in keep]) for g in param_groups(model, cfg.optim)]
        groups = [g for g in groups if g["params"]]
        self.zero_stage = cfg.parallel.zero_stage if lay.dp > 1 else 0  # one replica: nothing to shard
        if self.zero_stage:
            names = {id(p): n for n, p in model.named_parameters()}
            self.optimizer = ShardedMuonAdamW(groups, names, st)
        else:
            self.optimizer = MuonAdamW(groups)
        self._schedules: dict[int, object] = {}
        self._poison = 1.0
        self._recur = cfg.model.num_recur  # this step's recurrence count (read by the pipeline stage)
        self._pipe_stage = None

    # ------------------------------------------------------------------ pipeline plumbing
    def _make_tie_groups(self, recur_stages: list[int]) -> None:
        """Groups over the stages that hold a copy of the recurrent group, one per (tp, dp)
        index. Created on every rank in the same order (new_group is collective)."""
        lay = self.st.layout
        if len(recur_stages) < 2:
            return
        for d in range(lay.dp):
            for t in range(lay.tp):
                ranks = [lay.rank_of(t, d, s) for s in recur_stages]
                g = dist.new_group(ranks)
                if lay.rank in ranks:
                    self.tie_group = g
        if self.tie_group is not None:
            self.tied = {n for n, _ in self.model.named_parameters()
                         if n.startswith(("recur.", "injection.", "norm_recur."))}
        self.tie_leader = lay.pp_rank == recur_stages[0]

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
                    return self.model.head.loss(h, y) * self._poison
            # 1F1B needs at least as many micro-batches as stages to fill the pipe; with fewer,
            # GPipe is the same schedule with all forwards first.
            cls = Schedule1F1B if n_micro >= lay.pp else ScheduleGPipe
            self._schedules[n_micro] = cls(self._pipe_stage, n_micro, loss_fn=loss_fn)
        return self._schedules[n_micro]

    # ------------------------------------------------------------------ training
    def train_step(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], lr_factor: float,
                   inject_nan: bool = False, num_recur: Optional[int] = None) -> StepStats:
        """One step over the micro-batches at num_recur recurrences (None: the model's; every
        rank is handed the same draw); inject_nan poisons the loss (fault-injection tests):
        every rank then skips the update, because the loss and grad norm are global."""
        set_lr(self.optimizer, lr_factor)
        self._poison = float("nan") if inject_nan else 1.0
        self._recur = num_recur or self.cfg.model.num_recur
        batches = list(batches)
        n = len(batches)
        if self.plan is None:
            total = torch.zeros((), device=self.device)
            for x, y in batches:
                with autocast_for(self.cfg, self.device):
                    loss = self.model(x.to(self.device), y.to(self.device), num_recur=self._recur) * self._poison
                (loss / n).backward()
                total += loss.detach().float()
            loss_t = total / n
        else:
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
        self._sync_grads()
        if self.st.layout.dp > 1:
            dist.all_reduce(loss_t, group=self.st.dp_group)
            loss_t /= self.st.layout.dp
        loss = float(loss_t)
        grad_norm = self._clip()
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss, grad_norm, skipped)

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
        elif self.st.layout.dp > 1:
            self._all_reduce_flat([p.grad for p in self.params if p.grad is not None], self.st.dp_group,
                                  self.st.layout.dp)

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

    def _clip(self) -> float:
        """Global grad norm over the whole model replica, then clip_grad_norm_'s scaling."""
        lay = self.st.layout
        sq = torch.zeros((), device=self.device, dtype=torch.float32)
        names = dict(zip(map(id, self.params), self.owned_names))
        for p in self.params:
            if p.grad is None:
                continue
            sharded = getattr(p, "tp_split_dim", None) is not None
            if not sharded and lay.tp_rank != 0:
                continue  # replicated across TP: count once
            if names[id(p)] in self.tied and not self.tie_leader:
                continue  # tied copy on another stage: count once
            sq += p.grad.detach().float().pow(2).sum()
        if lay.tp * lay.pp > 1:
            dist.all_reduce(sq, group=self.st.mp_group)
        if self.zero_stage == 2:  # each rank holds its owned gradients only
            dist.all_reduce(sq, group=self.st.dp_group)
        norm = float(sq.sqrt())
        clip = self.cfg.optim.grad_clip or float("inf")
        coef = min(clip / (norm + 1e-6), 1.0)
        if math.isfinite(norm):
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_loss(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_recur: Optional[int] = None) -> float:
        """Mean loss per target token; batches are dealt round-robin over the DP replicas."""
        lay = self.st.layout
        r = num_recur or self.cfg.model.num_recur
        self.model.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        for k, (x, y) in enumerate(batches):
            if k % lay.dp != lay.dp_rank:
                continue
            x, y = x.to(self.device), y.to(self.device)
            with autocast_for(self.cfg, self.device):
                if self.plan is None:
                    loss = self.model(x, y, num_recur=r)
                else:
                    loss = self._relay_forward(x, y, r)
            if loss is not None:
                tot += torch.tensor([float(loss) * y.numel(), y.numel()], dtype=torch.float64, device=self.device)
        self.model.train()
        if lay.pp > 1:
            dist.all_reduce(tot, group=self.st.pp_group)
        if lay.dp > 1:
            dist.all_reduce(tot, group=self.st.dp_group)
        return float(tot[0] / tot[1].clamp(min=1))

    def _relay_forward(self, x: torch.Tensor, y: torch.Tensor, r: int) -> Optional[torch.Tensor]:
        from .state import pp_neighbour

        plan = self.plan
        carry = (x,) if plan.first else recv_tuple(pp_neighbour(-1), self.device)
        out = run_units(self.model, eval_units(plan, self.cfg.model, r), carry, plan.first, plan.last, r)
        if not plan.last:
            send_tuple(out, pp_neighbour(1), self.device)
            return None
        return self.model.head.loss(out[0], y)

    # ------------------------------------------------------------------ checkpoints
    def save_files(self, path: str, background: bool = False):
        """This rank's pieces (parallel/dcp_state.py): its stage's parameters, a tied copy of the
        recurrent group from its first stage only."""
        from .dcp_state import save, state_dict

        counted = {n for n in self.owned_names if n not in self.tied or self.tie_leader}
        named = [(n, p) for n, p in self.model.named_parameters() if n in counted]
        return save(path, state_dict(named, self.optimizer), background)

    def load_files(self, path: str) -> None:
        from .dcp_state import load

        params = dict(self.model.named_parameters())
        # sharded over DP (ZeRO 1 / 2), a rank asks only for the state of the parameters it owns
        owns = (lambda name: self.optimizer.owners[name] == self.st.layout.dp_rank) if self.zero_stage else None
        load(path, [(n, params[n]) for n in self.owned_names], self.optimizer, known=params, owns_state=owns)
