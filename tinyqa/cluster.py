"""Connecting to Ray (an existing cluster: address, ``RAY_ADDRESS``, ``ray start``; or a local one)
and asking it what it can hold: a sweep's trial resources and concurrency, and whether the state
API that early stopping needs answers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tinyqa.config import TinyQAConfig
from tinyqa.errors import ConfigError, TinyQAError

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


def trial_resources(cfg: TinyQAConfig) -> dict[str, float]:
    """What one trial's Train workers reserve in total (its driver reserves no CPU or GPU)."""
    t = cfg.train
    need = {"CPU": t.num_workers * t.cpus_per_worker}
    if t.use_gpu:
        need["GPU"] = t.num_workers * t.gpus_per_worker
    return need


def _autoscaler_capacity() -> tuple[dict[str, float], dict[str, float]] | None:
    """(total, largest node) resources an autoscaling cluster can grow to, or None."""
    import yaml

    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # private API: any failure means "unknown", and we fall back
        config = None
    groups: list[tuple[dict[str, float], int]] = []
    if config is not None and config.node_group_configs:
        groups = [(dict(g.resources), g.max_count) for g in config.node_group_configs]
    else:
        # Clusters from `ray up` keep their launcher config on the head, where jobs run.
        path = Path("~/ray_bootstrap_config.yaml").expanduser()
        if not path.is_file():
            return None
        try:
            launcher = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
        head = launcher.get("head_node_type")
        for name, spec in (launcher.get("available_node_types") or {}).items():
            count = 1 if name == head else int(spec.get("max_workers", 0))
            groups.append(({k: float(v) for k, v in (spec.get("resources") or {}).items()}, count))
    total: dict[str, float] = {}
    largest: dict[str, float] = {}
    for resources, count in groups:
        for key, value in resources.items():
            total[key] = total.get(key, 0.0) + value * (count if count >= 0 else 1e9)
            largest[key] = max(largest.get(key, 0.0), value)
    return (total, largest) if groups else None


def plan_concurrency(cfg: TinyQAConfig, n_trials: int) -> int:
    """Check the cluster can hold one trial and decide how many run at once.

    ``tune.max_concurrent_trials`` wins; else the free GPUs (or CPUs on a CPU cluster) divided by
    one trial's needs, at most the number of trials. On an autoscaling cluster the capacity it can
    grow to counts as free. Raises :class:`ConfigError` when a trial can never be placed.
    """
    import ray

    t = cfg.train
    need = trial_resources(cfg)
    per_worker = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    scaling = _autoscaler_capacity()
    if scaling is not None:
        total, largest = scaling
        free = dict(total)
        where = "the cluster can scale to"
    else:
        total = dict(ray.cluster_resources())
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in per_worker}
        free = dict(ray.available_resources())
        where = "the cluster has"
    problems = []
    for key, amount in need.items():
        have = total.get(key, 0.0)
        if amount > have:
            problems.append(
                f"a trial needs {amount:g} {key} (train.num_workers={t.num_workers} x "
                f"{per_worker[key]:g}) but {where} {have:g}"
            )
        elif per_worker[key] > largest.get(key, 0.0):
            problems.append(
                f"one Train worker needs {per_worker[key]:g} {key} but the largest node has "
                f"{largest.get(key, 0.0):g}"
            )
    if problems:
        hint = (
            "lower train.num_workers / train.gpus_per_worker, set train.use_gpu=false, or use a "
            "bigger cluster"
        )
        raise ConfigError("sweep: " + "; ".join(problems) + f"; {hint}")
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    key = "GPU" if "GPU" in need else "CPU"
    fits = int(free.get(key, 0.0) // need[key]) if need[key] > 0 else n_trials
    if fits < 1:
        logger.info("no free %s for a trial right now; trials will queue, one at a time", key)
    return max(1, min(fits, n_trials))


def ray_error_summary(e: BaseException) -> str:
    """The last line of an error, at most 200 characters: Ray's errors (``RayTaskError``, a Tune
    trial's error) carry the remote traceback in their text, and the exception itself comes last."""
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


def _state_api_probe() -> str | None:
    """Runs on the head node like Ray Train's placement-group cleaner: None if the state API
    answers there, else the reason it does not."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=10)
    except Exception as e:  # any failure means the cleaner would fail the same way
        return ray_error_summary(e)
    return None


def early_stopping_problem() -> str | None:
    """Why stopping trials early would leak their Train workers here, or None if it is safe.

    A stopped trial's Train controller dies without releasing its workers' placement group;
    Ray Train's cleaner actor frees it, but only through the Ray state API (the dashboard), which
    it reaches without an address: that fails when the dashboard is off, or when several Ray
    clusters run on one machine and ``RAY_ADDRESS`` is not set for the cluster's processes.
    Leaked CPUs / GPUs then stall the rest of the sweep.
    """
    import ray

    probe = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(_state_api_probe)
    try:
        return ray.get(probe.remote(), timeout=60)
    except Exception as e:  # a probe that cannot even run says the same
        return ray_error_summary(e)
