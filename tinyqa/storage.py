"""Where artifacts live: a local (or shared) folder, or an ``s3://`` / ``gs://`` bucket.

:func:`location` turns ``storage_path`` into either a :class:`~pathlib.Path` (local: every write
goes through :mod:`tinyqa.fileio`, atomic by rename) or a :class:`RemotePath` (an object store,
reached through ``pyarrow.fs``, the filesystem Ray Train / Tune use for the same URI). A
``RemotePath`` answers the read-side calls code already makes on a ``Path`` (``/``, ``name``,
``parent``, ``exists``, ``is_file``, ``is_dir``, ``iterdir``, ``read_text``, ``read_bytes``), so
readers work on both; writers call this module's ``write_*`` / :func:`atomic_folder`.

Atomicity on an object store: one object appears whole or not at all (we hand pyarrow the
complete bytes in one write). A folder (an adapter, the prepared data) becomes visible through one
small object written *last* (its manifest or marker); :func:`atomic_folder` deletes that marker
first when it replaces a folder, uploads the other files, then the marker. Readers treat a folder
without its marker as absent (``adapters.list_adapters`` / ``resolve_adapter`` already do).

Endpoint, region and timeouts come from the ``storage.*`` config block, else from the usual
environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``STORAGE_EMULATOR_HOST`` for GCS). Credentials are never taken from a config: the AWS / Google
SDKs read them from the environment, a profile or the instance role.

``pyarrow.fs`` is imported only when a cloud URI is used, so the light core (the HTTP ingress,
``tinyqa --help``) stays light on local storage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tinyqa import fileio
from tinyqa.errors import StorageError, first_line

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs")


@dataclass(frozen=True)
class StorageOptions:
    """How to reach an object store (no credentials: those come from the environment)."""

    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    max_attempts: int = 3

    @classmethod
    def from_settings(cls, settings: Any) -> StorageOptions:
        """From a ``storage`` config section (or a dict of the same keys, or None)."""
        if settings is None:
            return cls()
        if not isinstance(settings, dict):
            settings = settings.model_dump()
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in settings.items() if k in known})


def is_remote(where: str | os.PathLike[str] | RemotePath) -> bool:
    """True for an ``s3://`` / ``gs://`` location."""
    return isinstance(where, RemotePath) or str(where).startswith(
        tuple(f"{s}://" for s in CLOUD_SCHEMES)
    )


def check_uri(value: str) -> str:
    """Validate a ``storage_path``: a local path, ``file://``, ``s3://bucket[/prefix]`` or
    ``gs://bucket[/prefix]``. Returns it normalised; raises ``ValueError`` naming the problem."""
    if "://" not in value:
        return value
    scheme = value.split("://", 1)[0].lower()
    if scheme == "file":
        return value.removeprefix("file://")
    if scheme not in CLOUD_SCHEMES:
        raise ValueError(
            f"scheme {scheme + '://'!r} is not supported: use a local or shared folder, "
            "s3://bucket/prefix or gs://bucket/prefix"
        )
    bucket = urlparse(value).netloc
    if not bucket:
        raise ValueError(f"{value!r} names no bucket; write {scheme}://bucket/prefix")
    return f"{scheme}://{bucket}/{urlparse(value).path.strip('/')}".rstrip("/")


def location(
    where: str | os.PathLike[str] | RemotePath, options: StorageOptions | Any = None
) -> Path | RemotePath:
    """A local absolute :class:`Path`, or a :class:`RemotePath` for a cloud URI."""
    if isinstance(where, RemotePath):
        return where
    text = check_uri(str(where))
    if is_remote(text):
        parsed = urlparse(text)
        if not isinstance(options, StorageOptions):
            options = StorageOptions.from_settings(options)
        return RemotePath(parsed.scheme, parsed.netloc, parsed.path.strip("/"), options)
    return Path(text).expanduser().resolve()


# ----------------------------------------------------------------------------------------------
# filesystems
# ----------------------------------------------------------------------------------------------
_FILESYSTEMS: dict[tuple[str, StorageOptions], Any] = {}


