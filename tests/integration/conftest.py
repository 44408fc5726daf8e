"""A real local Ray cluster for integration tests: `ray start --head` in its own temp dir and ports.

Teardown stops only this cluster's processes (matched by its temp dir), so concurrent clusters of
other test sessions on the same machine survive.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
# Loopback test clusters run without Ray token auth, whatever ~/.ray/auth_token or a test did to
# the environment (see tests/conftest.py).
NO_TOKEN_AUTH = {"RAY_AUTH_MODE": "disabled"}
NO_AGENT = "No available agent to submit job"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    address: str  # GCS address for ray.init / RAY_ADDRESS
    dashboard_url: str  # job API for `ray job submit --address`
    temp_dir: str
    agent_url: str  # the head node's dashboard agent, which runs submitted jobs

    def stop(self) -> None:
        stop_cluster(self.temp_dir)

    def env(self) -> dict[str, str]:
        return {**os.environ, **NO_TOKEN_AUTH, "RAY_ADDRESS": self.address}

    def submit(self, *entrypoint: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir <repo> -- <entrypoint>`; waits for the job to end.

        A submission the job API refuses because the head's agent is not reachable yet (Ray waits
        10 s for it, then answers 500 "No available agent") is retried for up to 2 minutes: no job
        was created, so a retry cannot run it twice. When it still fails, the agent's log is added.
        """
        deadline = time.time() + 120
        while True:
            proc = self._submit_once(entrypoint, timeout)
            if proc.returncode == 0 or NO_AGENT not in proc.stderr:
                return proc
            if time.time() > deadline:
                proc.stderr += "\n--- dashboard_agent.log (tail) ---\n" + self.log_tail(
                    "dashboard_agent.log"
                )
                return proc
            time.sleep(5)

    def log_tail(self, name: str, lines: int = 40) -> str:
        logs = Path(self.temp_dir, "session_latest", "logs", name)
        try:
            return "\n".join(logs.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no {logs}: {e})"

    def _submit_once(
        self, entrypoint: tuple[str, ...], timeout: float
    ) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            **NO_TOKEN_AUTH,
            "RAY_ADDRESS": self.dashboard_url,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        return subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                self.dashboard_url,
                "--working-dir",
                str(REPO),
                "--",
                *entrypoint,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _pids_of(temp_dir: str) -> list[int]:
    """This cluster's processes: those naming its temp dir, and all their descendants."""
    # -ww: without a terminal ps cuts lines at 80 columns, before the temp dir shows.
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True
    ).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    children: dict[int, list[int]] = {}
    for row in rows:
        children.setdefault(int(row[1]), []).append(int(row[0]))
    found = [int(r[0]) for r in rows if len(r) > 2 and temp_dir in r[2]]
    todo, seen = list(found), set(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    seen.discard(os.getpid())
    return sorted(seen)


def stop_cluster(temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_of(temp_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while _pids_of(temp_dir) and time.time() < deadline:
            time.sleep(0.3)


def start_cluster(num_cpus: int = 4) -> RayCluster:
    temp_dir = tempfile.mkdtemp(prefix="tq-ray-", dir="/tmp")
    port, dash, agent = free_port(), free_port(), free_port()
    cmd = [
        RAY,
        "start",
        "--head",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={agent}",
        "--disable-usage-stats",
    ]
    # Jobs run `python ...` through the cluster's PATH: make it this interpreter's.
    env = {
        **os.environ,
        **NO_TOKEN_AUTH,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        # Ray Train's placement-group cleaner finds the cluster through RAY_ADDRESS; without it, a
        # trial ASHA stopped keeps its CPUs when several clusters share the machine.
        "RAY_ADDRESS": f"127.0.0.1:{port}",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    if proc.returncode != 0:
        stop_cluster(temp_dir)
        raise RuntimeError(f"ray start failed:\n{proc.stdout}\n{proc.stderr}")
    cluster = RayCluster(
        f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir, f"http://127.0.0.1:{agent}"
    )
    try:
        _wait_for_job_api(cluster)
    except BaseException:
        stop_cluster(temp_dir)
        raise
    return cluster


def _answers(url: str, statuses: range | tuple[int, ...]) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code in statuses
    except httpx.HTTPError:
        return False


def _wait_for_job_api(cluster: RayCluster, timeout: float = 180) -> None:
    """Until the head's agent (which runs submitted jobs) is healthy and the dashboard answers."""
    deadline = time.time() + timeout
    while not _answers(f"{cluster.agent_url}/api/local_raylet_healthz", range(200, 300)):
        if time.time() > deadline:
            raise RuntimeError(
                "the head's dashboard agent did not come up:\n"
                + cluster.log_tail("dashboard_agent.log")
            )
        time.sleep(0.5)
    # 401 also means "up": Ray turns token auth on once ~/.ray/auth_token exists (any local
    # ray.init() creates one); `ray job submit` then sends the token itself.
    while not _answers(f"{cluster.dashboard_url}/api/version", (200, 401)):
        if time.time() > deadline:
            raise RuntimeError("the Ray job API did not come up")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_cluster_factory():
    """Start extra clusters (the caller stops them with ``cluster.stop()``)."""
    return start_cluster


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh `ray start --head` cluster for one test module."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster.temp_dir)


@pytest.fixture(scope="session")
def get_free_port():
    """A function returning a free loopback port."""
    return free_port


def trial_statuses(exp_dir: Path) -> list[str]:
    """Trial statuses from Tune's latest experiment snapshot (what a restore will see)."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return []  # caught mid-write
    return [json.loads(t[0])["status"] for t in data.get("trial_data", [])]


def checkpoint_registered(read_snapshot: Callable[[], bytes | str]) -> bool:
    """Whether Ray Train's checkpoint manager has persisted a checkpoint, from its
    ``checkpoint_manager_snapshot.json`` (``read_snapshot`` returns the file's content)."""
    try:
        return json.loads(read_snapshot()).get("latest_checkpoint_result") is not None
    except (OSError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return False


@pytest.fixture(scope="session")
def registered_checkpoint():
    """:func:`checkpoint_registered`, for tests that wait for a run's first checkpoint."""
    return checkpoint_registered


@pytest.fixture(scope="session")
def tune_statuses():
    """:func:`trial_statuses`, for tests that watch a sweep from outside."""
    return trial_statuses
