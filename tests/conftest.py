"""Shared test setup: offline Hugging Face, one preset cache per machine, small fixtures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


class S3Server:
    """A local S3 API (moto's standalone server) on 127.0.0.1, stoppable and restartable on the
    same port (the fault tests stop it mid-run)."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self) -> dict[str, str]:
        # Fake credentials for the fake server; the region keeps the SDK from asking IMDS.
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self, **options: Any) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` on this server (the client Ray and tinyqa use)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1", **options
        )

    def create_bucket(self, name: str) -> None:
        self.filesystem(allow_bucket_creation=True).create_dir(name)

    def read(self, bucket: str, key: str) -> bytes:
        with self.filesystem().open_input_stream(f"{bucket}/{key}") as f:
            return f.read()

    def reset(self) -> None:
        """Forget every bucket: moto keeps its state per process, across server restarts."""
        import urllib.request

        urllib.request.urlopen(
            urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"), timeout=10
        ).close()

    def close(self) -> None:
        """Forget every bucket (running again if a test stopped it), then stop: moto's store
        outlives the server in this process, so later tests start from nothing."""
        if self._server is None:
            self.start()
        self.reset()
        self.stop()

    def keys(self, bucket: str) -> list[str]:
        """Every object key in ``bucket``, sorted."""
        import pyarrow.fs as pafs

        infos = self.filesystem().get_file_info(pafs.FileSelector(bucket, recursive=True))
        return sorted(
            i.path.removeprefix(bucket + "/") for i in infos if i.type == pafs.FileType.File
        )


@pytest.fixture
def s3(monkeypatch):
    """A running moto S3 server with bucket ``tinyqa-test``; the AWS_* variables point at it for
    this test (and for the Ray clusters it starts, which inherit the environment)."""
    server = S3Server()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    server.start()
    server.reset()  # an empty store, whatever an earlier test (or module fixture) left in it
    server.create_bucket("tinyqa-test")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def s3_server_factory():
    """:class:`S3Server` itself, for fixtures of a wider scope than :func:`s3`."""
    return S3Server