def _endpoint(options: StorageOptions, scheme: str) -> tuple[str | None, str]:
    """(host[:port], 'http'|'https') of a custom endpoint, or (None, 'https')."""
    if scheme == "s3":
        url = (
            options.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
    else:
        url = options.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")
    if not url:
        return None, "https"
    if "://" not in url:
        url = "https://" + url
    parsed = urlparse(url)
    return parsed.netloc, parsed.scheme or "https"


def filesystem(scheme: str, options: StorageOptions | None = None):
    """The (cached) ``pyarrow.fs`` filesystem for ``scheme`` with ``options``."""
    import pyarrow.fs as pafs  # only cloud storage pays for pyarrow (see the module docstring)

    options = options or StorageOptions()
    key = (scheme, options)
    # The environment is part of the key in effect: an endpoint set later (tests) is a new fs.
    env_key = (
        os.environ.get("AWS_ENDPOINT_URL_S3"),
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("STORAGE_EMULATOR_HOST"),
    )
    cached = _FILESYSTEMS.get(key)
    if cached is not None and cached[0] == env_key:
        return cached[1]
    host, http = _endpoint(options, scheme)
    if scheme == "s3":
        region = (
            options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        )
        kwargs: dict[str, Any] = {
            "connect_timeout": options.connect_timeout_s,
            "request_timeout": options.request_timeout_s,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
        }
        if region:
            kwargs["region"] = region
        if host:
            kwargs.update(endpoint_override=host, scheme=http)
        fs = pafs.S3FileSystem(**kwargs)
    elif scheme == "gs":
        import datetime

        kwargs = {"retry_time_limit": datetime.timedelta(seconds=options.request_timeout_s)}
        if host:
            kwargs.update(endpoint_override=host, scheme=http, anonymous=True)
        fs = pafs.GcsFileSystem(**kwargs)
    else:
        raise StorageError(f"unsupported storage scheme {scheme!r}; use s3:// or gs://")
    _FILESYSTEMS[key] = (env_key, fs)
    return fs


def ray_storage(where: str | os.PathLike[str] | RemotePath) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: a local path and None, or
    the bucket path and our configured filesystem (so Ray uses the same endpoint and region)."""
    if isinstance(where, RemotePath):
        return where.fs_path, where.fs
    return str(where), None


# ----------------------------------------------------------------------------------------------
# RemotePath: a Path-shaped handle on an object-store key
# ----------------------------------------------------------------------------------------------
class RemotePath:
    """An object or prefix in a bucket, with the read side of :class:`pathlib.Path`.

    ``str()`` gives the URI. Every call that reaches the store turns a storage failure into a
    :class:`StorageError` naming the URI.
    """

    __slots__ = ("scheme", "bucket", "key", "options")

    def __init__(self, scheme: str, bucket: str, key: str, options: StorageOptions | None = None):
        self.scheme, self.bucket, self.key = scheme, bucket, key.strip("/")
        self.options = options or StorageOptions()

    # --- pure path operations ---
    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}".rstrip("/")

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: str | os.PathLike[str]) -> RemotePath:
        part = str(part).strip("/")
        key = f"{self.key}/{part}" if self.key else part
        return RemotePath(self.scheme, self.bucket, key, self.options)

    def __reduce__(self):  # picklable across Ray boundaries (options is a frozen dataclass)
        return (RemotePath, (self.scheme, self.bucket, self.key, self.options))

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1] if self.key else self.bucket

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.scheme, self.bucket, self.key.rpartition("/")[0], self.options)

    @property
    def fs_path(self) -> str:
        """``bucket/key``: the path ``pyarrow.fs`` and Ray's ``storage_filesystem`` take."""
        return f"{self.bucket}/{self.key}".rstrip("/")

    @property
    def fs(self):
        return filesystem(self.scheme, self.options)

    def expanduser(self) -> RemotePath:
        return self

    def resolve(self) -> RemotePath:
        return self

    # --- store access ---
    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(
                f"storage {self} is unavailable while {what}: {first_line(e)}; check the endpoint "
                "(storage.endpoint_url / AWS_ENDPOINT_URL), credentials and network, then rerun"
            ) from e

    def _info(self):
        with self._guard("reading its metadata"):
            return self.fs.get_file_info(self.fs_path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def stat_size(self) -> int:
        return int(self._info().size or 0)

    def mtime_ns(self) -> int | None:
        return self._info().mtime_ns

    def iterdir(self) -> Iterator[RemotePath]:
        import pyarrow.fs as pafs

        with self._guard("listing it"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            yield self / info.path.rsplit("/", 1)[-1]

    def walk_files(self) -> list[tuple[str, int]]:
        """Every object under this prefix as (relative key, size), sorted."""
        import pyarrow.fs as pafs

        with self._guard("listing it"):
            infos = self.fs.get_file_info(
                pafs.FileSelector(self.fs_path, recursive=True, allow_not_found=True)
            )
        base = self.fs_path + "/"
        return sorted(
            (i.path.removeprefix(base), int(i.size or 0))
            for i in infos
            if i.type == pafs.FileType.File
        )

    def read_bytes(self) -> bytes:
        with self._guard("reading it"), self.fs.open_input_stream(self.fs_path) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        # One write of the complete bytes: the object appears whole when the stream closes.
        with self._guard("writing it"), self.fs.open_output_stream(self.fs_path) as f:
            f.write(data)

    def unlink(self, missing_ok: bool = False) -> None:
        with self._guard("deleting it"):
            try:
                self.fs.delete_file(self.fs_path)
            except FileNotFoundError:
                if not missing_ok:
                    raise

    def rmtree(self) -> None:
        with self._guard("deleting it"), suppress(FileNotFoundError):
            self.fs.delete_dir(self.fs_path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no folders (kept so callers need not branch)."""


Location = Path | RemotePath


# ----------------------------------------------------------------------------------------------
# writes (atomic on both kinds of storage)
# ----------------------------------------------------------------------------------------------
def write_bytes(where: Location | str, data: bytes) -> Location:
    """Replace the object / file with ``data``."""
    where = location(where)
    if isinstance(where, RemotePath):
        where.write_bytes(data)
        return where
    return fileio.write_bytes(where, data)


def write_text(where: Location | str, text: str) -> Location:
    """Replace the object / file with ``text`` (UTF-8)."""
    return write_bytes(where, text.encode("utf-8"))


def write_json(where: Location | str, data: Any, *, sort_keys: bool = False) -> Location:
    """Replace the object / file with ``data`` as indented JSON and a final newline; the JSON is
    serialised before anything is written."""
    return write_text(where, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_file(where: Location | str, write: Callable[[Path], object]) -> Location:
    """Replace the object / file with what ``write(tmp)`` writes to a local temporary path (for
    writers that take a path: ``DataFrame.to_csv``, ``Figure.savefig``)."""
    where = location(where)
    if not isinstance(where, RemotePath):
        return fileio.write_file(where, write)
    with tempfile.TemporaryDirectory(prefix="tinyqa-upload-") as tmp:
        path = Path(tmp) / where.name
        write(path)
        where.write_bytes(path.read_bytes())
    return where


def read_json(where: Location | str) -> Any:
    return json.loads(location(where).read_text(encoding="utf-8"))


def upload_folder(local: Path, where: RemotePath, last: str | None = None) -> int:
    """Upload every file under ``local`` to ``where``, the file named ``last`` after the others.
    Returns the number of objects written."""
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    if last is not None:
        files.sort(key=lambda p: p.relative_to(local).as_posix() == last)
    for path in files:
        (where / path.relative_to(local).as_posix()).write_bytes(path.read_bytes())
    return len(files)


def download_folder(where: RemotePath, local: Path, deadline: float | None = None) -> int:
    """Copy every object under ``where`` into the local folder ``local`` (created). Raises
    :class:`StorageError` past ``deadline`` (a ``time.monotonic()`` value). Returns bytes copied."""
    local = Path(local)
    total = 0
    for rel, _size in where.walk_files():
        if deadline is not None and time.monotonic() > deadline:
            raise StorageError(f"downloading {where} timed out; check the storage endpoint")
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = (where / rel).read_bytes()
        target.write_bytes(data)
        total += len(data)
    return total


@contextmanager
def atomic_folder(where: Location | str, marker: str) -> Iterator[Path]:
    """Yield an empty local folder; when the block ends without an exception it becomes ``where``.

    Local: :func:`tinyqa.fileio.atomic_folder` (rename into place). Object store: the old marker
    object is deleted first (the folder reads as absent from then on), the files are uploaded,
    and ``marker`` (the manifest) last, which makes the folder visible again. On an exception
    nothing is uploaded.
    """
    where = location(where)
    if not isinstance(where, RemotePath):
        with fileio.atomic_folder(where) as tmp:
            yield tmp
        return
    tmp = Path(tempfile.mkdtemp(prefix="tinyqa-folder-"))
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise StorageError(f"{where}: the folder to upload has no {marker}")
        (where / marker).unlink(missing_ok=True)
        count = upload_folder(tmp, where, last=marker)
        logger.info("uploaded %d objects to %s", count, where)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(where: Location | str) -> None:
    """Write and delete a probe object / file; raises :class:`StorageError` naming the place."""
    where = location(where)
    probe = where / f".write-test-{os.getpid()}"
    try:
        write_bytes(probe, b"")
        probe.unlink(missing_ok=True)
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(
            f"storage_path {where} is not writable ({e.strerror or first_line(e)}); choose a "
            "folder (or bucket) you can write to"
        ) from e


# ----------------------------------------------------------------------------------------------
# a local, size-bounded cache of folders downloaded from cloud storage
# ----------------------------------------------------------------------------------------------
class FolderCache:
    """Downloads folders (adapters) from an object store into ``root`` on first use.

    A folder is fetched into a hidden temporary folder and renamed into place, so a reader never
    sees half of it; its cache name includes the marker object's modification time, so a
    retrained adapter under the same id is fetched again. The least recently used folders are
    deleted while the cache holds more than ``max_bytes`` (never the one just asked for).
    """

    def __init__(self, root: Path, max_bytes: int, timeout_s: float = 120.0) -> None:
        import threading

        self.root, self.max_bytes, self.timeout_s = Path(root), max_bytes, timeout_s
        self._lock = threading.Lock()

    def get(self, where: Location | str, marker: str) -> Path:
        """The local folder for ``where`` (a local ``where`` is returned as it is).

        Raises ``FileNotFoundError`` when ``where`` has no ``marker`` object (no such folder, or
        one still being written) and :class:`StorageError` when the store is unavailable or the
        download takes longer than the timeout.
        """
        where = location(where)
        if not isinstance(where, RemotePath):
            return where
        import hashlib

        import pyarrow.fs as pafs

        info = (where / marker)._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{where} holds no {marker}")
        digest = hashlib.sha256(f"{where}|{info.mtime_ns}|{info.size}".encode()).hexdigest()[:16]
        dest = self.root / f"{where.name}-{digest}"
        with self._lock:
            if (dest / marker).is_file():
                os.utime(dest)  # most recently used
                return dest
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{where.name}-", dir=self.root))
            try:
                started = time.monotonic()
                size = download_folder(where, tmp, deadline=started + self.timeout_s)
                if not (tmp / marker).is_file():
                    raise FileNotFoundError(f"{where} lost its {marker} while downloading")
                os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide it from other local users
                try:
                    os.rename(tmp, dest)
                except OSError:
                    if not (dest / marker).is_file():  # not another process's finished copy
                        raise
                logger.info(
                    "downloaded %s (%d bytes) in %.1f s", where, size, time.monotonic() - started
                )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._evict(keep=dest)
        return dest

    def _evict(self, keep: Path) -> None:
        entries = []
        for p in self.root.iterdir():
            if p.name.startswith(".") or not p.is_dir():
                continue
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            entries.append((p.stat().st_mtime, p, size))
        total = sum(size for _, _, size in entries)
        for _, p, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            shutil.rmtree(p, ignore_errors=True)
            total -= size
            logger.info("adapter cache over %d bytes: removed %s", self.max_bytes, p.name)


def remove_tree(where: Location | str) -> None:
    """Delete a folder / every object under a prefix (absent is fine)."""
    where = location(where)
    if isinstance(where, RemotePath):
        where.rmtree()
    else:
        shutil.rmtree(where, ignore_errors=True)
