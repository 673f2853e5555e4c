"""Data parallelism under DeepSpeed: ZeRO stages 0-3, optionally with tensor parallelism (pp = 1).

DeepSpeed drives the data-parallel side: gradient accumulation, the gradient all-reduce or
reduce-scatter, ZeRO partitioning of optimiser state / gradients / parameters, and clipping.
The optimiser is our own MuonAdamW as a client optimiser; points that matter:
  - DeepSpeed refuses untested client optimisers under ZeRO: `zero_allow_untested_optimizer`.
  - Its gradient clipping defaults to 1.0, so ours is always passed explicitly.
  - ZeRO >= 1 hands the optimiser flat partitions: elementwise AdamW is exact there, Muon is not
    (Newton-Schulz needs whole matrices), so validate_layout refuses muon with ZeRO >= 1.
  - Precision: weights, gradients and optimiser state stay fp32; bf16 runs the forward and
    backward under torch.autocast, exactly like the single-process engine (DeepSpeed's own bf16
    mode would hand Muon flattened fp32 copies even at stage 0).
  - Under TP, DeepSpeed gets an `mpu` naming our groups; TP shards are tagged
    `tensor_model_parallel` so its gradient norm counts replicated weights once.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from ..config import Config
from ..engine import StepStats, autocast_for
from ..optim import build_optimizer, set_lr
from .common import DistributedEngineBase, consolidate_state_dict
from .state import ParallelState
from .tensor_parallel import apply_tensor_parallel

NO_CLIP = 1e30  # "clip" at a norm no gradient reaches: DeepSpeed then still reports the norm


class _Mpu:
    """The model-parallel-unit object DeepSpeed asks for when TP > 1."""

    def __init__(self, st: ParallelState):
        self.st = st

    def get_model_parallel_rank(self) -> int:
        return self.st.layout.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.st.layout.tp

    def get_model_parallel_group(self):
        return self.st.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.st.layout.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.st.layout.dp

    def get_data_parallel_group(self):
        return self.st.dp_group

    # newer DeepSpeed spells these with "tensor"
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def _register_external_parameters(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward. The looped model also reads
    some weights without calling their module's forward (the fused residual+norm reads norm2's
    scale, the recurrence reads the injection adapter and norm_recur, the fused head loss reads
    the head): tell DeepSpeed which module's forward uses them."""
    import deepspeed
    register_external_parameter = deepspeed.zero.register_external_parameter

    for block in model.blocks():
        register_external_parameter(block, block.norm2.weight)
    for p in [*model.injection.parameters(), model.norm_recur.weight, model.head.weight]:
        register_external_parameter(model, p)


