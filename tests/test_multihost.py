"""Two hosts for real: `megaloop train` across the hosts of the test cluster (scripts/testcluster.sh).

Each host is a network, UTS and mount namespace with its own host name, interface (eth0) and
address in 127.77.0.0/24, joined to the others by a bridge; jobs start `launch/torchrun.sh
--nnodes 2` on every host, meeting at torchrun's c10d rendezvous on the first host named, the
collectives on gloo through eth0. The hosts share this machine's disk, so the run directory is
one shared directory. The reference is always independent of the hosts: the single-process run
of tests/layouts.py (parity to 1e-5), or the uninterrupted run (resumes bit for bit).

Default run: one test per point of the contract; MEGALOOP_MULTIHOST_ALL=1 runs them all (the
other layouts and failure cases). Every job is bounded in time; the cluster is torn down by the
module fixture's finalizer, whatever happens. Needs root and `ip netns`; else skips with the reason.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from layouts import MUONH, Run, assert_resumed, assert_same, reference, resumable, token_data, train
from megaloop import checkpoint as ckpt
from megaloop.parallel.dcp_state import read_weights
from multihost import Cluster, Job, error_lines, unavailable, write_config

ALL = os.environ.get("MEGALOOP_MULTIHOST_ALL") == "1"
opt_in = pytest.mark.skipif(not ALL, reason="opt-in: MEGALOOP_MULTIHOST_ALL=1 runs it")
pytestmark = [pytest.mark.multihost, pytest.mark.slow]
EXIT_BOUND_S = 60       # every surviving rank exits this soon after a fault
BAD_INPUT_BOUND_S = 30  # a bad launch is refused this soon
JOB_TIMEOUT_S = 240
GA4 = ["train.grad_accum=4"]  # the single process's batch = DP=2 x grad_accum 2

_ports = iter(range(29500, 29999, 7))


@pytest.fixture(scope="module")
def cluster():
    why = unavailable()
    if why:
        pytest.skip(why)
    c = Cluster(2)
    try:
        c.up()
    except RuntimeError as e:
        c.down()
        pytest.skip(f"cannot make the test cluster here: {e}")
    yield c
    c.down()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return token_data(str(tmp_path_factory.mktemp("tokens")))


def multi_train(cluster: Cluster, hosts: list[int], nproc: int, run_dir: str, overrides: list[str], data: dict,
                resume: bool = False, env: dict | None = None) -> Run:
    """`megaloop train` of the tiny model on `hosts` x `nproc` ranks (rendezvous on hosts[0])."""
    cfg = write_config(run_dir.rstrip("/") + ".yaml", run_dir, data, overrides)
    job = Job(cluster, hosts, nproc, [cfg, *(["--resume"] if resume else [])], run_dir.rstrip("/") + "_logs",
              port=next(_ports), env=env)
    job.check(JOB_TIMEOUT_S)
    return Run(run_dir)


# ------------------------------------------------------------------ 1. the cluster itself
def test_cluster_hosts_are_separate_machines(cluster):
    """Each host has its own host name, its own eth0 with its own 127.77.0.x address and nothing
    else but lo; it resolves the others' names through its own /etc/hosts and reaches them over
    the bridge; pulling a host's cable at the switch cuts it off, plugging it back reconnects; the
    machine's own network namespace holds none of these addresses."""
    listen = ("import socket,sys; s=socket.socket(); s.bind(('0.0.0.0', 4444)); s.listen(); "
              "\nwhile True:\n c,_=s.accept(); c.send(socket.gethostname().encode()); c.close()")
    connect = ("import socket,sys; c=socket.create_connection((sys.argv[1], 4444), timeout=3); "
               "print(c.recv(100).decode())")
    for i in range(2):
        out = cluster.run(i, "sh", "-c", "hostname; ip -o -4 addr show | awk '{print $2, $4}'").stdout.split("\n")
        assert out[0] == cluster.hosts[i]
        assert sorted(filter(None, out[1:])) == sorted([f"eth0 {cluster.addrs[i]}/24", "lo 127.0.0.1/8"])
    server = subprocess.Popen(cluster.argv(0, sys.executable, "-c", listen))
    try:
        time.sleep(0.5)
        got = cluster.run(1, sys.executable, "-c", connect, cluster.hosts[0], timeout=20)
        assert got.stdout.strip() == cluster.hosts[0], got.stderr
        cluster.link(1, "down")
        cut = cluster.run(1, sys.executable, "-c", connect, cluster.hosts[0], timeout=20)
        assert cut.returncode != 0 and "timed out" in cut.stderr, cut.stderr
        cluster.link(1, "up")
        # a port back on the bridge forwards again after a moment (until the neighbour entries of
        # the cut are resolved again: "no route to host"): retry for up to 15 s
        deadline = time.monotonic() + 15
        while True:
            again = cluster.run(1, sys.executable, "-c", connect, cluster.hosts[0], timeout=20)
            if again.stdout.strip() == cluster.hosts[0] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert again.stdout.strip() == cluster.hosts[0], again.stderr
    finally:
        server.kill()
        server.wait()
    root = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    assert "127.77." not in root


