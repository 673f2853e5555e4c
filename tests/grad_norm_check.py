"""Run as N ranks, or as one process (tests/test_grad_norm.py): one training step of the model of
`config()` on the fixed batches of `batches()` under TP x PP, through `build_engine` as
`megaloop train` builds it; prints the step's loss and grad norm as one JSON line per rank.

    python tests/grad_norm_check.py TP PP
"""
import json
import sys

import torch

from megaloop.config import load_config
from megaloop.parallel import build_engine
from megaloop.train import build_model

# vocab 32,768 as the reference grid's: the head's gradient (2.1 M entries at d_model 64) is the
# tensor whose float32 norm on a CPU loses ~1e-4 to 1e-3 (torch_engine.sum_of_squares)
MODEL = {"d_model": 64, "n_head": 2, "n_kv_head": 2, "vocab_size": 32768, "seq_len": 32, "n_prelude": 1,
         "n_recur_block": 2, "n_coda": 1, "num_recur": 2, "input_injection": "linear"}


def config(tp: int = 1, pp: int = 1):
    return load_config(raw={"model": MODEL, "optim": {"name": "muonh", "grad_clip": 1.0},
                            "train": {"steps": 1, "seed": 1234, "device": "cpu", "micro_batch_size": 2,
                                      "grad_accum": 2},
                            "parallel": {"tp": tp, "pp": pp}})


def batches(cfg) -> list:
    g = torch.Generator().manual_seed(7)
    shape = (cfg.train.micro_batch_size, cfg.model.seq_len)
    return [(torch.randint(0, cfg.model.vocab_size, shape, generator=g),
             torch.randint(0, cfg.model.vocab_size, shape, generator=g)) for _ in range(cfg.train.grad_accum)]


def main(tp: int, pp: int) -> None:
    cfg = config(tp, pp)
    engine = build_engine(cfg, lambda where: build_model(cfg, where), torch.device("cpu"))
    stats = engine.train_step(batches(cfg), 1.0)
    print(json.dumps({"rank": engine.rank, "loss": stats.loss, "grad_norm": stats.grad_norm}))
    engine.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
