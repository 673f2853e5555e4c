"""The bad-input matrix: every user mistake gets one clear error, a non-zero exit, no traceback,
and nothing written or overwritten.

Each case builds its inputs in a fresh folder, runs the real `megaloop` entry point in-process
(`megaloop.cli.main`), and checks: exit status 2, a one-line message on stderr that contains the
expected words, no traceback (one error; fit table errors list the offending rows under it), and the folder's files unchanged (same names, sizes and mtimes).
"""
import json
import os
import shutil

import pytest
import yaml

from conftest import tiny_raw, write_corpus
from megaloop.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run (with its data cache) that the checkpoint cases corrupt copies of."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(str(root / "corpus"))
    raw = tiny_raw(corpus, str(root / "cache"), str(root / "run"), steps=2)
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(root / "cfg.yaml")]) == 0
    return root, raw


def snapshot(folder):
    """{path: (size, mtime)}; a run's lock file counts by its content only: a refused start may take
    and release the lock (it names its holder meanwhile), and must leave it empty, as it found it."""
    out = {}
    for dp, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dp, f)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = open(p).read() if f == ".lock" else (st.st_size, st.st_mtime_ns)
    return out


def write_cfg(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return str(path)


# Each case: (name, setup(root, trained) -> argv, expected words in the message)
def _cfg_case(**sets):
    def setup(root, tr):
        base, raw = tr
        argv = ["train", write_cfg(root / "c.yaml", dict(raw, train=dict(raw["train"], run_dir=str(root / "new"))))]
        for k, v in sets.items():
            argv += ["--set", f"{k.replace('__', '.')}={v}"]
        return argv
    return setup


def _copy_run(root, tr):
    base, raw = tr
    shutil.copytree(base / "run", root / "run")
    raw = dict(raw, train=dict(raw["train"], run_dir=str(root / "run")))
    return raw


def corrupt_checkpoint(root, tr):
    raw = _copy_run(root, tr)
    latest = open(root / "run" / "checkpoints" / "latest").read().strip()
    (root / "run" / "checkpoints" / latest / "model.pt").write_bytes(b"not a checkpoint")
    return ["train", write_cfg(root / "c.yaml", raw), "--resume"]


def dangling_latest(root, tr):
    raw = _copy_run(root, tr)
    (root / "run" / "checkpoints" / "latest").write_text("step_00000099")
    return ["train", write_cfg(root / "c.yaml", raw), "--resume"]


def changed_shape_resume(root, tr):
    raw = _copy_run(root, tr)
    raw["model"] = dict(raw["model"], n_recur_block=2)
    return ["train", write_cfg(root / "c.yaml", raw), "--resume"]


def existing_run_without_resume(root, tr):
    return ["train", write_cfg(root / "c.yaml", _copy_run(root, tr))]


def unwritable_run_dir(root, tr):
    base, raw = tr
    (root / "afile").write_text("x")
    return ["train", write_cfg(root / "c.yaml", dict(raw, train=dict(raw["train"], run_dir=str(root / "afile" / "run"))))]


def dataset_case(mutate):
    def setup(root, tr):
        base, raw = tr
        cache = next(p for p in (base / "cache").iterdir() if p.is_dir() and not p.name.startswith("."))
        shutil.copytree(cache, root / "ds")
        mutate(root / "ds")
        data = dict(raw["data"], tokenizer=str(root / "ds" / "tokenizer.model"),
                    train=[{"path": str(root / "ds" / "train"), "weight": 1.0}], valid=str(root / "ds" / "valid"))
        return ["train", write_cfg(root / "c.yaml", dict(raw, data=data, train=dict(raw["train"], run_dir=str(root / "new"))))]
    return setup


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def wrong_vocab(root, tr):
    setup = dataset_case(lambda d: None)
    argv = setup(root, tr)
    return argv + ["--set", "model.vocab_size=512"]


def invalid_yaml(root, tr):
    (root / "c.yaml").write_text("model: [")
    return ["train", str(root / "c.yaml")]


def corrupt_tokenizer(root, tr):
    (root / "bad.model").write_bytes(b"garbage")
    return ["preprocess", "--input", str(tr[0] / "corpus" / "tiny.txt.gz"), "--tokenizer", str(root / "bad.model"),
            "--out-dir", str(root / "o")]


def fit_table(rows, header="n_once,n_rec,r,tokens,loss"):
    def setup(root, tr):
        (root / "t.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
        return ["fit", str(root / "t.csv"), "--bootstrap", "0"]
    return setup


GOOD = ["1e6,2e6,2,1e9,3.1", "2e6,3e6,4,2e9,2.9"]
CASES = [
    # config
    ("unknown key", _cfg_case(model__d_modle=64), "unknown config key 'model.d_modle'"),
    ("r below 1", _cfg_case(model__num_recur=0), "num_recur"),
    ("bptt_k above r", _cfg_case(model__bptt_k=5), "bptt_k=5"),
    ("heads do not divide width", _cfg_case(model__n_head=3), "does not divide model.d_model"),
    ("unknown injection", _cfg_case(model__input_injection="gated"), "input_injection='gated' is unknown"),
    ("two budgets", _cfg_case(train__tokens=1000), "exactly one of"),
    ("non-numeric value", _cfg_case(model__d_model="wide"), "expected an integer"),
    ("budget below one step", _cfg_case(train__steps="null", train__target_flops=10), "less than one step"),
    ("missing config file", lambda root, tr: ["train", str(root / "nope.yaml")], "config file not found"),
    ("invalid yaml", invalid_yaml, "not valid YAML"),
    # launch / layout
    ("tp without processes", _cfg_case(parallel__tp=2), "needs 2 processes"),
    ("tp not dividing heads", _cfg_case(parallel__tp=3), "parallel.tp=3"),
    # data
    ("missing corpus", _cfg_case(**{"data__corpus": "[" + "/nonexistent/*.txt" + "]"}), "nonexistent"),
    ("missing tokenizer file", _cfg_case(data__tokenizer="/nonexistent/tok.model"), "tok.model"),
    ("truncated .bin", dataset_case(lambda d: truncate(d / "train.bin")), "train"),
    ("truncated .idx", dataset_case(lambda d: truncate(d / "train.idx")), "train"),
    ("corrupt .idx magic", dataset_case(lambda d: open(d / "valid.idx", "r+b").write(b"XXXXXXXX")), "valid"),
    ("wrong vocab between tokenizer and model", wrong_vocab, "vocab"),
    # tokenizer / preprocess
    ("tokenizer input missing", lambda root, tr: ["tokenizer", "--input", str(root / "none.txt"), "--out", str(root / "tok"), "--vocab-size", "512"], "none.txt"),
    ("corrupt tokenizer model", corrupt_tokenizer, "bad.model"),
    # checkpoint
    ("corrupt checkpoint", corrupt_checkpoint, "corrupt"),
    ("latest names a missing checkpoint", dangling_latest, "not a complete checkpoint"),
    ("resume with a changed model", changed_shape_resume, "model.n_recur_block"),
    ("existing run without --resume", existing_run_without_resume, "already holds a run"),
    ("unwritable run dir", unwritable_run_dir, "run_dir"),
    ("eval on a non-run folder", lambda root, tr: ["eval", str(root)], "not a run directory"),
    # fit
    ("fit: missing column", fit_table(["1e6,2,1e9,3.1"], header="n_once,r,tokens,loss"), "n_rec"),
    ("fit: NaN loss", fit_table(GOOD + ["1e6,2e6,2,3e9,nan"]), "row"),
    ("fit: non-positive tokens", fit_table(GOOD + ["1e6,2e6,2,-5,3.0"]), "tokens"),
    ("fit: duplicate run", fit_table(["a,1e6,2e6,2,1e9,3.1", "a,2e6,3e6,4,2e9,2.9"], header="run,n_once,n_rec,r,tokens,loss"), "duplicate"),
]


@pytest.mark.parametrize("name,setup,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, setup, expected, trained, tmp_path, capsys):
    root = tmp_path / "case"
    root.mkdir()
    argv = setup(root, trained)
    before, trained_before = snapshot(root), snapshot(trained[0])
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"{name}: exit {code}, stderr: {err}"
    assert expected.lower() in err.lower(), f"{name}: {err}"
    assert "Traceback" not in err
    assert err.lower().count("error:") == 1, err  # one error (a table error may list its rows below it)
    assert snapshot(root) == before, f"{name}: files changed"
    assert snapshot(trained[0]) == trained_before


def test_matrix_has_at_least_20_cases():
    assert len(CASES) >= 20