# ------------------------------------------------------------------ 2. layouts across hosts
# name: (hosts x ranks per host, overrides across hosts, the single process's overrides)
LAYOUTS = {
    "tp2_dp2": (2, ["parallel.tp=2", "train.save_every=3"], GA4),  # TP inside a host, DP across
    "pp2": (1, ["parallel.pp=2", "model.num_recur=4"], ["model.num_recur=4"]),  # stage 0 on host 0, 1 on host 1
    "zero1_muonh": (1, ["parallel.zero_stage=1", *MUONH], [*GA4, *MUONH]),  # sharded MuonH across the hosts
}


@pytest.fixture(scope="module")
def tp2_dp2(cluster, data, tmp_path_factory):
    """The 2 hosts x 2 ranks run (TP=2 inside each host, DP=2 across), saving after step 3."""
    root = str(tmp_path_factory.mktemp("tp2_dp2"))
    nproc, over, _ = LAYOUTS["tp2_dp2"]
    return multi_train(cluster, [0, 1], nproc, os.path.join(root, "run"), over, data)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "tp2_dp2" else opt_in) for n in LAYOUTS])
def test_layout_across_hosts_equals_single_process(name, cluster, data, tp2_dp2, tmp_path):
    """`launch/torchrun.sh --nnodes 2` on both hosts trains what one process trains: every step's
    loss to 1e-5, the final weights and validation loss (tests/layouts.py assert_same). Layouts:
    TP=2 inside each host with DP=2 across (4 ranks), PP=2 with one stage per host, and ZeRO-1
    MuonH whose matrices are partitioned between the hosts."""
    nproc, over, ref_over = LAYOUTS[name]
    run = tp2_dp2 if name == "tp2_dp2" else multi_train(cluster, [0, 1], nproc, str(tmp_path / "run"), over, data)
    ref = reference(str(tmp_path), ref_over, data)
    found = assert_same(ref, run, name)
    print(f"multihost parity {name}: " + " ".join(f"{k} {v:.1e}" for k, v in found.items()))


# ------------------------------------------------------------------ 5. one checkpoint, two hosts
def test_checkpoint_written_by_two_hosts_loads_swapped_and_resharded(cluster, data, tp2_dp2, tmp_path):
    """The checkpoint of step 3 that the 4 ranks of 2 hosts wrote into one shared run directory:
    resumed on the hosts in swapped roles (rendezvous on host 1, whose ranks are now 0-1) it
    continues the uninterrupted run bit for bit; resumed on one host with 2 ranks (TP=2, DP=1) it
    equals the single-process run, and the checkpoint that run writes after step 4 resumes in one
    process, still equal to it."""
    nproc, over, ref_over = LAYOUTS["tp2_dp2"]
    swapped = resumable(tp2_dp2.checkpoint(3), tp2_dp2, str(tmp_path / "swapped"))
    assert_resumed(tp2_dp2, multi_train(cluster, [1, 0], nproc, swapped, over, data, resume=True), 3, "swapped")
    ref = reference(str(tmp_path), ref_over, data)
    one_host = resumable(tp2_dp2.checkpoint(3), tp2_dp2, str(tmp_path / "one_host"))
    run = train(2, one_host, ["parallel.tp=2", *GA4, "train.save_every=4"], data, resume=True)
    assert_same(ref, run, "2x2 -> 1x2", from_step=3)
    one_proc = resumable(run.checkpoint(4), run, str(tmp_path / "one_proc"))
    assert_same(ref, train(1, one_proc, GA4, data, resume=True), "2x2 -> 1x2 -> 1", from_step=4)


# ------------------------------------------------------------------ 4. failures across hosts
FAIL_STEPS = 30
FAIL_OVER = ["parallel.tp=2", f"train.steps={FAIL_STEPS}", "train.save_every=2", "train.keep_checkpoints=20"]


