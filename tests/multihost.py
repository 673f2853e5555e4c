"""Jobs on the test cluster (scripts/testcluster.sh): N hosts on this machine, each a network, UTS
and mount namespace with its own host name and address in 127.77.0.0/24, joined by a bridge.

`Cluster` drives the script (up, exec, link cut, kill a host, read-only directory, down);
`Job` is one multi-node `launch/torchrun.sh --nnodes N` run: the same command started on every
host, each host's output in its own log, every process bounded in time. The hosts share this
machine's file system, so a run directory is one shared directory, as on a cluster's shared disk.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from typing import Optional

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "testcluster.sh")
TORCHRUN_SH = os.path.join(ROOT, "launch", "torchrun.sh")


def unavailable() -> Optional[str]:
    """Why the test cluster cannot run here (one line), or None when it can."""
    if sys.platform != "linux":
        return "the test cluster needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the test cluster needs root (network namespaces): run the multihost tests as root"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"the test cluster needs `{tool}` (iproute2 / util-linux), which is not installed"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work on this machine"
    return None


class Cluster:
    def __init__(self, n: int, name: Optional[str] = None):
        self.n = n
        self.name = name or "t" + uuid.uuid4().hex[:6]
        self.hosts = [f"{self.name}-h{i}" for i in range(n)]
        self.addrs = [f"127.77.0.{i + 1}" for i in range(n)]

    def _script(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run([SCRIPT, args[0], self.name, *args[1:]], capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"testcluster.sh {' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def up(self) -> "Cluster":
        self._script("up", str(self.n))
        return self

    def down(self) -> None:
        subprocess.run([SCRIPT, "down", self.name], capture_output=True, timeout=60)

    def argv(self, host: int, *cmd: str) -> list[str]:
        """The command line that runs `cmd` on host `host`."""
        return [SCRIPT, "exec", self.name, str(host), *cmd]

    def run(self, host: int, *cmd: str, timeout: float = 60, env: Optional[dict] = None,
            cwd: str = ROOT) -> subprocess.CompletedProcess:
        env = dict(os.environ if env is None else env, PWD=cwd)  # the script enters the host in $PWD
        return subprocess.run(self.argv(host, *cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)

    def slurm(self) -> str:
        """Start SLURM on the hosts (slurmctld on host 0, a slurmd per host); returns SLURM_CONF."""
        return self._script("slurm", timeout=120).stdout.strip().split("=", 1)[1]

    def link(self, host: int, state: str) -> None:
        """Pull ("down") or plug ("up") host's cable at the switch."""
        self._script("link", str(host), state)

    def kill(self, host: int) -> None:
        """SIGKILL every process on host (a node that dies)."""
        self._script("kill", str(host))

    def read_only(self, host: int, folder: str) -> None:
        """`folder` becomes read-only for the processes of `host` (and only for them)."""
        self._script("ro", str(host), folder)

    def writable(self, host: int, folder: str) -> None:
        """Undo read_only."""
        self._script("rw", str(host), folder)


def job_env(extra: Optional[dict] = None) -> dict:
    """The environment of a launcher: this Python's torchrun first on PATH, one thread per rank,
    no launcher variables inherited from whatever runs the tests."""
    from megaloop.parallel.testing import RANK_VARS
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith(("GLOO_", "NCCL_", "TORCHELASTIC"))}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    env.update(extra or {})
    return env


class Job:
    """`launch/torchrun.sh --nnodes len(hosts) --rdzv-endpoint HOST0:PORT` on each of `hosts`
    (cluster host numbers; hosts[0] hosts the rendezvous), logs in `log_dir/host<i>.log`;
    `host_args` {host: args} gives a host other arguments than `args`."""

    def __init__(self, cluster: Cluster, hosts: list[int], nproc: int, args: list[str], log_dir: str,
                 port: int = 29500, env: Optional[dict] = None, host_env: Optional[dict] = None,
                 host_args: Optional[dict] = None):
        self.cluster, self.hosts, self.log_dir = cluster, hosts, log_dir
        os.makedirs(log_dir, exist_ok=True)
        endpoint = f"{cluster.hosts[hosts[0]]}:{port}"
        self.procs, self.logs, self.exited = {}, {}, {}
        for h in hosts:
            cmd = [TORCHRUN_SH, "--nproc", str(nproc), "--nnodes", str(len(hosts)), "--rdzv-endpoint", endpoint,
                   "--rdzv-id", "test", *(host_args or {}).get(h, args)]
            log = open(self.log_path(h), "w")
            e = job_env({**(env or {}), **((host_env or {}).get(h, {}))})
            # its own session: the test can end this host's launcher and its ranks as one group
            e["PWD"] = ROOT
            self.procs[h] = subprocess.Popen(cluster.argv(h, *cmd), stdout=log, stderr=subprocess.STDOUT, env=e,
                                             cwd=ROOT, start_new_session=True)
            self.logs[h] = log

    def log_path(self, host: int) -> str:
        return os.path.join(self.log_dir, f"host{host}.log")

    def output(self, host: int) -> str:
        with open(self.log_path(host)) as f:
            return f.read()

    def poll(self) -> None:
        for h, p in self.procs.items():
            if h not in self.exited and p.poll() is not None:
                self.exited[h] = time.time()

    def wait(self, timeout: float) -> dict:
        """Wait for every host's launcher; past `timeout` the rest are killed (and recorded with
        return code None). Returns {host: return code}."""
        deadline = time.time() + timeout
        while len(self.exited) < len(self.procs) and time.time() < deadline:
            self.poll()
            time.sleep(0.1)
        codes = {}
        for h, p in self.procs.items():
            codes[h] = p.returncode if h in self.exited else None
            if h not in self.exited:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
                self.cluster.kill(h)
            p.wait()
            self.logs[h].close()
        return codes

    def check(self, timeout: float = 300) -> None:
        """Wait; fail with the hosts' output unless every launcher exited 0."""
        codes = self.wait(timeout)
        bad = {h: c for h, c in codes.items() if c != 0}
        assert not bad, "launchers failed " + str(bad) + "".join(
            f"\n--- host {h} ({'still running after %d s' % timeout if c is None else 'exit %d' % c}):\n"
            f"{self.output(h)[-4000:]}" for h, c in bad.items())


def write_config(path: str, run_dir: str, data: dict, overrides: list[str]) -> str:
    """The tiny model's config (tests/layouts.py TINY) with `overrides` applied, as YAML at `path`."""
    from layouts import TINY
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["train"]["run_dir"] = run_dir
    raw["data"] = data
    for o in overrides:
        key, _, value = o.partition("=")
        section, _, field = key.partition(".")
        raw.setdefault(section, {})[field] = yaml.safe_load(value)
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def error_lines(text: str) -> list[str]:
    """megaloop's error lines (the CLI's `megaloop CMD: error:` and the fail-fast watchdog's
    `megaloop: error:`) and the launcher's."""
    return [ln for ln in text.splitlines() if re.search(r"^megaloop( \w+)?: error:|^launch/torchrun.sh:", ln)]
