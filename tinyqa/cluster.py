"""Connecting to Ray: an existing cluster (address, ``RAY_ADDRESS``, ``ray start``), or a local one."""

from __future__ import annotations

import logging
import os

from tinyqa.config import TinyQAConfig

logger = logging.getLogger(__name__)

# Workers must not patch print (datasets floods the logs with bytecode otherwise) and must find
# the offline preset cache the driver uses.
WORKER_ENV_KEYS = ("TINYQA_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")


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
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
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

    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", "--disable-usage-stats", "--include-dashboard=false"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    env = {**os.environ, **worker_env()}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
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