@pytest.fixture(scope="module")
def uninterrupted(cluster, data, tmp_path_factory):
    """The failure cases' job (2 hosts x 2 ranks, TP=2 / DP=2, 30 steps, a checkpoint every 2
    steps) without a fault."""
    root = str(tmp_path_factory.mktemp("uninterrupted"))
    return multi_train(cluster, [0, 1], 2, os.path.join(root, "run"), FAIL_OVER, data)


def _steps_logged(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return max([json.loads(ln).get("step", 0) for ln in f if ln.strip().endswith("}")] or [0])
    except FileNotFoundError:
        return 0


def _wait_for(what, cond, job: Job, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        job.poll()
        assert time.time() < deadline and not job.exited, \
            f"never saw {what}; exited {job.exited}:\n" + "\n".join(job.output(h)[-3000:] for h in job.hosts)
        time.sleep(0.05)


# case: (fault injected in the ranks, words the error lines of each host must hold)
# {h0}/{h1} stand for the host names.
FAILURES = {
    "host_killed_mid_step": (None, {0: ["rank 2 stopped without a message on host {h1}"]}),
    "link_cut_mid_step": (None, {0: ["rank 2 stopped answering on host {h1}"],
                                 1: ["lost the job's rendezvous store", "rank 0 on host {h0}"]}),
    "link_cut_mid_save": ("save_pause:6@2", {0: ["rank 2 stopped answering on host {h1}"],
                                              1: ["lost the job's rendezvous store", "rank 0 on host {h0}"]}),
    "run_dir_unwritable_at_save": ("pause:5@2", {0: ["rank 2 on host {h1}: Read-only file system"]}),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c == "host_killed_mid_step" else opt_in)
                                  for c in FAILURES])
def test_failure_across_hosts_ends_job_and_restart_on_swapped_hosts_resumes(case, cluster, data, uninterrupted,
                                                                            tmp_path):
    """A fault on host 1 of a 2 hosts x 2 ranks job (TP=2 inside, DP=2 across, a checkpoint every
    2 steps): every surviving launcher (and so every rank) exits non-zero within 60 s of the
    fault; the surviving hosts' error lines name the rank and host that failed (a host cut off
    names the store's host it lost); `latest` names a complete checkpoint that loads, and the
    checkpoint being written when the fault hit is never published. Then the job restarted with
    --resume on the hosts in swapped roles (rendezvous on host 1) continues the uninterrupted
    run's loss curve bit for bit. Cases: every process of host 1 killed mid-step; host 1's cable
    pulled mid-step; pulled while host 1's ranks are inside the save of step 6 (their files
    written, not yet published); host 1's view of the run directory made read-only before the
    save of step 6."""
    fault, words = FAILURES[case]
    run_dir = str(tmp_path / "run")
    release = str(tmp_path / "release")
    cfg = write_config(str(tmp_path / "cfg.yaml"), run_dir, data, FAIL_OVER)
    env = {"MEGALOOP_FAULT": fault, "MEGALOOP_FAULT_RELEASE": release} if fault else {}
    job = Job(cluster, [0, 1], 2, [cfg], str(tmp_path / "logs"), port=next(_ports), env=env)
    try:
        if case == "run_dir_unwritable_at_save":
            _wait_for("step 5", lambda: _steps_logged(run_dir) >= 5, job)  # rank 2 now holds after step 5
            t0 = time.time()
            cluster.read_only(1, run_dir)
            open(release, "w").close()
        elif case == "link_cut_mid_save":
            _wait_for("rank 2 inside the save of step 6", lambda: "save_pause at step 6" in job.output(1), job)
            t0 = time.time()
            cluster.link(1, "down")
            open(release, "w").close()
        else:
            _wait_for("step 3", lambda: _steps_logged(run_dir) >= 3, job)
            t0 = time.time()
            cluster.kill(1) if case == "host_killed_mid_step" else cluster.link(1, "down")
        survivors = [0] if case == "host_killed_mid_step" else [0, 1]
        codes = job.wait(EXIT_BOUND_S + 30)
    finally:
        cluster.link(1, "up")
        if case == "run_dir_unwritable_at_save":
            cluster.writable(1, run_dir)
    took = max(job.exited.get(h, float("inf")) for h in survivors) - t0
    print(f"multihost failure {case}: {took:.1f} s from the fault to the last surviving launcher's exit")
    logs = {h: job.output(h) for h in (0, 1)}
    assert took <= EXIT_BOUND_S, f"{case}: survivors took {took:.1f} s (codes {codes}):\n{logs[0][-3000:]}\n{logs[1][-3000:]}"
    assert all(codes[h] not in (0, None) for h in survivors), f"{case}: exit codes {codes}"
    names = {"h0": cluster.hosts[0], "h1": cluster.hosts[1]}
    for h, want in words.items():
        lines = [ln for ln in error_lines(logs[h]) if "error:" in ln]
        assert any(all(w.format(**names) in ln for w in want) for ln in lines), \
            f"{case}: host {h}'s error lines {lines} do not hold {want}:\n{logs[h][-3000:]}"
    complete = ckpt.list_complete(run_dir)
    latest = ckpt.latest_path(run_dir)
    assert latest is not None and int(os.path.basename(latest).split("_")[-1]) == complete[-1], (latest, complete)
    if fault:  # the save the fault hit (step 6) is not published
        assert complete == [2, 4], f"{case}: complete checkpoints {complete}"
    read_weights(latest)
    ckpt.load_file(latest, "trainer.pt")
    resumed = multi_train(cluster, [1, 0], 2, run_dir, FAIL_OVER, data, resume=True)
    assert_resumed(uninterrupted, resumed, complete[-1], f"{case}, restarted on swapped hosts")


