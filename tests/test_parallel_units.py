"""Single-process checks of the parallel layer's pure parts: layout arithmetic, stage
partitioning, validation messages, the launcher environment, and the DeepSpeed config."""
from __future__ import annotations

import pytest

from megaloop.config import ConfigError, load_config
from megaloop.parallel import build_engine
from megaloop.parallel.engines import choose_engine, rendezvous_from_env, validate_layout
from megaloop.parallel.pipeline import eval_units, partition, plan_stages, units_for
from megaloop.parallel.state import make_layout
from megaloop.parallel.tensor_parallel import padded_vocab


def _cfg(**sets):
    over = [f"{k.replace('__', '.')}={v}" for k, v in sets.items()]
    return load_config(raw={"train": {"steps": 1}, "model": {"d_model": 32, "n_head": 4, "vocab_size": 101,
                                                             "seq_len": 16, "n_prelude": 2, "n_recur_block": 4,
                                                             "n_coda": 2, "num_recur": 4}}, overrides=over)


def test_layout_orders_tp_fastest_then_dp_then_pp():
    lay = make_layout(8, tp=2, pp=2, rank=5)
    assert (lay.dp, lay.tp_rank, lay.dp_rank, lay.pp_rank) == (2, 1, 0, 1)
    assert lay.tp_groups()[0] == [0, 1] and lay.dp_groups()[0] == [0, 2] and lay.pp_groups()[0] == [0, 4]
    every = sorted(r for g in lay.tp_groups() for r in g)
    assert every == list(range(8))


def test_layout_that_does_not_divide_the_world_names_the_fix():
    with pytest.raises(ConfigError, match="does not divide the world size 6"):
        make_layout(6, tp=4, pp=1)


