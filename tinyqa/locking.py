"""One command at a time per experiment: a lock file ``<storage>/.<experiment>.lock``.

Two commands writing the same experiment (two sweeps, a sweep and an eval reading a
half-promoted ``best.json``) corrupt each other's outputs, so every command that writes an
experiment holds :func:`experiment_lock` while it runs. A second one fails at once with a message
that names the holder (pid, host, command, start time), read from a small JSON file written
beside the lock. Both sit beside the experiment folder, not in it, so a command that fails its
checks before writing anything leaves no experiment folder behind. The lock is an OS file lock (``filelock``): it dies with its process, so a
crashed command never leaves the experiment locked; the holder file may then be stale, and is
only read while the lock is really held.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from tinyqa.config import TinyQAConfig
from tinyqa.errors import StorageError, TinyQAError
from tinyqa.fileio import write_json

logger = logging.getLogger(__name__)


def lock_paths(cfg: TinyQAConfig) -> tuple[Path, Path]:
    """The experiment's lock file and the JSON file naming its holder.

    An object store has no file locks: for a bucket storage_path the lock lives in the local
    temp folder, keyed by the experiment's URI, so it guards this machine only.
    """
    root = cfg.run_dir.parent
    if not isinstance(root, Path):
        digest = hashlib.sha256(str(cfg.run_dir).encode()).hexdigest()[:16]
        root = Path(tempfile.gettempdir()) / "tinyqa-locks" / digest
        root.mkdir(parents=True, exist_ok=True)
    return root / f".{cfg.experiment}.lock", root / f".{cfg.experiment}.lock.json"


class ExperimentBusy(TinyQAError):
    """Another command holds the experiment's lock; the message names it."""


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "another tinyqa command (its details are unreadable)"
    return (
        f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, started {holder.get('started', '?')}: "
        f"{holder.get('argv', '?')})"
    )


@contextmanager
def experiment_lock(cfg: TinyQAConfig, command: str) -> Iterator[None]:
    """Hold the experiment's lock for the block; raises :class:`ExperimentBusy` at once when
    another command holds it."""
    run_dir = cfg.run_dir
    lock_file, holder_file = lock_paths(cfg)
    lock = FileLock(str(lock_file))
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        raise ExperimentBusy(
            f"experiment {cfg.experiment!r} ({run_dir}) is in use by "
            f"{_holder_text(holder_file)}; wait for it to finish (or stop it), or "
            "use another experiment name"
        ) from None
    except OSError as e:  # after Timeout (an OSError too); check_storage's words
        raise StorageError(
            f"storage_path {cfg.storage_path} is not writable ({e.strerror}); choose a folder "
            "you can write to"
        ) from e
    try:
        write_json(
            holder_file,
            {
                "command": command,
                "argv": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        logger.debug("holding the lock of experiment %s", cfg.experiment)
        yield
    finally:
        lock.release()
