"""Data parallelism under DeepSpeed ZeRO stages 1-3, optionally with tensor parallelism (pp = 1).
build_engine picks it for AdamW at parallel.zero_stage >= 1 (engines.py choose_engine); ZeRO 0 and
Muon / MuonH run on the torch engine.

The step is EngineBase's, with DeepSpeed's hooks: it drives the data-parallel side (gradient
accumulation, the gradient all-reduce or reduce-scatter, ZeRO partitioning of optimiser state /
gradients / parameters, and clipping) inside its backward and step. The model arrives cut by
parallelize.py; the optimiser is our own MuonAdamW (parallelize.make_optimizer) as a client
optimiser; points that matter:
  - DeepSpeed refuses untested client optimisers under ZeRO: `zero_allow_untested_optimizer`.
  - Its gradient clipping defaults to 1.0, so ours is always passed explicitly.
  - ZeRO >= 1 hands the optimiser flat partitions: elementwise AdamW is exact there, Muon is not
    (Newton-Schulz needs whole matrices), so Muon / MuonH with ZeRO 1 / 2 run on the torch
    engine's sharded optimiser (sharded_optim.py) and validate_layout refuses them here.
  - Precision: weights, gradients and optimiser state stay fp32; bf16 runs the forward and
    backward under torch.autocast, exactly like the single-process engine (DeepSpeed's own bf16
    mode would keep its own flattened fp32 copies).
  - Under TP, DeepSpeed gets an `mpu` naming our groups; TP shards are tagged
    `tensor_model_parallel` so its gradient norm counts replicated weights once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..config import Config
from ..optim import MuonAdamW
from .base import EngineBase, finite_step
from .parallelize import ParallelModel
from .state import ParallelState

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
        # One ZeRO-3 sub-group per parameter group (sub-groups tile optimiser offload, unused here):
        # a resumed run sets each group's optimiser state when its partition is stepped first.
        "zero_optimization": {"stage": p.zero_stage, "stage3_param_persistence_threshold": cfg.model.d_model,
                              "sub_group_size": 2 ** 62},
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }


def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        # The CPU shm all-reduce op serves DeepSpeed inference only; building it costs ~70 s.
        # (Through sys.modules: the attribute deepspeed.comm.torch is the torch package.)
        import importlib
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed
    return deepspeed


def zero3_partitioner(cfg: Config, st: ParallelState, device: torch.device):
    """At ZeRO-3, what partitions each parameter over the DP group the moment meta
    initialisation materialises it (parallelize's `partition`), with the settings
    deepspeed.initialize would use: the rank then never holds the whole model. None below ZeRO-3,
    where every DP rank keeps the whole weights."""
    if cfg.parallel.zero_stage != 3:
        return None
    deepspeed = _import_deepspeed(device)
    # DeepSpeed's communication layer over the process group torch.distributed already runs,
    # as deepspeed.initialize(dist_init_required=False) will set it up
    from deepspeed.accelerator import get_accelerator
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False)
    first: list = []

    def partition(p: torch.nn.Parameter) -> None:
        if first:  # later parameters join the first one's partitioning
            first[0].convert_to_zero_parameters(param_list=[p])
            return
        holder = torch.nn.Module()
        holder.register_parameter("p", p)
        deepspeed.zero.Init(module=holder, data_parallel_group=st.dp_group, dtype=torch.float32,
                            config_dict_or_path=ds_config(cfg, st.layout.dp),
                            mpu=_Mpu(st) if st.layout.tp > 1 else None)
        first.append(p)
    return partition


class DeepSpeedEngine(EngineBase):
    """DeepSpeed's ZeRO around a model parallelize() cut for this rank (TP only: pp = 1) and the
    plain optimizer make_optimizer built for it."""

    def __init__(self, cfg: Config, pm: ParallelModel, opt: MuonAdamW, device: torch.device, st: ParallelState):
        super().__init__(cfg, device, st)
        model = pm.module
        deepspeed = _import_deepspeed(device)

        for p in model.parameters():
            if getattr(p, "tp_split_dim", None) is not None:
                p.tensor_model_parallel = True
        self.model = model
        if cfg.parallel.zero_stage == 3:
            _register_external_parameters(model)
        names = {id(p): n for n, p in model.named_parameters()}
        # each group's parameters by name: DeepSpeed replaces them by flat partitions (ZeRO >= 1)
        self._members = {g["name"]: [(names[id(p)], p) for p in g["params"]] for g in opt.param_groups}
        self._pending: dict = {}  # optimiser state loaded but not yet handed to the partitions
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
            if self._pending:
                self._apply_pending(opt)
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

    def _accumulate(self, batches: list, r: int) -> torch.Tensor:
        if len(batches) != self.ds.gradient_accumulation_steps():
            raise ValueError(f"DeepSpeedEngine was configured for {self.ds.gradient_accumulation_steps()} "
                             f"micro-batches per step, got {len(batches)}")
        return super()._accumulate(batches, r)

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
    # ZeRO >= 1 keeps the fp32 weights and the optimiser state in flat partitions over the DP
    # ranks. They are read and written per parameter through DeepSpeed's public safe_get_full_* /
    # safe_set_full_* (whole tensors of this rank's TP shard, on every DP rank); each DP rank then
    # writes every dp-th parameter, so the checkpoint's writes are spread over the replicas.
    def save_files(self, path: str, background: bool = False):
        from .dcp_state import local_shape, save, state_dict

        named = list(self.model.named_parameters())
        zero, lay = self.cfg.parallel.zero_stage, self.st.layout
        from deepspeed.utils import safe_get_full_fp32_param

        self._link_zero_state()
        mine = {n for i, (n, _) in enumerate(named) if i % lay.dp == lay.dp_rank}

        def weight(name, p):  # a collective under ZeRO-3 (all-gather of the partitions)
            w = safe_get_full_fp32_param(p).reshape(local_shape(p)) if zero == 3 else p.detach()
            return w if name in mine else None

        def state(name, p):
            st = self._full_state(name, p)
            return st if name in mine else {}
        return save(path, state_dict(named, self.optimizer, weight, state), background)

    def load_files(self, path: str) -> None:
        from .dcp_state import load

        named = list(self.model.named_parameters())
        zero = self.cfg.parallel.zero_stage
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        from ..errors import CheckpointError

        loaded = load(path, named, self.optimizer, known=[n for n, _ in named], in_place=False)
        steps = {float(st["step"]) for st in loaded.states.values() if "step" in st}
        if len(steps) > 1:
            raise CheckpointError(f"{path}: parameters were updated a different number of times ({sorted(steps)}); "
                                  f"ZeRO keeps one AdamW step per partition and cannot resume it. Resume with "
                                  f"parallel.zero_stage=0")
        with torch.no_grad():
            for name, p in named:
                w = loaded.weights[name].to(self.device, torch.float32)
                if zero == 3:
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        p.data.copy_(w.view_as(p.data))
                else:
                    p.data.copy_(w)
                safe_set_full_fp32_param(p, w)
        # The optimiser state goes in at the next step: only then does DeepSpeed hand the client
        # optimiser its flat partitions (ZeRO-3 empties its groups between steps).
        self._pending = {n: st for n, st in loaded.states.items() if st}
        if not self._pending:
            self.optimizer.state.clear()

    def _apply_pending(self, opt: torch.optim.Optimizer) -> None:
        """Inside the client optimiser's step: give the partitions handed to it now the state
        loaded for their parameters (created as a first step would, then set per parameter)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        for g in opt.param_groups:
            todo = [(n, p) for n, p in self._members.get(g.get("name"), []) if n in self._pending]
            if not g["params"] or not todo:
                continue
            for flat in g["params"]:
                st = opt.state[flat]
                for k, v in self._pending[todo[0][0]].items():  # scalars (AdamW's step) are one per partition
                    st[k] = torch.zeros_like(flat, dtype=torch.float32) if v.dim() > 0 else v.clone()
            self._link_zero_state([g])
            for n, p in todo:
                for k, v in self._pending.pop(n).items():
                    if v.dim() > 0:
                        safe_set_full_optimizer_state(p, v.to(self.device, torch.float32), k)

    def _link_zero_state(self, groups: Optional[list] = None) -> None:
        """ZeRO 1/2 links each parameter's fragment to the optimiser state once, after the first
        group's first step, when the client optimiser (which creates state lazily, one group at a
        time) has no state yet for the other groups: link each group again now that its state
        exists, so safe_get/set_full_optimizer_state see it. (ZeRO-3 reads the state directly.)"""
        if self.cfg.parallel.zero_stage not in (1, 2):
            return
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for g in (self.optimizer.param_groups if groups is None else groups):
            if g["params"] and self.optimizer.state.get(g["params"][0]):
                lazy_init_hp_params_optimizer_state([p for _, p in self._members[g["name"]]], g["params"][0],
                                                    self.optimizer.state)

    def _full_state(self, name: str, p: torch.Tensor) -> dict:
        """p's optimiser state, whole over DP (collective over DP), shaped like p's TP shard."""
        from deepspeed.utils import safe_get_full_optimizer_state

        from .dcp_state import local_shape

        if self._pending:  # loaded and not stepped since
            return self._pending.get(name, {})
        states = [st for st in self.optimizer.state.values() if st]
        keys = sorted({k for st in states for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0})
        out = {k: safe_get_full_optimizer_state(p, k).reshape(local_shape(p)) for k in keys}
        steps = {float(st["step"]) for st in states if "step" in st}  # AdamW: the same for every partition
        if len(steps) > 1:
            raise RuntimeError(f"ZeRO partitions disagree on the optimiser step: {sorted(steps)}")
        if steps:
            out["step"] = torch.tensor(steps.pop(), dtype=torch.float32)
        return out
