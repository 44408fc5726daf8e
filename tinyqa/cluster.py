"""Connecting to Ray: an existing cluster (address, ``RAY_ADDRESS``, ``ray start``), or a local one."""

from __future__ import annotations

import logging
import os

from tinyqa.config import TinyQAConfig
from tinyqa.errors import TinyQAError

logger = logging.getLogger(__name__)

# Workers must not patch print (datasets floods the logs with bytecode otherwise) and must find
# the offline preset cache the driver uses.
WORKER_ENV_KEYS = (
    "TINYQA_CACHE",
    "TINYQA_SMOLLM2_WHEEL",
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "TRANSFORMERS_OFFLINE",
)


def worker_env() -> dict[str, str]:
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ})
    return env


def connect(cfg: TinyQAConfig, num_cpus: int | None = None) -> None:
    """Connect to the configured cluster, or start a local Ray if none is running.

    Inside ``ray job submit`` the driver already has ``RAY_ADDRESS``; passing a runtime_env there
    conflicts with the job's, so none is passed when joining an existing cluster.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    try:
        ray.init(address="auto", log_to_driver=True)
        logger.info("connected to the running local Ray cluster")
    except (ConnectionError, RuntimeError):
        logger.info("no Ray cluster found; starting a local one")
        # The dashboard (state API) must run: Ray Train's cleanup of a trial that ASHA stopped
        # finds its placement group through it, or the trial's CPUs are never freed.
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            runtime_env={"env_vars": worker_env()},
            log_to_driver=True,
        )


def start_local_cluster(num_cpus: int | None = None) -> None:
    """Start a detached single-node Ray (`ray start --head`) that outlives this process.

    Used when work must survive the command that started it (a Serve endpoint left running). The
    user stops it with `ray stop`.
    """
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    venv_ray = Path(sys.executable).with_name("ray")
    ray_bin = str(venv_ray) if venv_ray.is_file() else shutil.which("ray") or "ray"
    cmd = [ray_bin, "start", "--head", "--disable-usage-stats", "--dashboard-host=127.0.0.1"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    env = {**os.environ, **worker_env()}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TinyQAError(
            f"`ray start --head` failed ({tail[0]}); start a cluster yourself (`ray start --head`) "
            "or set ray_address"
        )
    logger.info("started a local Ray cluster (stop it with `ray stop`)")


def cluster_running(cfg: TinyQAConfig) -> bool:
    """Whether an existing cluster is reachable (address, RAY_ADDRESS, or a local `ray start`)."""
    import ray

    if ray.is_initialized():
        return True
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        return True
    try:
        ray.init(address="auto", log_to_driver=True)
    except (ConnectionError, RuntimeError):
        return False
    return True


def connect_persistent(cfg: TinyQAConfig, num_cpus: int | None = None) -> None:
    """Like :func:`connect`, but a cluster it must start is detached, so it outlives this process."""
    import ray

    if not cluster_running(cfg):
        start_local_cluster(num_cpus)
    if not ray.is_initialized():
        connect(cfg)


def start_private(num_cpus: int) -> None:
    """A new in-process local Ray that never joins another cluster on this machine (benchmarks).

    The dashboard runs because Ray Train's cleanup of ASHA-stopped trials needs the state API.
    """
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        runtime_env={"env_vars": worker_env()},
        log_to_driver=False,
    )