def ds_config(cfg: Config, dp: int) -> dict:
    t, p = cfg.train, cfg.parallel
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp,
        "gradient_clipping": float(cfg.optim.grad_clip) if cfg.optim.grad_clip else NO_CLIP,
        # ZeRO-3: persist (do not partition) tensors up to d_model elements, i.e. the norm scales
        # and lane mixers, whose gathers would cost more than they save; matrices are partitioned.
        "zero_optimization": {"stage": p.zero_stage, "stage3_param_persistence_threshold": cfg.model.d_model},
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(DistributedEngineBase):
    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, st: ParallelState):
        super().__init__(cfg, st)
        if device.type == "cpu":
            # The CPU shm all-reduce op serves DeepSpeed inference only; building it costs ~70 s.
            # (Through sys.modules: the attribute deepspeed.comm.torch is the torch package.)
            import importlib
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed

        self.device = device
        apply_tensor_parallel(model, st.tp_group)
        for p in model.parameters():
            if getattr(p, "tp_split_dim", None) is not None:
                p.tensor_model_parallel = True
        self.model = model.to(device)
        if cfg.parallel.zero_stage == 3:
            _register_external_parameters(model)
        opt = build_optimizer(model, cfg.optim)
        self._guard_step(opt)
        self.optimizer = opt
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, config=ds_config(cfg, st.layout.dp), dist_init_required=False,
            mpu=_Mpu(st) if st.layout.tp > 1 else None)

    def _guard_step(self, opt: torch.optim.Optimizer) -> None:
        """Skip the update on every rank when any rank sees a non-finite gradient (DeepSpeed
        in fp32 would apply it). Wraps the client optimiser, so it also guards ZeRO's call."""
        inner = opt.step
        self._skipped = False

        def step(closure=None):
            bad = any(not torch.isfinite(p.grad).all() for g in opt.param_groups for p in g["params"]
                      if p.grad is not None)
            flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self._skipped = bool(flag.item())
            if not self._skipped:
                return inner(closure)
            return None
        opt.step = step

    def train_step(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], lr_factor: float,
                   inject_nan: bool = False) -> StepStats:
        set_lr(self.optimizer, lr_factor)
        batches = list(batches)
        if len(batches) != self.ds.gradient_accumulation_steps():
            raise ValueError(f"DeepSpeedEngine was configured for {self.ds.gradient_accumulation_steps()} "
                             f"micro-batches per step, got {len(batches)}")
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            with autocast_for(self.cfg, self.device):
                loss = self.ds(x.to(self.device), y.to(self.device))
            if inject_nan:  # fault-injection tests: the guarded optimiser step then skips everywhere
                loss = loss * float("nan")
            self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
            self.ds.step()          # applies the update at the accumulation boundary only
            total += loss.detach().float()
        loss_t = total / len(batches)
        if self.st.layout.dp > 1:
            dist.all_reduce(loss_t, group=self.st.dp_group)
            loss_t /= self.st.layout.dp
        loss = float(loss_t)
        norm = self.ds.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        skipped = self._skipped or not math.isfinite(loss)
        return StepStats(loss, grad_norm, skipped)

    @torch.no_grad()
    def eval_loss(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_recur: Optional[int] = None) -> float:
        lay = self.st.layout
        # ZeRO-3 gathers parameters inside every forward: all ranks must run the same forwards.
        deal = lay.dp if self.cfg.parallel.zero_stage < 3 else 1
        my = lay.dp_rank if deal > 1 else 0
        self.ds.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        for k, (x, y) in enumerate(batches):
            if k % deal != my:
                continue
            with autocast_for(self.cfg, self.device):
                loss = self.ds(x.to(self.device), y.to(self.device), num_recur=num_recur)
            tot += torch.tensor([float(loss) * y.numel(), y.numel()], dtype=torch.float64, device=self.device)
        self.ds.train()
        if deal > 1:
            dist.all_reduce(tot, group=self.st.dp_group)
        return float(tot[0] / tot[1].clamp(min=1))

    # ------------------------------------------------------------------ checkpoints
    def save_files(self, path: str) -> None:
        """model.pt: the consolidated plain state dict; deepspeed/: DeepSpeed's own checkpoint
        (module, ZeRO-partitioned optimiser state), which restores the next step exactly."""
        from ..checkpoint import torch_save_synced

        names = [n for n, _ in self.model.named_parameters()]
        if self.cfg.parallel.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                full = consolidate_state_dict(self.model, names, self.cfg.model.vocab_size, self.st)
        else:
            full = consolidate_state_dict(self.model, names, self.cfg.model.vocab_size, self.st)
        if self.is_main:
            torch_save_synced(full, f"{path}/model.pt")
        self.ds.save_checkpoint(os.path.join(path, "deepspeed"), tag="state", save_latest=False)

    def load_files(self, path: str) -> None:
        from ..checkpoint import CheckpointError

        ds_dir = os.path.join(path, "deepspeed")
        if not os.path.isdir(os.path.join(ds_dir, "state")):
            raise CheckpointError(f"{path} has no DeepSpeed state (deepspeed/state): it was written by another "
                                  f"engine or layout. Resume with the engine and layout that wrote it")
        loaded, _ = self.ds.load_checkpoint(ds_dir, tag="state", load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {ds_dir}; resume with the layout that wrote it")
