"""Shared fixtures: a tiny text corpus and a tiny training config that runs in seconds on CPU."""
import gzip
import os
import random

# The kernel tests run Triton under its interpreter on the CPU, which works only when
# TRITON_INTERPRET=1 is set before anything imports triton. torchao and megatron-core import it
# too, from test modules collected before the kernel tests, so it is set here, before collection.
# (MEGALOOP_TEST_DEVICE=cuda runs the compiled kernels instead: kernels/testing.py.)
if os.environ.get("MEGALOOP_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

WORDS = ("the king queen castle night sword love death crown heart speak lord lady honour fair "
         "sweet time world friend blood hand eye fool good noble true man woman war peace").split()


def write_corpus(folder, n_docs=60, seed=0):
    """Deterministic pseudo-English documents with some structure, gzip-compressed."""
    rng = random.Random(seed)
    vocab = WORDS + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                     for _ in range(400)]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tiny.txt.gz")
    docs = []
    for d in range(n_docs):
        lines = []
        for _ in range(rng.randint(8, 20)):
            w = [rng.choice(vocab) for _ in range(rng.randint(4, 12))]
            lines.append(" ".join(w).capitalize() + rng.choice([".", "!", "?", ","]))
        docs.append(f"Document {d}\n\n" + "\n".join(lines))
    with gzip.open(path, "wt") as f:
        f.write("\n\f\n".join(docs))  # form feed line = document boundary
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny_raw(corpus, cache, run_dir, **train):
    t = dict(steps=6, micro_batch_size=4, grad_accum=1, seed=3, run_dir=run_dir, log_every=1,
             eval_tokens=512, save_every=0, progress=False)
    t.update(train)
    return {
        "model": dict(d_model=32, n_head=2, vocab_size=384, seq_len=32, n_prelude=1, n_recur_block=1,
                      n_coda=1, num_recur=2),
        "optim": dict(name="muon", lr=0.02, warmup_steps=2),
        "train": t,
        "data": dict(corpus=[corpus], cache_dir=cache, workers=1, valid_fraction=0.1),
    }


# ---- a real single-host SLURM for the tests marked `slurm` (scripts/slurm_local.sh) ----
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

SLURM_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "slurm_local.sh")


def pytest_collection_modifyitems(config, items):
    # One xdist worker runs every slurm test, one after another: they share one scheduler and its
    # CPUs, and the worker that started the daemons is the one that stops them.
    # The multihost tests share one test cluster per module, in one worker, the same way.
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif item.get_closest_marker("multihost"):
            item.add_marker(pytest.mark.xdist_group("multihost"))
        if item.get_closest_marker("slurm") or item.get_closest_marker("multihost"):
            item.add_marker(pytest.mark.slow)  # real schedulers and several hosts are never quick


try:
    from xdist.scheduler import LoadGroupScheduling
except ImportError:  # no xdist: tests run in one process anyway
    LoadGroupScheduling = None
if LoadGroupScheduling is not None:
    def pytest_xdist_make_scheduler(config, log):
        if config.getoption("dist") == "load":  # `-n N` alone: honour the group above
            return LoadGroupScheduling(config, log)
        return None


class SlurmCluster:
    """Clients of the local cluster: `env` carries SLURM_CONF and this Python's bin dir on PATH."""

    def __init__(self, env: dict):
        self.env = env

    def run(self, *cmd, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True,
                             timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr[-2000:]}")
        return res

    def sbatch(self, *args, env=None, cwd=None) -> str:
        """Submit; returns the job id."""
        return self.run("sbatch", "--parsable", *args, env=env or self.env, cwd=cwd).stdout.strip().split(";")[0]

    def in_queue(self, job: str) -> list[str]:
        """'JOBID STATE' of the job's tasks still pending, running or completing."""
        res = self.run("squeue", "--noheader", "--array", f"--jobs={job}", "--format=%i %T", check=False)
        return [ln for ln in res.stdout.splitlines() if ln.strip()]

    def wait(self, job: str, timeout: float = 300) -> None:
        import time
        end = time.monotonic() + timeout
        while self.in_queue(job):
            if time.monotonic() > end:
                self.run("scancel", job, check=False)
                raise AssertionError(f"SLURM job {job} still queued or running after {timeout} s")
            time.sleep(0.5)

    def states(self, job: str) -> dict[str, tuple[str, str]]:
        """{'JOB' or 'JOB_TASK': (JobState, ExitCode)} while the controller remembers the job."""
        out = {}
        for line in self.run("scontrol", "--oneliner", "show", "job", job, check=False).stdout.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            key = f"{f['ArrayJobId']}_{f['ArrayTaskId']}" if "ArrayTaskId" in f else f.get("JobId", "?")
            out[key] = (f.get("JobState", "?"), f.get("ExitCode", "?"))
        return out


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-host SLURM: reused when it is up, else started here and stopped at the end.
    Skips (with the reason) where SLURM is not installed or cannot be started on this machine
    (not root); fails when it is installed and still does not come up."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed (no sbatch/slurmctld): `sudo scripts/slurm_local.sh install` "
                    "sets up a single-host cluster with apt-get")
    conf = subprocess.run([SLURM_SCRIPT, "env"], capture_output=True, text=True, check=True).stdout
    env = dict(os.environ, SLURM_CONF=conf.strip().split("=", 1)[1])
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    started = False
    if subprocess.run([SLURM_SCRIPT, "status"], env=env, capture_output=True).returncode != 0:
        res = subprocess.run([SLURM_SCRIPT, "start"], env=env, capture_output=True, text=True, timeout=120)
        if res.returncode == 3:
            pytest.skip(f"cannot start SLURM here: {res.stderr.strip()}")
        assert res.returncode == 0, f"scripts/slurm_local.sh start failed: {res.stdout}{res.stderr}"
        started = True
    yield SlurmCluster(env)
    if started:
        subprocess.run([SLURM_SCRIPT, "stop"], env=env, capture_output=True, timeout=120)
