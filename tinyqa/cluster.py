"""Connecting to Ray (an existing cluster: address, ``RAY_ADDRESS``, ``ray start``; or a local one)
and asking it what it can hold: a sweep's trial resources and concurrency, and whether the state
API that early stopping needs answers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

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


# Clusters tinyqa starts listen on the loopback interface only and require Ray's token.
LOOPBACK = "127.0.0.1"
# Ray resolves --node-ip-address=127.0.0.1 to the machine's network address unless clusters are
# "disabled" (its macOS/Windows single-machine mode); with it, the node, GCS and agents keep
# 127.0.0.1 (ray/_private/services.py resolve_ip_for_localhost / get_node_ip_address).
_LOCAL_ONLY_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
_TOKEN_FILE = Path("~/.ray/auth_token")  # where Ray's own `ray start` / ray.init() look


class ClusterAuthError(TinyQAError):
    """A Ray cluster refused us for its token auth (missing or wrong token); never "no cluster"."""


def _is_auth_error(e: BaseException) -> bool:
    """Whether a failed ``ray.init`` was a token refusal. Ray 2.60 raises ``ConnectionError``
    ("Failed to connect") from a ``RuntimeError`` whose text carries the GCS client's
    ``AuthenticationError`` (InvalidAuthToken): look through the whole chain."""
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = e
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, AuthenticationError):
            return True
        text = str(seen)
        if "AuthenticationError" in text or "InvalidAuthToken" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _auth_detail(e: BaseException) -> str:
    text = " ".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)
    return (
        "InvalidAuthToken: the token is missing or wrong"
        if "InvalidAuthToken" in text
        else (ray_error_summary(e))
    )


def _auth_error(address: str, e: BaseException) -> ClusterAuthError:
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    return ClusterAuthError(
        f"the Ray cluster at {address} refused the connection for token auth (RAY_AUTH_MODE="
        f"{mode}; {_auth_detail(e)}); give this shell the cluster's token (export "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<its token file>, default ~/.ray/auth_token)"
    )


def ensure_auth_token() -> str:
    """Make sure Ray finds a token for a cluster we start; returns where it comes from.

    Ray's order: ``RAY_AUTH_TOKEN``, then ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``.
    When none is set up, a random token is written to ``~/.ray/auth_token`` readable by this
    user only (Ray's own generator leaves it at the umask's mode, usually world-readable).
    """
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise ClusterAuthError(
                f"RAY_AUTH_TOKEN_PATH={path} holds no token; write one there "
                "(`ray get-auth-token --generate` prints one) or unset RAY_AUTH_TOKEN_PATH"
            )
        return str(path)
    path = _TOKEN_FILE.expanduser()
    if not (path.is_file() and path.read_text().strip()):
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        logger.info("wrote a new Ray auth token to %s", path)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)  # the token lets its holder run code on the cluster
    return str(path)


def _use_local_only_auth() -> None:
    """Switch this process to the token mode of the clusters tinyqa starts (Ray reads
    RAY_AUTH_MODE once into its config; re-reading it is what Ray's own token setup does)."""
    os.environ.update(_LOCAL_ONLY_ENV)
    _keep_loopback_here()
    try:
        from ray._raylet import Config

        Config.initialize("")
    except Exception as e:  # private API: without it, a later ray.init fails loudly, not silently
        logger.debug("could not refresh Ray's config for token auth: %s", e)


def _keep_loopback(address: str) -> None:
    """A driver joining a cluster on 127.0.0.1 must not let Ray swap that for the machine's
    network address (the cluster does not listen there): same switch as the cluster's."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if address == "auto":
        try:
            from ray._private.utils import read_ray_address

            host = (read_ray_address() or "").rsplit(":", 1)[0]
        except Exception:  # private API; without it "auto" behaves as in plain Ray
            return
    if host in (LOOPBACK, "localhost", "::1"):
        _keep_loopback_here()


def _keep_loopback_here() -> None:
    # Ray reads the switch into a constant when it is imported, and this process may have
    # imported it already; its children read the variable.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _join(address: str, quiet: bool = False) -> None:
    """``ray.init(address=…)``, an auth refusal raised as :class:`ClusterAuthError`."""
    import ray

    _keep_loopback(address)
    try:
        ray.init(address=address, **_init_logging(quiet))
    except Exception as e:
        if _is_auth_error(e):
            raise _auth_error(address, e) from e
        raise


def _join_running_local(quiet: bool = False) -> bool:
    """Join the cluster ``ray start`` left on this machine: True if joined, False if there is
    none; an auth refusal is raised, never read as "none"."""
    import ray

    _keep_loopback("auto")
    try:
        ray.init(address="auto", **_init_logging(quiet))
    except Exception as e:
        if _is_auth_error(e):
            raise _auth_error("auto (the local `ray start` cluster)", e) from e
        if isinstance(e, (ConnectionError, RuntimeError)):
            return False
        raise
    return True


def _init_logging(quiet: bool) -> dict[str, Any]:
    """``ray.init`` logging arguments; ``quiet``: no actor lines forwarded, no connect banner."""
    return {"log_to_driver": not quiet, "logging_level": logging.ERROR if quiet else logging.INFO}


def join_existing(cfg: TinyQAConfig, quiet: bool = False) -> bool:
    """Join the configured cluster (``ray_address``, ``RAY_ADDRESS``) or the local one ``ray start``
    left, the way :func:`connect` does (a loopback cluster stays on loopback); False when none is
    running. Never starts one. Raises :class:`ClusterAuthError` when the cluster refuses our token.
    ``quiet``: the actors' log lines and Ray's banner stay in Ray's files (a short command).
    """
    import ray

    if ray.is_initialized():
        return True
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        return _join_running_local(quiet)
    try:
        _join(address, quiet)
    except ConnectionError:
        return False
    return True


def connect(cfg: TinyQAConfig, num_cpus: int | None = None) -> None:
    """Connect to the configured cluster, or start a local Ray if none is running.

    Inside ``ray job submit`` the driver already has ``RAY_ADDRESS``; passing a runtime_env there
    conflicts with the job's, so none is passed when joining an existing cluster. A local Ray we
    start listens on 127.0.0.1 only and requires a token. Raises :class:`ClusterAuthError` when
    a cluster refuses our token (instead of starting a second one).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray at %s", address)
        _join(address)
        return
    if _join_running_local():
        logger.info("connected to the running local Ray cluster")
        return
    logger.info("no Ray cluster found; starting a local one (127.0.0.1 only, token auth)")
    start_private(num_cpus, log_to_driver=True)


def local_cluster_command(
    num_cpus: int | None = None,
    *,
    port: int | None = None,
    temp_dir: str | None = None,
    dashboard_port: int | None = None,
    client_port: int | None = None,
    agent_port: int | None = None,
) -> list[str]:
    """The `ray start --head` command of a local cluster: every address 127.0.0.1.

    Ports left None keep Ray's defaults (GCS 6379, dashboard 8265, client 10001, agent 52365).
    """
    import shutil
    import sys

    venv_ray = Path(sys.executable).with_name("ray")
    ray_bin = str(venv_ray) if venv_ray.is_file() else shutil.which("ray") or "ray"
    cmd = [
        ray_bin,
        "start",
        "--head",
        "--disable-usage-stats",
        f"--node-ip-address={LOOPBACK}",
        f"--dashboard-host={LOOPBACK}",
    ]
    for flag, value in (
        ("--port", port),
        ("--temp-dir", temp_dir),
        ("--dashboard-port", dashboard_port),
        ("--ray-client-server-port", client_port),
        ("--dashboard-agent-listen-port", agent_port),
        ("--num-cpus", num_cpus),
    ):
        if value:
            cmd.append(f"{flag}={value}")
    return cmd


def start_local_cluster(num_cpus: int | None = None, **ports_and_dirs: int | str | None) -> None:
    """Start a detached single-node Ray (`ray start --head`) that outlives this process.

    Used when work must survive the command that started it (a Serve endpoint left running). It
    listens on 127.0.0.1 only and requires Ray's token (:func:`ensure_auth_token`); this process
    switches to token mode so it can join. ``ports_and_dirs``: see :func:`local_cluster_command`.
    The user stops it with `ray stop`.
    """
    import subprocess

    token = ensure_auth_token()
    cmd = local_cluster_command(num_cpus, **ports_and_dirs)
    env = {**os.environ, **worker_env(), **_LOCAL_ONLY_ENV}
    # Generous: on a busy machine Ray's agents alone take minutes to import (measured under a
    # load average of ~100 on 2 cores); a start killed half-way leaves a half-started cluster.
    # A session of its own: the cluster (and the endpoint on it) must outlive the terminal too.
    # In the terminal's session, closing it (or the end of a tmux pane's / ssh session's
    # command) sends SIGHUP to Ray's daemons, and the endpoint the report promised is gone.
    # No stdin either: the daemons would otherwise hold the terminal open after it closed.
    proc = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        start_new_session=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TinyQAError(
            f"`ray start --head` failed ({tail[0]}); start a cluster yourself (`ray start --head`) "
            "or set ray_address"
        )
    _use_local_only_auth()
    logger.info(
        "started a local Ray cluster on 127.0.0.1 with token auth (token: %s; stop it with "
        "`ray stop`)",
        token,
    )


def cluster_running(cfg: TinyQAConfig) -> bool:
    """Whether an existing cluster is reachable (address, RAY_ADDRESS, or a local `ray start`).

    Raises :class:`ClusterAuthError` when the local cluster refuses our token.
    """
    import ray

    if ray.is_initialized():
        return True
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        return True
    return _join_running_local()


def connect_persistent(cfg: TinyQAConfig, num_cpus: int | None = None) -> None:
    """Like :func:`connect`, but a cluster it must start is detached, so it outlives this process."""
    import ray

    if not cluster_running(cfg):
        start_local_cluster(num_cpus)
    if not ray.is_initialized():
        connect(cfg)


def start_private(num_cpus: int | None, log_to_driver: bool = False) -> None:
    """A new in-process local Ray that never joins another cluster on this machine: 127.0.0.1
    only, token auth (Ray generates ``~/.ray/auth_token`` if there is none).

    The dashboard runs because Ray Train's cleanup of ASHA-stopped trials needs the state API.
    """
    import ray

    _use_local_only_auth()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host=LOOPBACK,
        _node_ip_address=LOOPBACK,
        runtime_env={"env_vars": worker_env()},
        log_to_driver=log_to_driver,
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
