"""TP x PP x DP training on plain torch.distributed (ZeRO stage 0): Muon, MuonH or AdamW; also the
single process, which is this engine at world size 1 (no process group, every collective skipped).

- TP: the model's linears, embedding and head are swapped for shards (tensor_parallel.py).
- PP: this rank runs one stage (pipeline.py) under torch.distributed.pipelining's 1F1B schedule
  over the step's micro-batches; the parameters of other stages are dropped from this rank.
- DP: gradients are averaged over the data-parallel group in flat buckets after backward.
Then one global gradient norm (each parameter counted once: TP shards summed, replicated and
tied copies counted once), clipping exactly like torch.nn.utils.clip_grad_norm_, and the
optimizer step, all in EngineBase's shared step, so every layout reproduces the single process.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ..config import Config
from ..optim import MuonAdamW, param_groups
from ..param_names import RECURRENT_GROUP
from .base import EngineBase
from .common import consolidate_optimizer_state, consolidate_state_dict, load_consolidated
from .engine_api import Batch, autocast_for
from .pipeline import StageModule, eval_units, owned_prefixes, plan_stages, recv_tuple, run_units, send_tuple
from .state import ParallelState
from .tensor_parallel import apply_tensor_parallel

BUCKET_ELEMS = 25_000_000  # gradient all-reduce bucket (elements): large enough to amortise latency


class TorchEngine(EngineBase):
    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, st: ParallelState):
        super().__init__(cfg, device, st)
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
        self.optimizer = MuonAdamW([g for g in groups if g["params"]])
        # The parameters whose gradients enter the global norm: each counted once over the layout.
        self.counted = [p for n, p in zip(self.owned_names, self.params)
                        if (getattr(p, "tp_split_dim", None) is not None or lay.tp_rank == 0)  # TP replicas once
                        and (n not in self.tied or self.tie_leader)]                      # tied copies once
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
            self.tied = {n for n, _ in self.model.named_parameters() if n.startswith(RECURRENT_GROUP)}
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

    # ------------------------------------------------------------------ the step's hooks
    def _accumulate(self, batches: list[Batch], r: int, poison: Optional[float]) -> torch.Tensor:
        if self.plan is None:
            return super()._accumulate(batches, r, poison)
        # A pipeline stage: the schedule runs every micro-batch's forward and backward (1F1B).
        self._poison = 1.0 if poison is None else poison
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
        if self.dp_size > 1:
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
        """The global grad norm over the whole model replica, then clip_grad_norm_'s scaling. On
        one process this is torch.nn.utils.clip_grad_norm_ itself, operation for operation."""
        norm = get_total_norm([p.grad for p in self.counted if p.grad is not None]).to(self.device)
        if self.st.layout.tp * self.st.layout.pp > 1:  # this rank's share: sum the squares over TP x PP
            sq = norm.float().square()
            dist.all_reduce(sq, group=self.st.mp_group)
            norm = sq.sqrt()
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
        from .state import pp_neighbour

        plan = self.plan
        carry = (x,) if plan.first else recv_tuple(pp_neighbour(-1), self.device)
        out = run_units(self.model, eval_units(plan, self.cfg.model, r), carry, plan.first, plan.last, r)
        if not plan.last:
            send_tuple(out, pp_neighbour(1), self.device)
            return None
        return self.model.head.loss(out[0], y)

    # ------------------------------------------------------------------ checkpoints
    def _counted_names(self) -> list[str]:
        """Owned parameters this rank contributes to the consolidated state dict."""
        return [n for n in self.owned_names if n not in self.tied or self.tie_leader]

    def _layout_info(self) -> dict:
        lay = self.st.layout
        return dict(engine="torch", tp=lay.tp, pp=lay.pp, dp=lay.dp, zero_stage=0)

    def save_files(self, path: str) -> None:
        """model.pt and optim_full.pt: whole tensors gathered to rank 0 (any layout loads them);
        optim_tp{t}_pp{p}.pt: this layout's own optimiser state (exact and cheap to reload).
        One process writes the single-process files instead (model.pt, optim.pt, optim_full.pt)."""
        if self.world == 1:
            return self._save_single(path)
        from ..checkpoint import torch_save_synced
        from ..reshard import FULL_OPTIM

        counted = self._counted_names()
        full = consolidate_state_dict(self.model, counted, self.cfg.model.vocab_size, self.st)
        if self.is_main:
            torch_save_synced(full, f"{path}/model.pt")
        del full
        optim = consolidate_optimizer_state(self.model, self.optimizer, counted, self.cfg.model.vocab_size,
                                            self.st, self._layout_info())
        if self.is_main:
            torch_save_synced(optim, f"{path}/{FULL_OPTIM}")
        del optim
        lay = self.st.layout
        if lay.dp_rank == 0:  # DP replicas hold identical optimiser state under ZeRO 0
            torch_save_synced({"layout": [lay.tp, lay.pp], "optim": self.optimizer.state_dict()},
                              f"{path}/optim_tp{lay.tp_rank}_pp{lay.pp_rank}.pt")

    def load_files(self, path: str) -> None:
        """Same tp and pp as the saving run (any dp): the native per-rank file. Another layout:
        optim_full.pt, sliced for this rank's parameters (resharding)."""
        import os

        from ..checkpoint import CheckpointError, load_file
        from ..reshard import FULL_OPTIM, apply_full_state

        if self.world == 1:
            return self._load_single(path)
        load_consolidated(self.model, self.owned_names, load_file(path, "model.pt"), path)
        lay = self.st.layout
        name = f"optim_tp{lay.tp_rank}_pp{lay.pp_rank}.pt"
        native = load_file(path, name) if os.path.isfile(os.path.join(path, name)) else None
        if native is not None and native.get("layout") == [lay.tp, lay.pp]:
            self.optimizer.load_state_dict(native["optim"])
        elif os.path.isfile(os.path.join(path, FULL_OPTIM)):
            apply_full_state(self.model, self.optimizer, self.owned_names, load_file(path, FULL_OPTIM), path)
        else:
            raise CheckpointError(
                f"{path} has no optimiser state for this layout (tp={lay.tp} pp={lay.pp}: {name}) and no "
                f"layout-independent {FULL_OPTIM} (written by megaloop since resharding support). Resume "
                f"with the layout that wrote it; model.pt alone (consolidated) loads under any layout for "
                f"evaluation")

    # One process: optim.pt is the exact native state; optim_full.pt the same state keyed by
    # parameter name, which any layout can load.
    def _save_single(self, path: str) -> None:
        from ..checkpoint import torch_save_synced
        from ..reshard import FULL_OPTIM, local_full_state
        torch_save_synced(self.model.state_dict(), f"{path}/model.pt")
        torch_save_synced(self.optimizer.state_dict(), f"{path}/optim.pt")
        layout = dict(engine="local", tp=1, pp=1, dp=1, zero_stage=0)
        torch_save_synced(local_full_state(self.model, self.optimizer, layout), f"{path}/{FULL_OPTIM}")

    def _load_single(self, path: str) -> None:
        import os

        from ..checkpoint import CheckpointError, load_file
        from ..reshard import FULL_OPTIM, apply_full_state
        try:
            self.model.load_state_dict(load_file(path, "model.pt"))
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model ({str(e).splitlines()[0]}); the config's "
                f"model shape differs from the run that wrote it") from None
        if os.path.isfile(os.path.join(path, "optim.pt")):  # written by a single process: exact
            self.optimizer.load_state_dict(load_file(path, "optim.pt"))
        elif os.path.isfile(os.path.join(path, FULL_OPTIM)):  # another layout: whole tensors by name
            apply_full_state(self.model, self.optimizer, [n for n, _ in self.model.named_parameters()],
                             load_file(path, FULL_OPTIM), path)
        else:
            raise CheckpointError(
                f"{path} has neither optim.pt nor {FULL_OPTIM}: it was written under a parallel layout by a "
                f"megaloop without resharding support. Resume it under the layout that wrote it (or "
                f"convert it with `megaloop checkpoint convert`)")
