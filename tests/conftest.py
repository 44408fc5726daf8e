"""Shared test setup: offline Hugging Face, one preset cache per machine, small fixtures."""

from __future__ import annotations

import os
from pathlib import Path

# Before transformers is imported anywhere: never reach for a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TINYQA_CACHE", str(Path.home() / ".cache" / "tinyqa"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Ray 2.60 turns token auth on for any cluster started while ~/.ray/auth_token exists, and a local
# ray.init() creates that file: test clusters (loopback only) run without it, deterministically.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The offline `tiny` preset folder (built once per machine, ~40 s)."""
    from tinyqa.presets import preset_dir

    return preset_dir("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from tinyqa.config import ModelSettings
    from tinyqa.model import load_tokenizer

    return load_tokenizer(ModelSettings(name="tiny"))


@pytest.fixture
def make_config(tmp_path):
    """Build a validated config on the tiny CPU settings, storage under tmp_path."""
    from tinyqa.config import load_config

    def make(*overrides: str, config: str | None = "jobs/configs/tiny-cpu.yaml"):
        path = REPO / config if config else None
        # MLflow off unless a test turns it on: a fresh SQLite store costs seconds to create.
        base = [f"storage_path={tmp_path / 'runs'}", "tracking.mlflow=false"]
        return load_config(path, [*base, *overrides])

    return make


@pytest.fixture(scope="session")
def adapter_helpers():
    """tests/unit/_adapters.py (in-process tiny adapter training, no Ray), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_adapters", REPO / "tests/unit/_adapters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
