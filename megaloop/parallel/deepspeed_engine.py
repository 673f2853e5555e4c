"""Data parallelism under DeepSpeed ZeRO stages 1-3, optionally with tensor parallelism (pp = 1).
build_engine picks this engine exactly when parallel.zero_stage >= 1 (ZeRO 0 is the torch engine).

The step is EngineBase's, with DeepSpeed's hooks: it drives the data-parallel side (gradient
accumulation, the gradient all-reduce or reduce-scatter, ZeRO partitioning of optimiser state /
gradients / parameters, and clipping) inside its backward and step. The optimiser is our own MuonAdamW as a client optimiser; points that matter:
  - DeepSpeed refuses untested client optimisers under ZeRO: `zero_allow_untested_optimizer`.
  - Its gradient clipping defaults to 1.0, so ours is always passed explicitly.
  - ZeRO >= 1 hands the optimiser flat partitions: elementwise AdamW is exact there, Muon is not
    (Newton-Schulz needs whole matrices), so validate_layout refuses muon with ZeRO >= 1.
  - Precision: weights, gradients and optimiser state stay fp32; bf16 runs the forward and
    backward under torch.autocast, exactly like the single-process engine (DeepSpeed's own bf16
    mode would keep its own flattened fp32 copies).
  - Under TP, DeepSpeed gets an `mpu` naming our groups; TP shards are tagged
    `tensor_model_parallel` so its gradient norm counts replicated weights once.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from ..config import Config
from ..optim import build_optimizer
from .base import EngineBase, finite_step
from .common import consolidate_optimizer_state, consolidate_state_dict, load_consolidated
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


class DeepSpeedEngine(EngineBase):
    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, st: ParallelState):
        super().__init__(cfg, device, st)
        if device.type == "cpu":
            # The CPU shm all-reduce op serves DeepSpeed inference only; building it costs ~70 s.
            # (Through sys.modules: the attribute deepspeed.comm.torch is the torch package.)
            import importlib
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed

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

    # ------------------------------------------------------------------ the step's hooks
    def _forward(self, x: torch.Tensor, y: torch.Tensor, r: int) -> torch.Tensor:
        return self.ds(x, y, num_recur=r)

    def _train_mode(self, on: bool) -> None:
        self.ds.train(on)

    def _accumulate(self, batches: list, r: int, poison: Optional[float]) -> torch.Tensor:
        if len(batches) != self.ds.gradient_accumulation_steps():
            raise ValueError(f"DeepSpeedEngine was configured for {self.ds.gradient_accumulation_steps()} "
                             f"micro-batches per step, got {len(batches)}")
        return super()._accumulate(batches, r, poison)

    def _backward(self, loss: torch.Tensor, n_micro: int) -> None:
        self.ds.backward(loss)  # divides by gradient_accumulation_steps (= n_micro) itself
        self.ds.step()          # at the accumulation boundary: reduce, clip, guarded optimiser step

    def _update(self, loss: float) -> tuple[float, bool]:
        """ZeRO reduced, clipped and stepped inside the last micro-batch's ds.step(); what is left
        is to report, with the guard's verdict on the gradients."""
        norm = self.ds.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        return grad_norm, self._skipped or not finite_step(loss, grad_norm)

    def _eval_replicas(self) -> int:
        # ZeRO-3 gathers parameters inside every forward: all ranks must run the same forwards.
        return self.dp_size if self.cfg.parallel.zero_stage < 3 else 1

    # ------------------------------------------------------------------ checkpoints
    def _layout_info(self) -> dict:
        lay = self.st.layout
        return dict(engine="deepspeed", tp=lay.tp, pp=1, dp=lay.dp, zero_stage=self.cfg.parallel.zero_stage)

    def _zero_flats(self) -> list:
        """The flat fp32 partitions ZeRO >= 1 hands the client optimiser (its state's keys)."""
        zo = self.ds.optimizer
        if self.cfg.parallel.zero_stage == 3:
            return list(zo.fp32_partitioned_groups_flat)
        return list(zo.single_partition_of_fp32_groups)

    def _relink(self) -> None:
        """ZeRO 1/2 links each parameter's fragment to the optimiser state once, right after the
        first group's first step, when the client optimiser has not yet created the other groups'
        state (it steps one group at a time and creates state lazily): link again, now that the
        state exists, so DeepSpeed's safe_get/set_full_optimizer_state see every group."""
        zo = self.ds.optimizer
        if self.cfg.parallel.zero_stage in (1, 2):
            zo._hp_optimizer_states_linked = False
            zo._lazy_init_hp_params_optimizer_state()

    def _zero_step(self):
        """AdamW's step counter under ZeRO >= 1: one per flat partition, the same for all of them
        (every partition is updated on every applied step). None before the first step."""
        steps = {float(st["step"]) for st in self.optimizer.state.values() if "step" in st}
        if len(steps) > 1:
            raise RuntimeError(f"ZeRO partitions disagree on the optimiser step: {sorted(steps)}")
        return next(iter(steps)) if steps else None

    def _zero_state_keys(self) -> list[str]:
        keys = set()
        for st in self.optimizer.state.values():
            keys |= {k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
        return sorted(keys)

    def save_files(self, path: str) -> None:
        """model.pt / optim_full.pt: the consolidated plain state dict and the whole per-parameter
        optimiser state (any layout loads them); deepspeed/: DeepSpeed's own checkpoint (module,
        ZeRO-partitioned optimiser state), which restores the next step exactly under this layout."""
        from ..checkpoint import torch_save_synced
        from ..reshard import FULL_OPTIM

        names = [n for n, _ in self.model.named_parameters()]
        vocab, zero = self.cfg.model.vocab_size, self.cfg.parallel.zero_stage
        if zero == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                full = consolidate_state_dict(self.model, names, vocab, self.st)
        else:
            full = consolidate_state_dict(self.model, names, vocab, self.st)
        if self.is_main:
            torch_save_synced(full, f"{path}/model.pt")
        del full
        get_state = None
        if zero >= 1:
            from deepspeed.utils import safe_get_full_optimizer_state
            step, keys = self._zero_step(), self._zero_state_keys()
            if step is not None:
                self._relink()

            def get_state(name, p):  # collective over DP (DeepSpeed all-reduces the fragments)
                if step is None:
                    return {}
                out = {k: safe_get_full_optimizer_state(p, k).reshape(_shape(p)) for k in keys}
                out["step"] = torch.tensor(step, dtype=torch.float32)
                return out
        optim = consolidate_optimizer_state(self.model, self.optimizer, names, vocab, self.st,
                                            self._layout_info(), get_state=get_state)
        if self.is_main:
            torch_save_synced(optim, f"{path}/{FULL_OPTIM}")
        del optim
        self.ds.save_checkpoint(os.path.join(path, "deepspeed"), tag="state", save_latest=False)

    def load_files(self, path: str) -> None:
        """The same layout (engine, tp, dp, ZeRO stage): DeepSpeed's own checkpoint. Another
        layout: model.pt and optim_full.pt, sliced for this rank (resharding)."""
        from ..checkpoint import CheckpointError, load_file
        from ..reshard import FULL_OPTIM

        ds_dir = os.path.join(path, "deepspeed")
        has_native = os.path.isdir(os.path.join(ds_dir, "state"))
        full = load_file(path, FULL_OPTIM) if os.path.isfile(os.path.join(path, FULL_OPTIM)) else None
        same = full is not None and full.get("layout") == self._layout_info()
        if has_native and (same or full is None):
            loaded, _ = self.ds.load_checkpoint(ds_dir, tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load {ds_dir}; resume with the layout that wrote it")
            return
        if full is None:
            raise CheckpointError(
                f"{path} has neither DeepSpeed state (deepspeed/state) nor a layout-independent {FULL_OPTIM}: "
                f"it was written by another engine or layout by a megaloop without resharding support. "
                f"Resume with the engine and layout that wrote it")
        self._load_resharded(path, load_file(path, "model.pt"), full)

    def _load_resharded(self, path: str, weights: dict, full: dict) -> None:
        from ..checkpoint import CheckpointError
        from ..reshard import FULL_OPTIM, apply_full_state, check_full

        check_full(full, path)
        zero = self.cfg.parallel.zero_stage
        names = [n for n, _ in self.model.named_parameters()]
        if zero == 0:  # the client optimiser holds the model's own parameters: as the torch engine
            load_consolidated(self.model, names, weights, path)
            apply_full_state(self.model, self.optimizer, names, full, path)
            return
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        params = dict(self.model.named_parameters())
        missing = [n for n in params if n not in weights]
        if missing:
            raise CheckpointError(f"checkpoint {path} does not fit this model (missing {missing[0]}); the "
                                  f"config's model shape differs from the run that wrote it")
        # Group hyperparameters (and the checks on groups and names) as for the other engines, on
        # the client optimiser's groups; its per-parameter state is ZeRO's, set below.
        apply_full_state(self.model, self.optimizer, [], full, path)
        steps = {float(st["step"]) for st in full["state"].values() if "step" in st}
        if len(steps) > 1:
            raise CheckpointError(f"{path}/{FULL_OPTIM}: parameters were updated a different number of times "
                                  f"({sorted(steps)}); ZeRO keeps one AdamW step per partition and cannot resume "
                                  f"it. Resume with parallel.zero_stage=0")
        keys = sorted({k for st in full["state"].values() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0})
        flats = self._zero_flats()
        if steps:  # make sure the partitions' state exists (it is created lazily at the first step)
            for flat in flats:
                st = self.optimizer.state[flat]
                for k in keys:
                    if k not in st:
                        st[k] = torch.zeros_like(flat, dtype=torch.float32)
                st["step"] = torch.tensor(next(iter(steps)), dtype=torch.float32)
            self._relink()
        with torch.no_grad():
            for n in names:
                p = params[n]
                w = _slice(p, weights[n])
                if w.numel() != _numel(p):
                    raise CheckpointError(f"checkpoint {path}: {n} has shape {tuple(weights[n].shape)}, which does "
                                          f"not fit this model; the config's model shape differs from the saved run")
                if zero == 3:
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        p.data.copy_(w.view_as(p.data))
                else:
                    p.data.copy_(w.view_as(p.data))
                safe_set_full_fp32_param(p, w.to(self.device, torch.float32))
                saved = full["state"].get(n, {})
                for k in keys:
                    if k in saved:
                        safe_set_full_optimizer_state(p, _slice(p, saved[k]).to(self.device, torch.float32), k)


def _shape(p: torch.Tensor) -> torch.Size:
    """A parameter's real shape (ZeRO-3 partitions hide it behind an empty tensor)."""
    return getattr(p, "ds_shape", None) or p.shape


def _numel(p: torch.Tensor) -> int:
    return int(torch.Size(_shape(p)).numel())


class _ShapeOf:
    """Stands in for a ZeRO-3 parameter in `shard_of`, which needs its real shape."""

    def __init__(self, p):
        self.tp_split_dim, self.tp_group = getattr(p, "tp_split_dim", None), getattr(p, "tp_group", None)
        self._shape = torch.Size(_shape(p))

    def size(self, dim: int) -> int:
        return self._shape[dim]


def _slice(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    from .tensor_parallel import shard_of
    return shard_of(_ShapeOf(p), full).contiguous()
