"""Run as N ranks (tests/test_meta_init.py): `build_engine` (each rank builds the model on the meta
device and parallelize() materialises its part) gives every rank exactly the single process's
initial weights: each parameter the rank holds equals, bit for bit, its slice of the tensor that
`train.build_model` gives one process (a ZeRO-3 partition gathered whole first); every parameter
of another pipeline stage is empty; a ZeRO-3 rank keeps only a slice of each matrix; the
optimizer puts each parameter in the single process's group; the CPU generator ends in the
single process's state. PRECISION fp8 converts the blocks' linears for float8 between the build and
parallelize(), as train.py does (on a model wide enough for the reference's filter), and checks
too that the rank runs in float8 exactly the linears the single process converts.

    python tests/meta_init_check.py TP PP ZERO OPTIM [PRECISION]    (exits non-zero on the first mismatch)
"""
import sys

import torch

from megaloop import fp8
from megaloop.config import load_config
from megaloop.optim import param_groups
from megaloop.parallel import build_engine
from megaloop.parallel.tensor_parallel import shard_of
from megaloop.train import build_model

MODEL = {"d_model": 32, "n_head": 4, "n_kv_head": 2, "vocab_size": 101, "seq_len": 16, "n_prelude": 1,
         "n_recur_block": 2, "n_coda": 1, "num_recur": 2, "input_injection": "linear"}


# fp8: the blocks' linears pass the reference's filter (both sizes >= 128) only from d_model 128
FP8_MODEL = dict(MODEL, d_model=128, n_head=2, n_kv_head=2)


def main(tp: int, pp: int, zero: int, optim: str, precision: str = "fp32") -> None:
    cfg = load_config(raw={"model": FP8_MODEL if precision == "fp8" else MODEL, "optim": {"name": optim},
                           "train": {"steps": 1, "seed": 1234, "device": "cpu", "micro_batch_size": 2,
                                     "grad_accum": 1},
                           "parallel": {"tp": tp, "pp": pp, "zero_stage": zero, "precision": precision}})
    built_on = []

    def builder(where):
        built_on.append(torch.device(where).type)
        model = build_model(cfg, where)
        fp8.convert_for_fp8(model, cfg, torch.device("cpu"))
        return model
    engine = build_engine(cfg, builder, torch.device("cpu"))
    rng_after = torch.get_rng_state()
    assert built_on == ["meta"], f"a parallel rank built the model on {built_on}, not the meta device"
    reference = dict(build_model(cfg).named_parameters())  # the single process's weights
    assert torch.equal(rng_after, torch.get_rng_state()), "the generator ended in another state than one process's"
    owned = set(getattr(engine, "owned_names", reference))
    checked = 0
    for name, p in engine.model.named_parameters():
        if name not in owned:
            assert p.numel() == 0, f"{name} belongs to another stage but holds {p.numel()} elements"
            continue
        local = _whole_local(p, zero)
        want = shard_of(p, reference[name])
        assert local.shape == want.shape, f"{name}: shape {tuple(local.shape)} != {tuple(want.shape)}"
        assert torch.equal(local, want), f"{name}: differs from the single process's (max |diff| " \
                                         f"{(local - want).abs().max().item():.3e})"
        checked += 1
    assert checked, "no parameter was checked"
    single = build_model(cfg)
    converted = fp8.convert_for_fp8(single, cfg, torch.device("cpu"))  # [] unless fp8
    in_float8 = sorted(n for n, m in engine.model.named_modules()
                       if fp8.config_of(m) is not None or getattr(m, "float8", None) is not None)
    assert in_float8 == sorted(converted), f"float8 linears {in_float8} != the single process's {converted}"
    blocks = cfg.model.n_prelude + cfg.model.n_recur_block + cfg.model.n_coda
    assert precision != "fp8" or len(converted) == 6 * blocks, converted  # q, k, v, o, fc, proj of each block
    # the optimizer sorts the rank's parameters into the single process's groups (a ZeRO-3
    # partition is flat: its group follows its parameter's own shape)
    by_id = {id(p): n for n, p in engine.model.named_parameters()}
    members = getattr(engine, "_members", None)  # DeepSpeed: the groups by name, before it flattened them
    got = ({g: sorted(n for n, _ in ps) for g, ps in members.items()} if members is not None else
           {g["name"]: sorted(by_id[id(p)] for p in g["params"]) for g in engine.optimizer.param_groups})
    want = {g["name"]: sorted(n for n, p in single.named_parameters() if n in owned and any(p is q for q in g["params"]))
            for g in param_groups(single, cfg.optim)}
    assert got == {g: ns for g, ns in want.items() if ns}, f"optimizer groups {got} != the single process's {want}"
    if zero == 3:  # a ZeRO-3 rank keeps a slice of every matrix (norm scales are persisted whole)
        sliced = [n for n, p in engine.model.named_parameters() if not p.ds_persist]
        assert sliced and all(p.ds_tensor.numel() < p.ds_numel for p in engine.model.parameters() if not p.ds_persist)
    print(f"rank {engine.rank}: {checked} parameters equal the single process's bit for bit; "
          f"{len(in_float8)} linears in float8")
    engine.close()


def _whole_local(p: torch.Tensor, zero: int) -> torch.Tensor:
    """This rank's TP-local tensor: under ZeRO-3 its partitions gathered over the DP ranks."""
    if zero != 3:
        return p.detach().clone()
    import deepspeed
    with deepspeed.zero.GatheredParameters([p]):
        return p.detach().clone()


if __name__ == "__main__":
    tp, pp, zero, optim = sys.argv[1:5]
    main(int(tp), int(pp), int(zero), optim, *sys.argv[5:6])