# ------------------------------------------------------------------ 3. SLURM across the hosts
@pytest.fixture(scope="module")
def slurm(cluster):
    """SLURM_CONF of a SLURM whose slurmctld runs on host 0 and whose two nodes are the hosts."""
    import shutil
    if shutil.which("slurmd") is None or shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed (no slurmd/slurmctld): `sudo scripts/slurm_local.sh install` installs it")
    return cluster.slurm()


def _slurm_wait(cluster: Cluster, env: dict, job: str, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while cluster.run(0, "squeue", "-h", "-j", job, env=env).stdout.strip():
        if time.time() > deadline:
            cluster.run(0, "scancel", job, env=env)
            raise AssertionError(f"SLURM job {job} still queued or running after {timeout} s")
        time.sleep(1)


def test_slurm_across_hosts(cluster, slurm, data, tiny_corpus, data_cache, tmp_path):
    """On a SLURM of two nodes (each a host of the cluster, slurmd with its own NodeName and
    NodeAddr): `sbatch --nodes=2 launch/slurm/multi_node.sbatch` with 2 gloo ranks per node (TP=2
    inside a node, DP=2 across) resolves the first node as MASTER_ADDR, starts a torchrun per node
    and trains what one process trains (losses to 1e-5, weights, validation loss); and a sweep
    array (`megaloop sweep slurm` + submit.sh, 2 runs of 2 CPUs, a whole node each) runs one task on
    each node at once, and both finish."""
    env = dict(__import__("multihost").job_env({"SLURM_CONF": slurm}))
    run_dir = str(tmp_path / "run")
    cfg = write_config(str(tmp_path / "cfg.yaml"), run_dir, data, ["parallel.tp=2"])
    os.makedirs(tmp_path / "logs")
    res = cluster.run(0, "sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2",
                      "--export=ALL,NPROC=2", os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                                          "launch", "slurm", "multi_node.sbatch"), cfg,
                      env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    _slurm_wait(cluster, env, job)
    head = (tmp_path / "logs" / f"megaloop-{job}.out").read_text()
    assert f"MASTER_ADDR={cluster.hosts[0]} " in head and "NNODES=2" in head, head
    found = assert_same(reference(str(tmp_path), GA4, data), Run(run_dir), "slurm 2 nodes")
    print("multihost parity slurm_tp2_dp2: " + " ".join(f"{k} {v:.1e}" for k, v in found.items()))

    from test_sweep import _tiny_sweep
    import yaml
    sweep = _tiny_sweep(r=[1, 2], budgets=[{"flops": 3e8, "sizes": [2]}])
    sweep["base"] = {"model": {"vocab_size": 384, "seq_len": 32}, "optim": {"name": "muon", "lr": 0.02, "warmup_steps": 1},
                     "train": {"micro_batch_size": 4, "log_every": 1, "eval_tokens": 256, "progress": False},
                     "data": {"corpus": [tiny_corpus], "cache_dir": data_cache, "workers": 1, "valid_fraction": 0.1}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(sweep))
    out = str(tmp_path / "sweep")
    megaloop = [sys.executable, "-m", "megaloop.cli"]
    for cmd in (["sweep", "plan", str(tmp_path / "tiny.yaml"), "--out", out],
                ["sweep", "slurm", out, "--gpus-per-node", "0", "--cpus-per-task", "2", "--partition", "debug"]):
        res = cluster.run(0, *megaloop, *cmd, env=env, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
    res = cluster.run(0, "bash", os.path.join(out, "submit.sh"), env=env, timeout=120)
    jobs = __import__("re").findall(r"Submitted batch job (\d+)", res.stdout)
    assert len(jobs) == 1, res.stdout + res.stderr
    _slurm_wait(cluster, env, jobs[0])
    hosts = set()
    for name in os.listdir(os.path.join(out, "logs")):
        text = open(os.path.join(out, "logs", name)).read()
        hosts.update(h for h in cluster.hosts if f" on {h} with " in text)
    assert hosts == set(cluster.hosts), f"the array's tasks ran on {sorted(hosts)}"
    res = cluster.run(0, *megaloop, "sweep", "collect", out, "--json", env=env, timeout=120)
    assert json.loads(res.stdout)["counts"]["finished"] == 2, res.stdout + res.stderr


# ------------------------------------------------------------------ 7. bad input
def test_bad_multi_node_launch_is_refused_quickly(cluster, data, tmp_path):
    """Each mistake is one clear error (status 2 from the launcher, or megaloop's ConfigError on
    every rank) within 30 s, never a hang: --nnodes without a rendezvous endpoint; an endpoint that
    does not resolve; the endpoint's port taken on the rendezvous host; GLOO_SOCKET_IFNAME naming an
    interface the host lacks, or the loopback; and two hosts whose configs differ (the run refuses
    to start, naming the first differing key)."""
    cfg = write_config(str(tmp_path / "cfg.yaml"), str(tmp_path / "run"), data, [])
    h0 = cluster.hosts[0]
    launch = [os.path.join("launch", "torchrun.sh"), "--nproc", "1", "--nnodes", "2"]
    from multihost import job_env
    cases = {  # name: (host, command, extra env, words of the error)
        "no endpoint": (1, [*launch, cfg], {}, "needs the rendezvous endpoint"),
        "unresolved endpoint": (1, [*launch, "--rdzv-endpoint", "nosuchhost:29400", cfg], {}, "does not resolve"),
        "port taken": (0, [*launch, "--rdzv-endpoint", f"{h0}:4545", cfg], {}, "port 4545 of the rendezvous host"),
        "missing interface": (1, [*launch, "--rdzv-endpoint", f"{h0}:29400", cfg], {"GLOO_SOCKET_IFNAME": "eth9"},
                              "GLOO_SOCKET_IFNAME=eth9: there is no interface 'eth9'"),
        "loopback interface": (1, [*launch, "--rdzv-endpoint", f"{h0}:29400", cfg], {"NCCL_SOCKET_IFNAME": "lo"},
                               "NCCL_SOCKET_IFNAME=lo: 'lo' is the loopback interface"),
    }
    listener = subprocess.Popen(cluster.argv(0, sys.executable, "-c",
                                             "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 4545)); "
                                             "s.listen(); time.sleep(120)"))
    try:
        time.sleep(0.5)
        for name, (host, cmd, env, words) in cases.items():
            t0 = time.time()
            res = cluster.run(host, *cmd, timeout=BAD_INPUT_BOUND_S, env=job_env(env))
            assert res.returncode == 2 and words in res.stderr and res.stderr.count("\n") == 1, \
                f"{name}: exit {res.returncode}, stderr:\n{res.stderr}"
            assert time.time() - t0 < BAD_INPUT_BOUND_S
    finally:
        listener.kill()
        listener.wait()
    # the hosts disagree on the learning rate
    other = write_config(str(tmp_path / "other.yaml"), str(tmp_path / "run"), data, ["optim.lr=0.03"])
    t0 = time.time()
    job = Job(cluster, [0, 1], 1, [cfg], str(tmp_path / "logs"), port=next(_ports), host_args={1: [other]})
    codes = job.wait(BAD_INPUT_BOUND_S)
    took = max(job.exited.values(), default=float("inf")) - t0
    assert all(c not in (0, None) for c in codes.values()) and took < BAD_INPUT_BOUND_S, (codes, took)
    for h in (0, 1):
        lines = [ln for ln in error_lines(job.output(h)) if "error:" in ln]
        assert lines and all("the ranks disagree on the config: optim.lr is 0.02 on rank 0" in ln for ln in lines), \
            f"host {h}:\n{job.output(h)[-3000:]}"
    assert not os.path.exists(os.path.join(str(tmp_path / "run"), "checkpoints"))
