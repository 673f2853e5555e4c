"""The bad-input matrix: every user mistake gets one clear error, a non-zero exit, no traceback,
and nothing written or overwritten.

Each case builds its inputs in a fresh folder (many hold a copy of a finished run, so there is a
run and its checkpoints to damage), runs the real `megaloop` entry point in-process
(`megaloop.cli.main`) or, for the launch scripts, the script itself, and checks: the exit status
(2, or 0 where the answer is plain information), a one-line message that contains the expected
words, no traceback (one error; fit table errors list the offending rows under it), and every
pre-existing file of the case folder and of the shared finished run (and its data cache)
unchanged: the same names, sizes, mtimes and SHA-256 checksums, with no file added.
"""
import hashlib
import json
import os
import shutil
import subprocess

import gzip

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
    """{path: (size, mtime, sha256)} and every folder; a run's lock file counts by its content only:
    a refused start may take and release the lock (it names its holder meanwhile), and must leave it
    empty, as it found it."""
    out = {}
    for dp, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(dp, d), folder) + "/"] = "dir"
        for f in files:
            p = os.path.join(dp, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.relpath(p, folder)] = digest if f == ".lock" else (st.st_size, st.st_mtime_ns, digest)
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
    (root / "run" / "checkpoints" / latest / "state" / "__0_0.distcp").write_bytes(b"not a checkpoint")
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


def run_copy(root, tr):
    """A copy of the finished run at root/run (the case's files to protect)."""
    _copy_run(root, tr)
    return str(root / "run")


def export_case(out, force=True, cmd=("export",), src=None):
    """export / checkpoint convert of root/run (or `src`) to `out` (a function of root)."""
    def setup(root, tr):
        run = run_copy(root, tr)
        argv = [*cmd, src(root) if src else run, "--out", str(out(root))]
        return argv + (["--force"] if force else [])
    return setup


def with_run(*args):
    """`args` with RUN replaced by a copy of the finished run."""
    def setup(root, tr):
        run = run_copy(root, tr)
        return [run if a == "RUN" else a for a in args]
    return setup


def corpus_case(filename, content, command="train"):
    """A corpus of one file; `train` builds the data in the shared run's cache (a failed build must
    leave nothing there), `tokenizer` / `preprocess` read it directly."""
    def setup(root, tr):
        base, raw = tr
        path = root / filename
        path.write_bytes(content)
        if command == "tokenizer":
            return ["tokenizer", "--input", str(path), "--out", str(root / "tok"), "--vocab-size", "512"]
        if command == "preprocess":
            tok = next(p for p in (base / "cache").iterdir() if p.is_dir() and not p.name.startswith("."))
            return ["preprocess", "--input", str(path), "--tokenizer", str(tok / "tokenizer.model"),
                    "--out-dir", str(root / "ds")]
        data = dict(raw["data"], corpus=[str(path)])
        return ["train", write_cfg(root / "c.yaml", dict(raw, data=data, train=dict(raw["train"], run_dir=str(root / "new"))))]
    return setup


def config_text(text, command="train"):
    def setup(root, tr):
        (root / "c.yaml").write_text(text)
        return [command, str(root / "c.yaml")]
    return setup


def resume_missing(root, tr):
    base, raw = tr
    return ["train", write_cfg(root / "c.yaml", dict(raw, train=dict(raw["train"], run_dir=str(root / "typo")))),
            "--resume"]


def launcher(script, *args):
    def setup(root, tr):
        (root / "c.yaml").write_text("train: {steps: 1}\n")
        return ["bash", os.path.join(REPO, "launch", script)] + [str(root / "c.yaml") if a == "CFG" else a for a in args]
    return setup


