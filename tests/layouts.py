"""Train the tiny looped model through `megaloop train` under a parallel layout, and compare runs.

The layout tests run the command users run: `megaloop train CONFIG --set ...` on N local ranks
(megaloop.parallel.testing.spawn: torchrun's variables, gloo on CPU) over a tiny tokenized
corpus on disk, and read what the run leaves behind: metrics.jsonl (each step's loss, grad norm
and r), summary.json (the final validation loss) and the weights of its latest checkpoint (as
`megaloop eval` / `export` load them). A resumed run starts from a copy of another run's
checkpoint, the way a user resumes a run directory under another layout.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import numpy as np
import torch
import yaml

from megaloop import checkpoint as ckpt
from megaloop.param_names import VOCAB_PARAMS
from megaloop.parallel.testing import spawn

# d_model 32, 4 heads / 2 kv heads, vocab 101 (which no TP size divides), prelude 1 / recur 1 /
# coda 1, linear injection at r = 2; 5 steps of 2 micro-batches of 2 sequences.
TINY = {
    "model": dict(d_model=32, n_head=4, n_kv_head=2, vocab_size=101, seq_len=16, n_prelude=1, n_recur_block=1,
                  n_coda=1, num_recur=2, input_injection="linear"),
    # embed_lr 0.02 (x (32/512)^-0.5 = 0.08): the default 0.2 is tuned for d_model >= 512
    "optim": dict(name="muon", lr=0.02, embed_lr=0.02, grad_clip=1.0, warmup_steps=0, final_lr_frac=0.1),
    "train": dict(steps=5, micro_batch_size=2, grad_accum=2, seed=1234, progress=False, device="cpu", threads=1,
                  log_every=1, eval_every=0, eval_tokens=128, save_every=0, keep_checkpoints=5),
    "logging": dict(peak_flops=1e12),  # MFU against a fixed peak: no matmul measurement on every rank
}
MUONH = ["optim.name=muonh", "optim.lr=0.014"]
ADAM = ["optim.name=adamw", "optim.lr=0.01"]
LOSS_RTOL = 1e-5
# fp32 reduction order differs across layouts and Adam's normalisation amplifies it on
# near-zero gradient entries, so parameters are compared by relative norm, not bit for bit. The
# embedding and head are AdamW over vocabulary rows, and a row that a step sees for the first
# time gets AdamW's first update, lr * sign(g) per entry: an entry whose gradient nearly cancels
# (|g| ~ 1e-7 of its row's) can take opposite signs under two reduction orders and move by 2 lr
# (measured: one entry of 3,232, after DP=2). Hence 5e-3 there; the validation loss checks what
# the final weights compute to 1e-5, and a layout that shards or gathers them wrongly moves
# them by O(1).
PARAM_RTOL = 5e-5
VOCAB_RTOL = 5e-3


def token_data(folder: str, seed: int = 5) -> dict:
    """A tiny tokenized corpus (train and valid datasets in megaloop's indexed format) in `folder`,
    written once; returns the config's `data` section that points `megaloop train` at it. The
    documents follow a sparse Markov chain (three successors per token), so the loss falls from
    the first steps and a layout that computed another gradient shows in the losses."""
    from megaloop.data.indexed import IndexedDatasetWriter

    out = {"train": [os.path.join(folder, "train")], "valid": os.path.join(folder, "valid")}
    if os.path.isfile(out["valid"] + ".idx"):
        return out
    rng = np.random.default_rng(seed)
    vocab = TINY["model"]["vocab_size"]
    succ = rng.integers(1, vocab, size=(vocab, 3))
    for prefix, docs in ((out["train"][0], 40), (out["valid"], 12)):
        with IndexedDatasetWriter(prefix, vocab, 0) as w:
            for _ in range(docs):
                doc = [int(rng.integers(1, vocab))]
                for _ in range(int(rng.integers(20, 80)) - 1):
                    doc.append(int(succ[doc[-1], rng.integers(3)]))
                w.add_document(np.array(doc))
    return out


class Run:
    """What a finished `megaloop train` left in its run directory."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    @property
    def steps(self) -> list[dict]:
        with open(os.path.join(self.run_dir, "metrics.jsonl")) as f:
            return [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r]

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.steps]

    @property
    def num_recur(self) -> list[int]:
        return [r["num_recur"] for r in self.steps]

    @property
    def summary(self) -> dict:
        with open(os.path.join(self.run_dir, "summary.json")) as f:
            return json.load(f)

    def weights(self) -> dict:
        """The plain model's weights from the latest checkpoint, whatever layout wrote it."""
        from megaloop.pretrained import load_pretrained
        return load_pretrained(self.run_dir)[0].state_dict()

    def checkpoint(self, step: int) -> str:
        return os.path.join(ckpt.ckpt_root(self.run_dir), ckpt.step_dir_name(step))


