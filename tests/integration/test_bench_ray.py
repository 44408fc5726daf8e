"""Benchmark suites that need Ray, in quick mode: the Ray Train arm, the sweep, and Serve over HTTP.

Each starts its own private local Ray in a child process (never another session's cluster) and
checks the result files, not the timings.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from benchmarks import run_bench

pytestmark = pytest.mark.integration

TOP_LEVEL = {
    "suite",
    "quick",
    "created",
    "machine",
    "settings",
    "table",
    "ratios",
    "targets",
    "arms",
    "details",
    "notes",
    "wall_seconds",
    "paths",
}


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def load_result(folder: Path, suite: str) -> dict:
    data = json.loads((folder / f"{suite}.json").read_text(), parse_constant=_reject_constant)
    assert set(data) == TOP_LEVEL and data["suite"] == suite and data["quick"] is True
    assert (folder / f"{suite}.md").is_file()
    assert all(len(r) == len(data["table"]["columns"]) for r in data["table"]["rows"])
    assert not list(folder.glob("_work-*")), "scratch folders must be removed"
    return data


def _free_port_in(lo: int, hi: int) -> int:
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip(f"no free port in {lo}-{hi}")


def test_train_ray_arm_reports_worker_figures(make_config, tmp_path):
    run_bench(make_config(), "train", out=tmp_path, quick=True, arms=("ray",))
    arm = load_result(tmp_path, "train")["arms"]["ray"]
    assert arm["steps"] == 3 and len(arm["step_seconds"]) == 3  # timed inside the worker
    assert arm["hf_tokens_seen"] > 0 and arm["train_wall_seconds"] > 0
    assert arm["ray_init_seconds"] > 0 and arm["process_seconds"] > arm["train_wall_seconds"]
    # Measured inside the Train worker (wrapped loop), not in the driver.
    assert arm["peak_rss_mb"] > 0 and arm["threads"] >= 1


def test_tune_quick_counts_iterations_and_efficiency(make_config, tmp_path):
    run_bench(make_config(), "tune", out=tmp_path, quick=True)
    data = load_result(tmp_path, "tune")
    sweep = data["arms"]["sweep"]
    assert sweep["n_trials"] == 2 and len(sweep["trials"]) == 2
    assert sweep["iterations_full"] == 2 * sweep["expected_iterations"]
    assert 0 < sweep["iterations_run"] <= sweep["iterations_full"]
    assert sweep["trial_seconds"] > 0 and sweep["parallel_efficiency"] > 0
    assert data["ratios"]["ASHA / full grid trial-iterations"] == pytest.approx(
        sweep["iterations_run"] / sweep["iterations_full"]
    )


def test_serve_quick_over_http(make_config, tmp_path):
    port = _free_port_in(8200, 8300)
    run_bench(make_config(f"serve.port={port}"), "serve", out=tmp_path, quick=True)
    data = load_result(tmp_path, "serve")
    base = data["arms"]["baseline"]
    assert base["requests"] == 8 and base["completion_tokens"] > 0
    modes = data["arms"]["serve"]["modes"]
    # Streamed chat completions (SSE) run alone (c1; at 16 clients in a full run).
    assert set(modes) == {"1 adapter", "4 adapters", "1 adapter, streamed"}
    for label, by_clients in modes.items():
        assert set(by_clients) == ({"c1"} if "streamed" in label else {"c1", "c4"})
        for m in by_clients.values():
            assert m["errors"] == 0, (label, m["first_error"])
            assert m["ok"] == 8 and m["completion_tokens"] > 0
    # Same questions, same greedy model and adapter weights: the same answers over HTTP.
    assert modes["1 adapter"]["c1"]["completion_tokens"] == base["completion_tokens"]
    streamed = modes["1 adapter, streamed"]["c1"]
    assert streamed["completion_tokens"] == base["completion_tokens"]
    assert 0 < streamed["ttft_p50_s"] <= streamed["latency_p50_s"]
    # tiny has no GGUF: the llama.cpp arm says why it did not run.
    assert any(n.startswith("llama.cpp arm") for n in data["notes"])
    with socket.socket() as s:  # the scratch deployment is gone
        assert s.connect_ex(("127.0.0.1", port)) != 0