def no_checkpoints(root, tr):
    (root / "run").mkdir()
    (root / "run" / "config.yaml").write_text("train: {steps: 1}\n")
    return ["checkpoint", "info", str(root / "run")]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    # export / convert never destroy their source
    ("export onto its run with --force", export_case(lambda r: r / "run"), "is the source"),
    ("export into its run's checkpoints with --force", export_case(lambda r: r / "run" / "checkpoints"), "is inside the source"),
    ("export into a new folder inside its run", export_case(lambda r: r / "run" / "export", force=False), "is inside the source"),
    ("export onto the folder that holds its run", export_case(lambda r: r), "holds the source"),
    ("export onto its run without --force", export_case(lambda r: r / "run", force=False), "is the source"),
    ("export onto a file", export_case(lambda r: (r / "afile").write_text("x") and r / "afile"), "is a file"),
    ("hf export onto its run with --force", export_case(lambda r: r / "run", cmd=("export", "--format", "hf")), "is the source"),
    ("hf export into its run with --force", export_case(lambda r: r / "run" / "checkpoints", cmd=("export", "--format", "hf")),
     "is inside the source"),
    ("convert onto its run with --force", export_case(lambda r: r / "run", cmd=("checkpoint", "convert")), "is the source"),
    ("convert a checkpoint onto a sibling folder of its run",
     export_case(lambda r: r / "run" / "checkpoints" / "converted",
                 cmd=("checkpoint", "convert"), src=lambda r: str(r / "run" / "checkpoints" / "step_00000002")),
     "is inside the source"),
    # resume
    ("--resume with a run_dir that does not exist", resume_missing, "typo does not exist"),
    # corpora
    ("empty corpus file", corpus_case("empty.txt", b""), "empty.txt is empty"),
    ("corpus of blank lines", corpus_case("blank.jsonl", b"\n\n  \n"), "blank.jsonl is empty"),
    ("invalid JSON line", corpus_case("c.jsonl", b'{"text": "a b"}\n{"text": oops}\n'), "c.jsonl:2: not valid JSON"),
    ("JSON line without the text key", corpus_case("c.jsonl", b'{"body": "a b"}\n', "tokenizer"), 'c.jsonl:1: no "text" field'),
    ("tokenizer on an empty file", corpus_case("empty.txt", b"", "tokenizer"), "empty.txt is empty"),
    ("preprocess of an empty file", corpus_case("empty.txt.gz", gzip.compress(b""), "preprocess"), "empty.txt.gz is empty"),
    ("invalid JSON line for the tokenizer", corpus_case("c.jsonl", b'{"text": "a"}\n[1,\n', "tokenizer"), "c.jsonl:2"),
    # checkpoint info
    ("checkpoint info on a missing folder", lambda root, tr: ["checkpoint", "info", str(root / "nope")], "nope does not exist"),
    ("checkpoint info on a file", lambda root, tr: ["checkpoint", "info", write_cfg(root / "c.yaml", {})], "not a folder"),
    ("checkpoint info without checkpoints", no_checkpoints, "no checkpoints", 0),
    # ranges of generate / eval
    ("generate --max-new-tokens -3", with_run("generate", "RUN", "--max-new-tokens", "-3"), "--max-new-tokens must be >= 1"),
    ("generate --max-new-tokens 0", with_run("generate", "RUN", "--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    ("generate --temperature -1", with_run("generate", "RUN", "--temperature", "-1"), "--temperature must be a finite number >= 0"),
    ("generate --temperature nan", with_run("generate", "RUN", "--temperature", "nan"), "--temperature must be a finite number"),
    ("generate --top-k 0", with_run("generate", "RUN", "--top-k", "0"), "--top-k must be >= 1"),
    ("generate --recur 0", with_run("generate", "RUN", "--recur", "0"), "--recur must be >= 1"),
    ("eval --tokens -5", with_run("eval", "RUN", "--tokens", "-5"), "--tokens must be a positive number"),
    ("eval --tokens 0", with_run("eval", "RUN", "--tokens", "0"), "--tokens must be a positive number"),
    ("eval --recur 0", with_run("eval", "RUN", "--recur", "0"), "--recur values must be >= 1"),
    # launch scripts
    ("torchrun.sh --nproc without a value", launcher("torchrun.sh", "--dry-run", "--nproc"), "--nproc needs a value"),
    ("torchrun.sh --nproc abc", launcher("torchrun.sh", "--dry-run", "--nproc", "abc", "CFG"), "positive whole number"),
    ("torchrun.sh --nproc 0", launcher("torchrun.sh", "--dry-run", "--nproc", "0", "CFG"), "positive whole number"),
    ("torchrun.sh unknown option", launcher("torchrun.sh", "--dry-run", "--gpus", "2", "CFG"), "unknown option --gpus"),
    ("torchrun.sh without a config", launcher("torchrun.sh", "--nproc", "2"), "no CONFIG given"),
    ("torchrun.sh with a missing config", launcher("torchrun.sh", "--nproc", "2", "nope.yaml"), "config file not found: nope.yaml"),
    ("deepspeed.sh --hostfile without a value", launcher("deepspeed.sh", "--dry-run", "--hostfile"), "--hostfile needs a value"),
    # configs
    ("empty config file", config_text(""), "is empty"),
    ("config of comments only", config_text("# nothing yet\n"), "is empty"),
    ("params of an empty config", config_text("", "params"), "is empty"),
    ("unknown on_divergence", _cfg_case(train__on_divergence="retry"), "train.on_divergence must be rewind or stop"),
    ("spike factor not above 1", _cfg_case(train__spike_factor=1), "train.spike_factor must be above 1"),
    ("rewind lr scale 0", _cfg_case(train__rewind_lr_scale=0), "train.rewind_lr_scale must be in (0, 1]"),
    ("negative max_rewinds", _cfg_case(train__max_rewinds=-1), "train.max_rewinds must be >= 0"),
    ("empty spike window", _cfg_case(train__spike_window=0), "train.spike_window must be >= 1"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, trained, tmp_path, capsys):
    name, setup, expected = case[:3]
    want = case[3] if len(case) > 3 else 2
    root = tmp_path / "case"
    root.mkdir()
    argv = setup(root, trained)
    before, trained_before = snapshot(root), snapshot(trained[0])
    capsys.readouterr()
    if argv[0] == "bash":  # a launch script: its own process
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=root)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
        assert len(err.strip().splitlines()) == 1, err
    else:
        code = main(argv)
        out, err = capsys.readouterr()
        if want == 2:
            assert err.lower().count("error:") == 1, err  # one error (a table error may list its rows below it)
    assert code == want, f"{name}: exit {code}, stdout: {out} stderr: {err}"
    assert expected.lower() in (err if want else out + err).lower(), f"{name}: {err}"
    assert "Traceback" not in err + out
    assert snapshot(root) == before, f"{name}: files changed"
    assert snapshot(trained[0]) == trained_before, f"{name}: the shared run or its data cache changed"


def test_matrix_has_at_least_45_cases():
    assert len(CASES) >= 45


def test_unigram_gap_wording():
    """Contract: the end-of-run line says how far the model is from the unigram entropy, 'below'
    when the loss is lower (better) and 'above' when it is higher."""
    from megaloop.cli import _gap
    assert _gap(4.4497, 6.0226) == "1.573 nats below it"
    assert _gap(4.6608, 3.6256) == "1.035 nats above it"
