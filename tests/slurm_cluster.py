"""Pytest helpers for the single-node dev SLURM cluster (``slurm/dev-cluster.sh``).

Register the session fixture in ``tests/conftest.py``::

    from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture, see tests/slurm_cluster.py)

Then mark tests ``@pytest.mark.slurm`` and take ``slurm_cluster``; it yields a :class:`SlurmCluster`
with ``SLURM_CONF`` already exported in ``os.environ`` (so ``sbatch``/``sacct``/submitit work).

Behaviour:
  * starts the cluster once per session (installing packages on a fresh machine), or reuses a
    cluster that is already running in the same state dir;
  * stops it at session end only if this fixture started it, no other live pytest session is
    still using it, and ``TLDIST_KEEP_SLURM=1`` is not set;
  * skips (with the reason) only when SLURM truly cannot run here (not Linux, not root and no
    passwordless sudo, packages missing and no apt-get); with ``CI=true`` that becomes a failure.
    Any other start error is a failure.

Env knobs: ``TLDIST_SLURM_STATE_DIR`` (default /tmp/tldist-slurm), ``TLDIST_KEEP_SLURM=1``,
plus the ``TLDIST_SLURM_*`` variables understood by the script.

Multi-node: the session fixture ``slurm_multinode`` starts a 2-node cluster (``TLDIST_SLURM_NODES=2``,
state in ``TLDIST_SLURM_MULTI_STATE_DIR``, default /tmp/tldist-slurm-2nodes): each node in its own
network namespace with its own IP and hostname. It yields a :class:`MultiNodeCluster` and does NOT
export ``SLURM_CONF`` (the single-node fixture owns that variable): tests use ``cluster.env()`` or
``monkeypatch.setenv("SLURM_CONF", str(cluster.conf))``. Take it in a test module with
``from slurm_cluster import slurm_multinode  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
SCRIPT = REPO_ROOT / "slurm" / "dev-cluster.sh"
DEFAULT_STATE_DIR = "/tmp/tldist-slurm"

# exit codes of dev-cluster.sh meaning "SLURM cannot run on this machine" (-> skip outside CI)
_CANNOT_RUN_CODES = {3: "needs root or passwordless sudo", 4: "SLURM packages missing and no apt-get",
                     5: "cannot create network namespaces or bridges (multi-node; needs CAP_NET_ADMIN)"}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def in_ci() -> bool:
    return _truthy(os.environ.get("CI"))


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """Handle on a running dev cluster."""

    state_dir: Path
    conf: Path
    partition: str = "debug"  # default partition
    preempt_partition: str = "urgent"  # higher PriorityTier; preempts (requeues) `partition` jobs
    started_here: bool = False
    start_seconds: float = 0.0

    # ---------------------------------------------------------------- env / commands
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``sinfo``, ``scontrol``, ...) against this cluster."""
        return subprocess.run(
            list(args), env=self.env(), capture_output=True, text=True, check=check, timeout=timeout
        )

    def sacct(self, job_id: str | int, fields: str = "JobID,State,ExitCode,Start,End") -> list[dict[str, str]]:
        """Allocation records (``-X``) of a job, including requeued attempts (``--duplicates``)."""
        out = self.run(
            "sacct", "-j", str(job_id), "-X", "--duplicates", "-n", "-P", "-o", fields
        ).stdout
        names = fields.split(",")
        return [dict(zip(names, line.split("|"))) for line in out.splitlines() if line.strip()]

    def wait_final_state(self, job_id: str | int, timeout: float = 30) -> str:
        """Poll sacct until the job's latest record leaves PENDING/RUNNING/... ; returns that state.

        (submitit's ``job.done()`` turns true as soon as the result pickles exist, slightly before
        SLURM records the job as finished.)
        """
        deadline = time.monotonic() + timeout
        while True:
            recs = self.sacct(job_id)
            state = recs[-1]["State"] if recs else "UNKNOWN"
            if state.split()[0] not in {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "UNKNOWN", "RESIZING"}:
                return state
            if time.monotonic() > deadline:
                return state
            time.sleep(0.5)

    def scontrol_job(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job`` as a dict (e.g. ``Restarts``, ``JobState``); {} once purged (MinJobAge=300 s)."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if proc.returncode != 0:
            return {}
        return dict(tok.split("=", 1) for tok in proc.stdout.split() if "=" in tok)

    def job_state(self, job_id: str | int) -> str:
        out = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False).stdout.strip()
        return out or "GONE"

    # ---------------------------------------------------------------- submitit
    def python_path_setup(self) -> list[str]:
        """``slurm_setup`` lines making test helpers importable inside jobs (pickled callables)."""
        paths = f"{TESTS_DIR}:{REPO_ROOT}"
        return [f'export PYTHONPATH="{paths}${{PYTHONPATH:+:$PYTHONPATH}}"']

    def executor(self, folder: str | os.PathLike, **params: Any):
        """A submitit ``AutoExecutor`` bound to this cluster.

        ``folder`` should be unique per test (e.g. ``tmp_path / "%j"``).  ``params`` go to
        ``update_parameters`` (e.g. ``tasks_per_node=2, cpus_per_task=1``); defaults:
        the dev partition, a 10 min limit, tests dir + repo root on the job's PYTHONPATH.
        """
        import submitit

        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        setup = list(params.pop("slurm_setup", [])) + self.python_path_setup()
        defaults: dict[str, Any] = {"slurm_partition": self.partition, "timeout_min": 10, "nodes": 1}
        defaults.update(params)
        ex.update_parameters(slurm_setup=setup, **defaults)
        return ex


