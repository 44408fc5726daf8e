"""tinyqa.storage against a real S3 API (moto's server on 127.0.0.1) and on local disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tinyqa import storage
from tinyqa.errors import StorageError
from tinyqa.storage import RemotePath, location

BUCKET = "s3://tinyqa-test"


def test_location_kinds(tmp_path):
    assert location(str(tmp_path)) == tmp_path.resolve()
    assert location(f"file://{tmp_path}") == tmp_path.resolve()
    remote = location(f"{BUCKET}/runs/")
    assert isinstance(remote, RemotePath)
    assert str(remote / "exp" / "best.json") == f"{BUCKET}/runs/exp/best.json"
    assert (remote / "exp").name == "exp" and (remote / "exp").parent == remote
    assert storage.ray_storage(remote) == ("tinyqa-test/runs", remote.fs)
    with pytest.raises(ValueError, match="not supported"):
        location("ftp://host/x")


def test_objects_roundtrip(s3):
    root = location(f"{BUCKET}/runs")
    storage.write_json(root / "best.json", {"adapter_id": "a", "value": 1.5})
    storage.write_text(root / "sweep.md", "# sweep\n")
    storage.write_file(root / "results.csv", lambda p: p.write_text("a,b\n1,2\n"))
    assert storage.read_json(root / "best.json") == {"adapter_id": "a", "value": 1.5}
    assert (root / "results.csv").read_text() == "a,b\n1,2\n"
    assert (root / "sweep.md").is_file() and not (root / "nope").exists()
    assert root.is_dir() and not (root / "best.json").is_dir()
    assert [p.name for p in root.iterdir()] == ["best.json", "results.csv", "sweep.md"]
    assert s3.keys("tinyqa-test") == ["runs/best.json", "runs/results.csv", "runs/sweep.md"]


def test_atomic_folder_manifest_last_and_download(s3, tmp_path):
    target = location(f"{BUCKET}/runs/adapters/a1")
    with storage.atomic_folder(target, "tinyqa.json") as tmp:
        (tmp / "weights.bin").write_bytes(b"\0" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "tok.json").write_text("{}")
        (tmp / "tinyqa.json").write_text(json.dumps({"adapter_id": "a1"}))
    assert [k for k, _ in target.walk_files()] == ["sub/tok.json", "tinyqa.json", "weights.bin"]
    out = tmp_path / "dl"
    assert storage.download_folder(target, out) == 1000 + 2 + len('{"adapter_id": "a1"}')
    assert (out / "sub" / "tok.json").read_text() == "{}"

    # A failure inside the block uploads nothing (the old folder stays as it was).
    with pytest.raises(RuntimeError), storage.atomic_folder(target, "tinyqa.json") as tmp:
        (tmp / "tinyqa.json").write_text("{}")
        raise RuntimeError("boom")
    assert storage.read_json(target / "tinyqa.json") == {"adapter_id": "a1"}


def test_upload_order_puts_marker_last(s3, tmp_path, monkeypatch):
    (tmp_path / "b.bin").write_bytes(b"x")
    (tmp_path / "tinyqa.json").write_text("{}")
    (tmp_path / "z.bin").write_bytes(b"y")
    order = []
    real = RemotePath.write_bytes
    monkeypatch.setattr(
        RemotePath, "write_bytes", lambda self, d: (order.append(self.name), real(self, d))
    )
    assert storage.upload_folder(tmp_path, location(f"{BUCKET}/f"), last="tinyqa.json") == 3
    assert order == ["b.bin", "z.bin", "tinyqa.json"]


def test_local_paths_delegate_to_fileio(tmp_path):
    storage.write_json(tmp_path / "x" / "best.json", {"a": 1})
    assert json.loads((tmp_path / "x" / "best.json").read_text()) == {"a": 1}
    with storage.atomic_folder(tmp_path / "ad", "tinyqa.json") as tmp:
        (tmp / "tinyqa.json").write_text("{}")
    assert (tmp_path / "ad" / "tinyqa.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["ad", "x"]  # no temporaries left


def test_check_writable(s3, tmp_path):
    storage.check_writable(location(f"{BUCKET}/runs"))
    assert s3.keys("tinyqa-test") == []  # the probe is deleted
    with pytest.raises(StorageError, match="s3://no-such-bucket"):
        storage.check_writable(location("s3://no-such-bucket/runs"))


def test_server_down_is_a_clear_error(s3):
    root = location(f"{BUCKET}/runs", {"connect_timeout_s": 1, "max_attempts": 1})
    storage.write_text(root / "a.txt", "x")
    s3.stop()
    with pytest.raises(StorageError) as err:
        (root / "a.txt").read_text()
    assert f"storage {BUCKET}/runs/a.txt is unavailable" in str(err.value)
    s3.start()  # the in-process server keeps its objects, like a store after an outage
    assert (root / "a.txt").read_text() == "x"


def test_folder_cache_lru_and_missing(s3, tmp_path):
    root = location(f"{BUCKET}/adapters")
    for name in ("a", "b", "c"):
        with storage.atomic_folder(root / name, "tinyqa.json") as tmp:
            (tmp / "w.bin").write_bytes(b"\0" * 4000)
            (tmp / "tinyqa.json").write_text(json.dumps({"adapter_id": name}))
    cache = storage.FolderCache(tmp_path / "cache", max_bytes=9000, timeout_s=30)
    a = cache.get(root / "a", "tinyqa.json")
    assert isinstance(a, Path) and (a / "w.bin").stat().st_size == 4000
    assert cache.get(root / "a", "tinyqa.json") == a  # a hit: no second download
    cache.get(root / "b", "tinyqa.json")
    cache.get(root / "c", "tinyqa.json")  # over budget: 'a' (least recently used) goes
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert names == ["b", "c"]
    with pytest.raises(FileNotFoundError):
        cache.get(root / "missing", "tinyqa.json")
    # A local folder is used in place.
    assert cache.get(tmp_path, "tinyqa.json") == tmp_path


def test_best_file_is_reread_after_its_ttl(s3, monkeypatch):
    from tinyqa.adapters import BestFile

    best = location(f"{BUCKET}/runs/best.json")
    storage.write_json(best, {"adapter_id": "one"})
    now = [100.0]
    monkeypatch.setattr("tinyqa.adapters.time.monotonic", lambda: now[0])
    watched = BestFile(best, ttl_s=10, current="one")
    storage.write_json(best, {"adapter_id": "two"})
    assert watched.adapter_id() == "one"  # inside the TTL: no read
    now[0] += 11
    assert watched.adapter_id() == "two"
    s3.stop()
    now[0] += 11
    assert watched.adapter_id() == "two"  # storage down: the last good value


def test_remote_adapter_lookup_and_errors(s3, tmp_path):
    from serving.api import ApiError, ModelCatalog
    from tinyqa.adapters import fetch_adapter, list_adapters, resolve_adapter
    from tinyqa.errors import UnknownAdapter

    root = location(f"{BUCKET}/runs/adapters", {"connect_timeout_s": 1, "max_attempts": 1})
    with storage.atomic_folder(root / "good", "tinyqa.json") as tmp:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (tmp / name).write_text("{}")
        (tmp / "tinyqa.json").write_text(json.dumps({"adapter_id": "good", "base_model": "tiny"}))
    # A folder whose manifest has not arrived yet (upload in progress) does not exist.
    storage.write_text(root / "half" / "adapter_model.safetensors", "{}")
    assert list_adapters(root) == ["good"]
    with pytest.raises(UnknownAdapter, match="unknown adapter 'half'"):
        resolve_adapter(root, "half")
    with pytest.raises(UnknownAdapter):
        fetch_adapter(root / "half")
    catalog = ModelCatalog("tiny", root, None)
    assert catalog.select("good") == "good"
    with pytest.raises(ApiError) as err:
        catalog.select("nope")
    assert err.value.status == 404
    s3.stop()
    with pytest.raises(ApiError) as err:
        catalog.select("good")
    assert err.value.status == 503 and err.value.code == "storage_unavailable"
    assert f"{BUCKET}/runs/adapters" in err.value.message


def test_local_storage_does_not_load_pyarrow():
    """Only a cloud URI pays for pyarrow: the ingress and `tinyqa --help` on local storage stay light."""
    import subprocess
    import sys

    code = (
        "import sys; from tinyqa.config import load_config; from tinyqa import adapters; "
        "cfg = load_config(None, ['storage_path=/tmp/x']); adapters.list_adapters(cfg.adapters_dir); "
        "print('pyarrow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