def train(nproc: int, run_dir: str, overrides: list[str], data: dict, resume: bool = False,
          timeout: float = 300, env: Optional[dict] = None) -> Run:
    """`megaloop train` of the tiny model on `nproc` ranks with `--set` overrides; fails the test
    with the ranks' output when any rank fails."""
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["train"]["run_dir"] = run_dir
    raw["data"] = data
    cfg = f"{run_dir.rstrip('/')}.yaml"
    with open(cfg, "w") as f:
        yaml.safe_dump(raw, f)
    args = ["train", cfg, *[a for o in overrides for a in ("--set", o)], *(["--resume"] if resume else [])]
    if nproc == 1 and env is None:  # the command in this process: the same code, without paying its imports again
        from megaloop.cli import main
        threads = torch.get_num_threads()
        try:
            assert main(args) == 0, f"`megaloop {' '.join(args)}` failed (its error is printed above)"
        finally:
            torch.set_num_threads(threads)
        return Run(run_dir)
    res = spawn(nproc, args, timeout=timeout, env=env)
    for rank, r in enumerate(res):
        assert r.returncode == 0, f"rank {rank} of `megaloop {' '.join(args)}` exited {r.returncode}:\n{r.stdout[-6000:]}"
    return Run(run_dir)


def resumable(checkpoint: str, like: Run, run_dir: str) -> str:
    """A run directory whose only checkpoint (and `latest`) is a copy of the checkpoint folder
    `checkpoint`, with the config and metrics of `like` (the run that trained it): what
    `megaloop train --resume` continues, under any layout."""
    step = ckpt.read_meta(checkpoint)["step"]
    root = ckpt.ckpt_root(run_dir)
    os.makedirs(root)
    shutil.copytree(checkpoint, os.path.join(root, ckpt.step_dir_name(step)))
    ckpt.write_atomic(os.path.join(root, "latest"), ckpt.step_dir_name(step).encode())
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(os.path.join(like.run_dir, name), os.path.join(run_dir, name))
    return run_dir


def assert_same(ref: Run, out: Run, label: str, from_step: int = 0) -> dict:
    """Every step's loss (after `from_step`) equal to LOSS_RTOL relative, the final weights to
    PARAM_RTOL (VOCAB_RTOL for the embedding and head; relative norm per tensor), the final
    validation loss to LOSS_RTOL. Returns the largest relative differences found."""
    want, got = ref.losses[from_step:], out.losses[from_step:]
    assert len(got) == len(want) == ref.summary["steps"] - from_step, f"{label}: {got} vs {want}"
    for step, (x, y) in enumerate(zip(want, got), from_step + 1):
        assert abs(x - y) <= LOSS_RTOL * abs(x), f"{label}: step {step} loss {y} vs single-process {x}"
    found = dict(loss=max(abs(x - y) / abs(x) for x, y in zip(want, got)), weights=0.0, vocab=0.0)
    pa, pb = ref.weights(), out.weights()
    assert pa.keys() == pb.keys(), f"{label}: state dict keys differ: {set(pa) ^ set(pb)}"
    for k in pa:
        assert pa[k].shape == pb[k].shape, f"{label}: {k} shape {tuple(pb[k].shape)} vs {tuple(pa[k].shape)}"
        rel = float((pa[k] - pb[k]).norm() / pa[k].norm().clamp(min=1e-12))
        tol, kind = (VOCAB_RTOL, "vocab") if k in VOCAB_PARAMS else (PARAM_RTOL, "weights")
        assert rel <= tol, f"{label}: parameter {k} differs by {rel:.2e} (relative norm; tolerance {tol:.0e})"
        found[kind] = max(found[kind], rel)
    a, b = ref.summary["val_loss"], out.summary["val_loss"]
    assert abs(a - b) <= LOSS_RTOL * abs(a), f"{label}: validation loss {b} vs single-process {a}"
    found["val_loss"] = abs(a - b) / abs(a)
    return found


def assert_resumed(full: Run, resumed: Run, from_step: int, label: str) -> None:
    """The resumed run's steps after `from_step` are the uninterrupted run's, bit for bit."""
    want, got = full.losses[from_step:], resumed.losses[from_step:]
    assert got == want and len(got) == full.summary["steps"] - from_step, \
        f"{label}: resumed steps {got} differ from the uninterrupted run {want}"
    assert resumed.losses[:from_step] == full.losses[:from_step], f"{label}: metrics before the resume changed"


_REFS: dict = {}


def reference(root: str, overrides: list[str], data: dict) -> Run:
    """The single-process run with `overrides` on `data`, trained once per test session."""
    key = (tuple(overrides), data["valid"])
    if key not in _REFS:
        _REFS[key] = train(1, os.path.join(root, f"ref{len(_REFS)}"), overrides, data)
    return _REFS[key]


def check_layouts(nproc: int, root: str, cases: dict, data: dict, resume: tuple = (),
                  timeout: float = 300) -> dict:
    """Each case: name -> (overrides of the parallel run, overrides of its single-process
    reference with the same global batch). Every case must equal its reference (assert_same);
    the cases named in `resume` also save after step 3 and must resume from there bit for bit.
    Returns {name: (run, reference)}."""
    out = {}
    for name, (over, ref_over) in cases.items():
        save = ["train.save_every=3"] if name in resume else []
        run = train(nproc, os.path.join(root, name), [*over, *save], data, timeout=timeout)
        ref = reference(root, ref_over, data)
        found = assert_same(ref, run, name)
        print(f"parity {name}: " + " ".join(f"{k} {v:.1e}" for k, v in found.items()))
        if name in resume:
            again = resumable(run.checkpoint(3), run, os.path.join(root, name + "_resumed"))
            assert_resumed(run, train(nproc, again, [*over, *save], data, resume=True, timeout=timeout), 3, name)
        out[name] = (run, ref)
    return out
