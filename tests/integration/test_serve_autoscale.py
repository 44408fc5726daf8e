"""Autoscaling under load: the model deployment goes 1 -> 2 replicas and back, and no request fails
while it changes. Short delays and a short metrics window keep this within about a minute."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PORT = 8124
UPSCALE_WITHIN_S = 90.0
DOWNSCALE_WITHIN_S = 60.0
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def autoscaled(tmp_path_factory):
    """The base model alone (no adapters in storage), autoscaling between 1 and 2 replicas."""
    import ray
    from ray import serve

    from serving.deploy import deploy
    from tinyqa.config import load_config

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    cfg = load_config(
        REPO / "jobs/configs/tiny-cpu.yaml",
        [
            f"storage_path={tmp_path_factory.mktemp('autoscale')}",
            f"serve.port={PORT}",
            "serve.app_name=tinyqa-autoscale",
            "serve.num_cpus=0.5",
            "serve.min_replicas=1",
            "serve.max_replicas=2",
            "serve.target_ongoing_requests=2",
            "serve.upscale_delay_s=1.0",
            "serve.downscale_delay_s=3.0",
            "serve.look_back_period_s=2.0",
            "serve.metrics_interval_s=0.5",
            "serve.max_batch_size=2",
            "serve.max_ongoing_requests=8",
            "serve.max_queued_requests=-1",  # nothing may be rejected in this test
        ],
    )
    try:
        yield deploy(cfg), cfg.serve.app_name
    finally:
        serve.shutdown()
        ray.shutdown()


def _replicas(app: str) -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[app].deployments["QAModel"].replica_states)


class Load:
    """``clients`` threads sending sampled (long) answers back to back; records every status."""

    def __init__(self, url: str, clients: int):
        self.url, self.statuses, self.errors = url, [], []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        body = {"question": "How do I read a file?", "temperature": 1.5, "max_new_tokens": 48}
        with httpx.Client(base_url=self.url, timeout=60.0) as c:
            while not self._stop.is_set():
                try:
                    self.statuses.append(c.post("/v1/ask", json=body).status_code)
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def _wait_for(predicate, within_s: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.5)
    pytest.fail(f"{what} did not happen within {within_s:.0f} s")


def test_scales_up_under_load_and_back_without_failures(autoscaled):
    url, app = autoscaled
    assert _replicas(app) == {"RUNNING": 1}

    heavy = Load(url, clients=8)
    try:
        up_s = _wait_for(
            lambda: _replicas(app).get("RUNNING", 0) == 2, UPSCALE_WITHIN_S, "scale-up"
        )
        served_before = len(heavy.statuses)
        _wait_for(lambda: len(heavy.statuses) >= served_before + 16, 30.0, "traffic on 2 replicas")
    finally:
        heavy.stop()
    logger.info("scaled up to 2 replicas in %.1f s under load", up_s)

    light = Load(url, clients=1)  # keeps traffic flowing while a replica drains
    try:
        down_s = _wait_for(
            lambda: _replicas(app) == {"RUNNING": 1}, DOWNSCALE_WITHIN_S, "scale-down"
        )
    finally:
        light.stop()
    logger.info("scaled back to 1 replica in %.1f s", down_s)

    statuses = heavy.statuses + light.statuses
    assert heavy.errors + light.errors == []
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert len(light.statuses) > 0
