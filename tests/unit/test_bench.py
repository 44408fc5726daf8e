"""Benchmarks without Ray: the training arms that need none, the GPU set (imports no Ray, TRL or
datasets, which the lent GPU machines lack), result files, and the ratio / target arithmetic."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import BenchError, format_bench, run_bench
from benchmarks.common import json_safe, new_result, percentile, target, write_result
from benchmarks.train import _fill_train_tables

REPO = Path(__file__).resolve().parents[2]
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
    """The suite's JSON, parsed strictly, with the markdown beside it; checks the common shape."""
    data = json.loads((folder / f"{suite}.json").read_text(), parse_constant=_reject_constant)
    assert set(data) == TOP_LEVEL
    assert data["suite"] == suite
    assert (folder / f"{suite}.md").read_text().startswith(f"## tinyqa bench {suite}")
    table = data["table"]
    assert table["rows"] and all(len(row) == len(table["columns"]) for row in table["rows"])
    for t in data["targets"]:
        assert set(t) == {"name", "target", "measured", "met", "higher_is_better", "note"}
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["versions"]["torch"]
    return data


def test_train_quick_seed_vs_tinyqa(make_config, tmp_path, tiny_dir):
    cfg = make_config()
    result = run_bench(cfg, "train", out=tmp_path / "bench", quick=True, arms=("seed", "tinyqa"))
    data = load_result(tmp_path / "bench", "train")
    assert result["paths"]["json"] == str(tmp_path / "bench" / "train.json")
    seed, tq = data["arms"]["seed"], data["arms"]["tinyqa"]
    for arm in (seed, tq):
        assert arm["steps"] == 3 and len(arm["step_seconds"]) == 3
        assert arm["effective_tokens"] > 0 and arm["peak_rss_mb"] > 0
        assert arm["effective_tokens_per_second"] > 0 and arm["effective_tokens_per_cpu_second"] > 0
    # The seed pads every row to 512 tokens and trains on all of them; tinyqa packs without
    # padding and trains on answers only.
    assert seed["padded_tokens"] == 3 * 4 * 512
    assert seed["padding_fraction"] > 0.5
    assert seed["loss_tokens"] == seed["effective_tokens"]
    assert tq["padded_tokens"] == tq["effective_tokens"] and tq["padding_fraction"] == 0
    assert 0 < tq["loss_tokens"] < tq["effective_tokens"]
    assert data["ratios"]["tinyqa / seed effective tokens/s (median step)"] > 0
    assert [len(runs) for runs in data["details"]["rounds"].values()] == [1, 1]
    assert data["ratios"]["ray / plain tokens/s (median step)"] is None  # arm not selected
    assert not list((tmp_path / "bench").glob("_work-*")), "scratch folders must be removed"