@dataclasses.dataclass(frozen=True)
class MultiNodeCluster(SlurmCluster):
    """A dev cluster whose nodes live in their own network namespaces (``TLDIST_SLURM_NODES>=2``).

    Node ``k`` (1-based) is ``node<k>`` with address ``<subnet>.<10+k>``; :meth:`nodes` lists them.
    The fault helpers act on real daemons and links through ``slurm/dev-cluster.sh``.
    """

    num_nodes: int = 2

    def script(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """``slurm/dev-cluster.sh ARGS`` for this cluster's state dir."""
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=self.env(TLDIST_SLURM_STATE_DIR=str(self.state_dir)))
        if check and proc.returncode != 0:
            raise RuntimeError(f"dev-cluster.sh {' '.join(args)} failed (rc={proc.returncode}): {proc.stderr.strip()}")
        return proc

    def nodes(self) -> list[dict[str, str]]:
        """``[{"name", "ip", "netns", "veth"}]`` per node, in order."""
        rows = self.script("nodes").stdout.split()
        return [dict(zip(("name", "ip", "netns", "veth"), rows[i:i + 4])) for i in range(0, len(rows), 4)]

    def on_node(self, k: int, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``cmd`` on node ``k``: its network namespace, hostname and hosts file."""
        return self.script("node", str(k), *cmd, check=check, timeout=timeout)

    def link(self, k: int, up: bool) -> None:
        """Take node ``k``'s link to the bridge down (a network partition) or bring it back up."""
        self.script("link", str(k), "up" if up else "down")

    def kill_slurmd(self, k: int) -> None:
        """SIGKILL node ``k``'s slurmd (its running job steps stay, as on a real crashed daemon)."""
        self.script("slurmd", str(k), "kill")

    def start_slurmd(self, k: int) -> None:
        """Start node ``k``'s slurmd again (no-op while it runs)."""
        self.script("slurmd", str(k), "start")

    def node_pids(self, k: int) -> list[int]:
        """Pids of every process in node ``k``'s network namespace (its slurmd, job steps, tasks)."""
        ns = next(n["netns"] for i, n in enumerate(self.nodes(), 1) if i == k)
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout
        return [int(p) for p in out.split()]

    def crash(self, k: int) -> None:
        """Node ``k`` crashes: its slurmd is SIGKILLed and every other process on it (job steps, tasks,
        loader workers) is frozen with SIGSTOP, as on a hung or powered-off host; :meth:`reset` ends them."""
        import signal

        self.kill_slurmd(k)
        for pid in self.node_pids(k):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def reset(self, k: int) -> None:
        """End every process on node ``k`` except its slurmd: what a reboot leaves of a failed node."""
        self.script("reset", str(k))

    def resume(self, k: int) -> None:
        """``scontrol update nodename=node<k> state=resume`` (a DOWN node is otherwise re-pinged only every ~54 s)."""
        self.script("resume", str(k))

    def node_state(self, k: int) -> str:
        """SLURM's state of node ``k`` (``idle``, ``allocated``, ``down*``, ``idle*``, ...)."""
        return self.run("sinfo", "-h", "-N", "-n", f"node{k}", "-p", self.partition, "-o", "%T",
                        check=False).stdout.strip()


def _run_script(cmd: str, state_dir: Path, timeout: float, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), cmd, str(state_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def _cannot_run(reason: str) -> None:
    msg = f"dev SLURM cluster cannot start: {reason}"
    print(msg, file=sys.stderr)
    if in_ci():
        pytest.fail(msg + " (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(msg)


@contextlib.contextmanager
def _registry_lock(state_dir: Path) -> Iterator[Path | None]:
    """Lock + directory tracking which pytest sessions use the cluster (None if not writable)."""
    users = state_dir / "fixture-users"
    try:
        users.mkdir(parents=True, exist_ok=True)
        fh = open(state_dir / ".fixture-lock", "a")  # noqa: SIM115
    except OSError:
        yield None
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield users
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _live_users(users: Path) -> list[int]:
    live = []
    for f in users.iterdir():
        if f.name.isdigit() and Path(f"/proc/{f.name}").exists():
            live.append(int(f.name))
        else:
            f.unlink(missing_ok=True)
    return live


def start_cluster(state_dir: str | os.PathLike | None = None, timeout: float = 600, nodes: int = 1) -> SlurmCluster:
    """Start (or reuse) the dev cluster; skip/fail as documented in the module docstring.

    ``nodes >= 2``: the multi-node cluster (a :class:`MultiNodeCluster`), by default in
    ``TLDIST_SLURM_MULTI_STATE_DIR`` or /tmp/tldist-slurm-<nodes>nodes.
    """
    if not sys.platform.startswith("linux"):
        _cannot_run(f"needs Linux, this is {sys.platform}")
    if nodes > 1:
        state = Path(state_dir or os.environ.get("TLDIST_SLURM_MULTI_STATE_DIR") or f"/tmp/tldist-slurm-{nodes}nodes")
    else:
        state = Path(state_dir or os.environ.get("TLDIST_SLURM_STATE_DIR") or DEFAULT_STATE_DIR)
    script_env = {"TLDIST_SLURM_NODES": str(nodes)}
    if os.geteuid() != 0:
        sudo_ok = shutil.which("sudo") is not None and (
            subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
        )
        if not sudo_ok:
            _cannot_run(f"not root (uid {os.geteuid()}) and no passwordless sudo")

    t0 = time.monotonic()
    with _registry_lock(state) as users:
        was_running = _run_script("status", state, 60, script_env).returncode == 0
        proc = _run_script("start", state, timeout, script_env)
        if proc.returncode in _CANNOT_RUN_CODES:
            _cannot_run(f"{_CANNOT_RUN_CODES[proc.returncode]}\n{proc.stderr.strip()}")
        if proc.returncode != 0:
            pytest.fail(
                f"slurm/dev-cluster.sh start failed (rc={proc.returncode})\n"
                f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}",
                pytrace=False,
            )
        owned_marker = state / "fixture-owned"
        if users is not None:
            if not was_running:
                owned_marker.touch()
            (users / str(os.getpid())).touch()
    conf = state / "slurm.conf"
    for line in proc.stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            conf = Path(line.split("=", 1)[1])
    kwargs = dict(state_dir=state, conf=conf, started_here=not was_running, start_seconds=time.monotonic() - t0)
    if nodes > 1:
        return MultiNodeCluster(num_nodes=nodes, **kwargs)
    return SlurmCluster(**kwargs)


def release_cluster(cluster: SlurmCluster) -> None:
    """Stop the cluster if a fixture started it and no other live session uses it."""
    keep = _truthy(os.environ.get("TLDIST_KEEP_SLURM"))
    with _registry_lock(cluster.state_dir) as users:
        if users is None:  # no registry: stop only what we started
            should_stop = cluster.started_here
        else:
            (users / str(os.getpid())).unlink(missing_ok=True)
            owned = (cluster.state_dir / "fixture-owned").exists()
            should_stop = owned and not _live_users(users)
        if should_stop and not keep:
            proc = _run_script("stop", cluster.state_dir, 120)  # the script reads the node count back
            (cluster.state_dir / "fixture-owned").unlink(missing_ok=True)
            if proc.returncode != 0:
                print(f"dev-cluster.sh stop failed: {proc.stderr}", file=sys.stderr)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Session-wide dev SLURM cluster; ``SLURM_CONF`` is set in ``os.environ`` while it is up."""
    cluster = start_cluster()
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        release_cluster(cluster)


@pytest.fixture(scope="session")
def slurm_multinode() -> Iterator[MultiNodeCluster]:
    """Session-wide 2-node dev cluster (own netns, IP and hostname per node); leaves ``SLURM_CONF`` alone."""
    cluster = start_cluster(nodes=2)
    assert isinstance(cluster, MultiNodeCluster)
    try:
        yield cluster
    finally:
        release_cluster(cluster)
