"""Deploy the QA endpoint on a Ray cluster and remove it again (``tinyqa serve [--shutdown]``).

:func:`deploy` joins the configured cluster (``ray_address`` / ``RAY_ADDRESS`` / a running local
``ray start``). With none running it starts one with ``ray start --head`` — a detached local
cluster that outlives this process, so the endpoint stays up after ``tinyqa serve`` exits
(stop it with ``ray stop``). ``blocking=True`` instead keeps this process in the foreground and
removes the app on Ctrl-C; with no cluster running, its Ray lives in this process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import httpx
from ray import serve
from ray.serve.context import _get_global_client

from tinyqa.cluster import connect, connect_persistent, join_existing
from tinyqa.config import TinyQAConfig
from tinyqa.errors import TinyQAError, last_line
from tinyqa.secrets import resolve_api_key

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 600.0  # a first deploy may load a large model onto a fresh GPU node


class ServeError(TinyQAError):
    """The endpoint could not be deployed (cluster, port or model problem)."""


def endpoint_url(cfg: TinyQAConfig) -> str:
    """The base URL clients use (``0.0.0.0`` / ``::`` listen everywhere: use loopback locally)."""
    host = cfg.serve.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"


def _join_cluster(cfg: TinyQAConfig, blocking: bool) -> None:
    """Make sure a cluster that outlives this process is joined (unless ``blocking``)."""
    if blocking:
        connect(cfg)
        return
    connect_persistent(cfg)
    if _cluster_lives_in_this_process():
        logger.warning(
            "this process started its own Ray (ray.init without an address): the endpoint goes "
            "away when the process exits; for a lasting endpoint run `ray start --head` first"
        )


def _cluster_lives_in_this_process() -> bool:
    from ray._private import worker  # no public API says whether this driver started the cluster

    node = getattr(worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def _start_serve(cfg: TinyQAConfig) -> None:
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    # Serve keeps the HTTP options it was first started with on this cluster.
    http = _get_global_client().http_config
    if (http.host, http.port) != (cfg.serve.host, cfg.serve.port):
        raise ServeError(
            f"Serve already runs on this cluster at {http.host}:{http.port}, not "
            f"{cfg.serve.host}:{cfg.serve.port}; set serve.host={http.host} "
            f"serve.port={http.port}, or `serve shutdown -y` first"
        )


def wait_healthy(url: str, timeout_s: float = HEALTH_TIMEOUT_S, api_key: str | None = None) -> dict:
    """Poll ``GET {url}/healthz`` until it answers 200; its JSON (with what is served when
    ``api_key`` is the endpoint's key, or it has none). Raises :class:`ServeError`."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=10.0, headers=headers)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise ServeError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s (last: {last})")


def deploy(cfg: TinyQAConfig, blocking: bool = False) -> str:
    """Deploy (or update) the endpoint for ``cfg``; returns its URL once ``/healthz`` answers.

    The config object goes to :func:`serving.app.application` as it is; it becomes a dict once,
    where it crosses into the replicas. ``blocking=True`` stays in the foreground until Ctrl-C,
    then removes the app and re-raises the ``KeyboardInterrupt``. Raises :class:`ServeError` /
    other :class:`TinyQAError`s for problems the user can fix.
    """
    # Here, not at the top: the app imports the model side (torch), which `shutdown` never needs.
    from serving.app import application, resolved

    cfg = resolved(cfg)
    s = cfg.serve
    _join_cluster(cfg, blocking)
    _start_serve(cfg)
    app = application(cfg)
    started = time.perf_counter()
    try:
        serve.run(app, name=s.app_name, route_prefix=s.route_prefix)
    except RuntimeError as e:
        raise ServeError(
            f"deploying app {s.app_name!r} failed: {last_line(e)}; "
            "see the replica logs (`serve status`, /tmp/ray/session_latest/logs/serve)"
        ) from e
    url = endpoint_url(cfg)
    info = wait_healthy(url, api_key=resolve_api_key(s.api_key))
    logger.info(
        "app %r ready at %s in %.1f s (base %s, default adapter %s)",
        s.app_name,
        url,
        time.perf_counter() - started,
        info.get("base_model"),
        info.get("default_adapter"),
    )
    if blocking:
        logger.info("serving at %s; press Ctrl-C to stop", url)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            logger.info("removing app %r", s.app_name)
            serve.delete(s.app_name)
            raise
    return url


def shutdown(cfg: TinyQAConfig) -> bool:
    """Remove the app from the cluster (the cluster and Serve keep running); True if it was
    deployed. No cluster or no such app: nothing to do (False)."""
    name = cfg.serve.app_name
    # A short command: Serve's controller / proxy lines and Ray's connect banner stay in Ray's
    # log files, not on the console (`tinyqa --verbose serve --shutdown` shows them).
    quiet = not logging.getLogger().isEnabledFor(logging.DEBUG)
    with _quiet_ray_loggers(quiet):
        # The same join as every other command: a plain ray.init("auto") swaps the loopback
        # address of a tinyqa-started cluster for this machine's network one and retries forever.
        if not join_existing(cfg, quiet=quiet):
            logger.info("no Ray cluster is running; app %r is not deployed", name)
            return False
        if name not in serve.status().applications:
            logger.info("app %r is not deployed on this cluster", name)
            return False
        serve.delete(name)
    logger.debug("removed app %r", name)
    return True


@contextlib.contextmanager
def _quiet_ray_loggers(quiet: bool) -> Iterator[None]:
    """Ray's and Serve's loggers at ERROR for the block (when ``quiet``), then as they were."""
    loggers = [logging.getLogger(n) for n in ("ray", "ray.serve")] if quiet else []
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