def test_gpu_set_runs_without_ray_trl_or_datasets(tmp_path, tiny_dir):
    """The job entry point, with the packages the GPU machine lacks made unimportable."""
    out = tmp_path / "gpu"
    code = (
        "import runpy, sys\n"
        "for name in ('ray', 'trl', 'datasets'):\n"
        "    sys.modules[name] = None\n"
        f"sys.argv = ['jobs/benchmark.py', 'gpu', '--quick', '--out', {str(out)!r}, "
        f"'storage_path={tmp_path / 'runs'}', 'model.name=tiny']\n"
        "runpy.run_path('jobs/benchmark.py', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = load_result(out, "gpu")
    assert set(data["arms"]) == {
        "train-nf4-b1",
        "train-none-b1",
        "train-nf4-b8",
        "train-none-b8",
        "generate-nf4",
        "generate-none",
    }
    for name, arm in data["arms"].items():
        assert arm["error"] is None, (name, arm["error"])
    train = data["arms"]["train-none-b8"]
    assert train["tokens_per_second"] > 0 and train["mfu"] > 0 and math.isfinite(train["loss"])
    gen = data["arms"]["generate-nf4"]
    # Answers are held to the full length, so latency is the cost of that many tokens.
    assert gen["new_tokens_min_max"] == [gen["new_tokens"], gen["new_tokens"]]
    assert gen["latency_p50_s"] > 0 and gen["batched"]
    assert data["details"]["matmul"]["tflops"] > 0
    # GPU targets are not claimed from a CPU smoke run.
    assert all(t["measured"] is None and t["met"] is None for t in data["targets"])


def _arm(**kw):
    base = {
        "steps": 10,
        "effective_tokens": 1000,
        "padding_fraction": 0.0,
        "hf_tokens_per_second": None,
        "median_step_seconds": 0.1,
        "train_wall_seconds": 1.0,
        "process_seconds": 10.0,
        "peak_rss_mb": 500.0,
        "peak_gpu_mb": None,
    }
    return base | kw


def test_train_ratios_and_targets():
    result = new_result(
        "train",
        False,
        {
            "model": "tiny",
            "steps": 10,
            "tinyqa_train": {
                "batch_size": 4,
                "gradient_accumulation_steps": 1,
                "packing": True,
                "completion_only_loss": True,
                "max_length": 256,
            },
        },
    )
    arms = {
        "seed": _arm(
            effective_tokens_per_second=100.0, effective_tokens_per_second_median_step=90.0
        ),
        "tinyqa": _arm(
            effective_tokens_per_second=350.0,
            effective_tokens_per_second_median_step=360.0,
            peak_rss_mb=600.0,
        ),
        "plain": _arm(
            hf_tokens_per_second=200.0,
            hf_tokens_per_second_median_step=250.0,
            process_seconds=20.0,
        ),
        "ray": {
            "steps": 10,
            "hf_tokens_seen": 1700,
            "hf_tokens_per_second": 170.0,
            "hf_tokens_per_second_median_step": 245.0,
            "train_wall_seconds": 10.0,
            "process_seconds": 40.0,
            "ray_init_seconds": 7.0,
            "peak_rss_mb": 700.0,
            "peak_gpu_mb": None,
        },
    }
    _fill_train_tables(result, arms, use_gpu=False)
    r = result["ratios"]
    assert r["tinyqa / seed effective tokens/s (median step)"] == pytest.approx(4.0)
    assert r["tinyqa / seed effective tokens/s (all steps)"] == pytest.approx(3.5)
    assert r["tinyqa / seed peak memory"] == pytest.approx(1.2)
    assert r["ray / plain tokens/s (train wall: steps, evals, checkpoints)"] == pytest.approx(0.85)
    assert r["ray / plain tokens/s (median step)"] == pytest.approx(0.98)
    assert r["ray / plain throughput end to end (process wall)"] == pytest.approx(0.5)
    met = {t["name"].split(",")[0]: t["met"] for t in result["targets"]}
    assert met == {
        "tinyqa default vs seed configuration": True,
        "Ray Train 1 worker vs plain TRL": False,
    }
    assert [row[0] for row in result["table"]["rows"]] == ["seed", "tinyqa", "plain", "ray"]


def test_target_directions_and_missing_values():
    assert target("x", 4.0, 3.0, higher_is_better=False)["met"] is True
    assert target("x", 4.0, 5.0, higher_is_better=False)["met"] is False
    assert target("x", 3.0, 3.0)["met"] is True
    assert target("x", 3.0, None)["met"] is None


def test_percentile_interpolates():
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    assert percentile([], 50) is None


def test_result_files_are_strict_json(tmp_path):
    result = new_result("tune", True, {"x": (1, 2)})
    result["table"] = {"title": "t", "columns": ["a", "b"], "rows": [["r", float("nan")]]}
    result["ratios"] = {"ok": 2.0, "missing": float("inf")}
    written = write_result(result, tmp_path)
    data = load_result(tmp_path, "tune")
    assert data["ratios"] == {"ok": 2.0, "missing": None}
    assert data["table"]["rows"] == [["r", None]]
    assert data["settings"]["x"] == [1, 2]
    assert written["paths"]["markdown"] == str(tmp_path / "tune.md")
    md = format_bench(written)
    assert "| r | – |" in md and "| ok | 2 |" in md
    assert json_safe({"n": float("nan"), 1: [True, None]}) == {"n": None, "1": [True, None]}


def test_unknown_suite_and_arm_are_user_errors(make_config, tmp_path):
    cfg = make_config()
    with pytest.raises(BenchError, match="unknown bench suite 'speed'"):
        run_bench(cfg, "speed", out=tmp_path)
    with pytest.raises(BenchError, match="unknown training bench arm"):
        run_bench(cfg, "train", out=tmp_path, quick=True, arms=("seed", "fast"))
    with pytest.raises(BenchError, match="--requests applies to the serve suite only"):
        run_bench(cfg, "train", out=tmp_path, requests=4)
    with pytest.raises(BenchError, match="--concurrency must list client counts"):
        run_bench(cfg, "serve", out=tmp_path, concurrency=(0, 16))
    with pytest.raises(BenchError, match="unknown serve bench arm.*fast; choose from baseline"):
        run_bench(cfg, "serve", out=tmp_path, arms=("static", "fast"))
    with pytest.raises(BenchError, match="--arms applies to the train and serve suites"):
        run_bench(cfg, "tune", out=tmp_path, arms=("baseline",))
    with pytest.raises(BenchError, match="--arms does not apply with --endpoint"):
        run_bench(cfg, "serve", out=tmp_path, endpoint="http://127.0.0.1:1", arms=("static",))
    assert list(tmp_path.iterdir()) == [], "a refused bench leaves nothing behind"


def _run(*args: str) -> subprocess.CompletedProcess:
    """This interpreter with ``args``, in the repository."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_serve_sizes_on_the_command_line():
    """`--requests 16 --concurrency 1,16` reach the serve suite; a malformed list is refused by
    the parser (exit 2, one line), before anything starts."""
    proc = _run("-m", "tinyqa.cli", "bench", "serve", "--concurrency", "1,x")
    assert proc.returncode == 2
    assert "expected client counts like 1,16, not '1,x'" in proc.stderr
    assert "Traceback" not in proc.stderr
    arms = _run("-m", "tinyqa.cli", "bench", "serve", "--arms", ",")
    assert arms.returncode == 2 and "expected arm names like baseline,static" in arms.stderr


def test_benchmark_job_help():
    proc = _run("jobs/benchmark.py", "--help")
    assert proc.returncode == 0 and "{train,serve,tune,gpu}" in proc.stdout


def test_best_of_rounds_takes_each_figure_from_its_least_disturbed_round():
    from benchmarks.train import _best

    rounds = [
        {
            "median_step_seconds": 2.0,
            "train_wall_seconds": 5.0,
            "hf_tokens_per_second": 100.0,
            "peak_rss_mb": 10.0,
            "steps": 20,
        },
        {
            "median_step_seconds": 1.0,
            "train_wall_seconds": 7.0,
            "hf_tokens_per_second": 70.0,
            "peak_rss_mb": 12.0,
            "steps": 20,
        },
    ]
    best = _best(rounds)
    assert best == {
        "median_step_seconds": 1.0,
        "train_wall_seconds": 5.0,
        "hf_tokens_per_second": 100.0,
        "peak_rss_mb": 12.0,
        "steps": 20,
        "rounds": 2,
    }


def test_benchmarks_use_only_public_tinyqa_names():
    """benchmarks/ is outside the library: no private names, no patching tinyqa's modules."""
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinyqa"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name}: imports {private} from {node.module}"
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                        assert t.value.id not in {"tinyqa", "training", "trainer"}, (
                            f"{path.name}:{node.lineno} assigns {t.value.id}.{t.attr}"
                        )