def test_stages_balance_unrolled_recurrences():
    """prelude 2 / group 4 / coda 2 at r=4 on pp=4: 20 blocks, no stage above 6."""
    cfg = _cfg()
    plans = plan_stages(cfg.model, 4)
    loads = [sum(4 if u.kind == "pass" else 1 for u in p.units) for p in plans]
    assert sum(loads) == 20 and max(loads) <= 6
    assert [u for p in plans for u in p.units] == units_for(cfg.model)
    assert partition([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    # evaluation at another r spreads its passes over the stages holding the group
    passes = [u.index for p in plans for u in eval_units(p, cfg.model, 8) if u.kind == "pass"]
    assert passes == list(range(8))


def test_validation_errors():
    with pytest.raises(ConfigError, match="more pipeline stages"):
        validate_layout(_cfg(parallel__pp=2, model__n_prelude=0, model__n_coda=0, model__num_recur=1), world=2)
    # ZeRO 1 / 2 with Muon / MuonH, or under PP, run the torch engine's sharded optimiser; ZeRO-3
    # with them, and Muon on DeepSpeed's flat ZeRO partitions, are refused naming the fix
    for name in ("muon", "muonh"):
        for z in (1, 2):
            assert choose_engine(_cfg(parallel__zero_stage=z, optim__name=name)) == "torch"
            assert validate_layout(_cfg(parallel__zero_stage=z, optim__name=name), world=2).dp == 2
        with pytest.raises(ConfigError, match="zero_stage=2 .state and gradients sharded"):
            validate_layout(_cfg(parallel__zero_stage=3, optim__name=name), world=2)
        with pytest.raises(ConfigError, match="Use parallel.engine=torch"):
            validate_layout(_cfg(parallel__zero_stage=1, parallel__engine="deepspeed", optim__name=name), world=2)
    assert validate_layout(_cfg(parallel__zero_stage=2, parallel__pp=2, optim__name="adamw"), world=4).dp == 2
    with pytest.raises(ConfigError, match="keeps the weights replicated"):
        validate_layout(_cfg(parallel__zero_stage=3, parallel__pp=2, optim__name="adamw"), world=2)
    with pytest.raises(ConfigError, match="parallel.engine=auto or deepspeed"):
        validate_layout(_cfg(parallel__zero_stage=3, parallel__engine="torch", optim__name="adamw"), world=2)
    with pytest.raises(ConfigError, match="must divide model.n_head"):
        _cfg(parallel__tp=3)
    assert validate_layout(_cfg(parallel__tp=2, parallel__pp=2), world=8).dp == 2
    assert choose_engine(_cfg(parallel__zero_stage=1, optim__name="adamw")) == "deepspeed"
    assert choose_engine(_cfg(parallel__pp=2)) == "torch"
    # DeepSpeed only where ZeRO asks for it: ZeRO 0 is the torch engine whatever parallel.engine says;
    # at ZeRO >= 1 parallel.engine=torch keeps AdamW on the torch engine's own ZeRO
    assert choose_engine(_cfg(parallel__engine="deepspeed")) == "torch"
    assert choose_engine(_cfg(parallel__engine="torch", parallel__zero_stage=2, optim__name="adamw")) == "torch"
    assert choose_engine(_cfg(parallel__engine="deepspeed", parallel__zero_stage=2, optim__name="adamw")) == "deepspeed"


def test_single_process_refuses_a_parallel_layout(monkeypatch):
    for k in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="needs 2 processes"):
        build_engine(_cfg(parallel__tp=2), None, None)


def test_one_process_is_the_torch_engine_without_a_process_group(monkeypatch):
    """One process gets the torch engine at world size 1 (an Engine; also with zero_stage set:
    ZeRO has nothing to shard there), and it trains and evaluates without torch.distributed."""
    import torch
    import torch.distributed as dist

    from megaloop.model import LoopedLM
    from megaloop.parallel import Engine
    from megaloop.parallel.torch_engine import TorchEngine

    for k in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    cfg = _cfg(parallel__zero_stage=2, optim__name="adamw")
    engine = build_engine(cfg, lambda where: LoopedLM(cfg.model), torch.device("cpu"))
    assert isinstance(engine, TorchEngine) and isinstance(engine, Engine)
    assert (engine.is_main, engine.rank, engine.dp_rank, engine.dp_size) == (True, 0, 0, 1)
    x = torch.randint(0, 101, (2, 16))
    stats = engine.train_step([(x, x.roll(-1, 1))] * 2, 1.0)
    assert stats.loss > 0 and stats.grad_norm > 0 and not stats.skipped
    assert engine.eval_loss([(x, x.roll(-1, 1))]) > 0
    assert engine.all_reduce_flag(True) and not engine.all_reduce_flag(False)
    engine.barrier()
    engine.close()
    assert not dist.is_initialized()


def test_rendezvous_environment():
    assert rendezvous_from_env({}).world == 1
    r = rendezvous_from_env(dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1"))
    assert (r.rank, r.world, r.local_rank) == (3, 4, 1)
    r = rendezvous_from_env(dict(SLURM_PROCID="5", SLURM_STEP_NUM_TASKS="8", SLURM_LOCALID="1",
                                 MASTER_ADDR="h", MASTER_PORT="1"))
    assert (r.rank, r.world, r.source) == (5, 8, "slurm")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        rendezvous_from_env(dict(SLURM_PROCID="0", SLURM_NTASKS="2", MASTER_PORT="1"))
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        rendezvous_from_env(dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="h"))


def test_vocab_padding():
    assert padded_vocab(101, 2) == 102 and padded_vocab(101, 4) == 104 and padded_vocab(100, 4) == 100


def test_deepspeed_config_passes_our_clipping_explicitly():
    from megaloop.parallel.deepspeed_engine import NO_CLIP, ds_config

    c = ds_config(_cfg(parallel__zero_stage=3, optim__name="adamw", optim__grad_clip=0.5, train__grad_accum=2), dp=4)
    assert c["gradient_clipping"] == 0.5 and c["zero_allow_untested_optimizer"] is True
    assert c["zero_optimization"]["stage"] == 3 and c["train_batch_size"] == 8 * 2 * 4
    assert ds_config(_cfg(optim__grad_clip="null"), dp=1)["gradient_clipping"] == NO_CLIP


def test_build_engine_compiles_the_blocks_only_when_asked(monkeypatch):
    """parallelize() compiles each block's forward (torch.compile, lazily) when train.compile is
    set, as `megaloop train` used to after building the engine, and leaves them eager otherwise."""
    import torch

    from megaloop.model import LoopedLM

    for k in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    for on in (False, True):
        cfg = _cfg(train__compile=on)
        engine = build_engine(cfg, lambda where: LoopedLM(cfg.model), torch.device("cpu"))
        compiled = [hasattr(b.forward, "_torchdynamo_orig_callable") for b in engine.model.blocks()]
        assert compiled == [on] * len(compiled)
