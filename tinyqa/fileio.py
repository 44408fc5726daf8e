"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of either.

Files are written to a hidden temporary file in the same folder and renamed over the target
(``os.replace`` is atomic within one filesystem); folders are filled in a hidden temporary folder
beside the target, which then takes the target's name. A failure at any point removes the
temporary and leaves the target as it was.

Permissions: new files and folders get what a plain ``open`` / ``mkdir`` would give them, i.e.
``0o666`` / ``0o777`` minus the process umask. ``tempfile.mkstemp`` / ``mkdtemp`` would make them
``0600`` / ``0700``, which then survives the rename: another user (or a container running as
another uid, e.g. Ray workers) could not read a results file or an adapter. The temporaries are
therefore created with ``os.open(..., 0o666)`` / ``os.mkdir(..., 0o777)``, so the kernel applies
the umask; nothing here reads or changes the umask. Writers inside :func:`atomic_folder` may make
their own files owner-only (safetensors >= 0.8 writes through ``mkstemp``, so
``adapter_model.safetensors`` came out ``0600`` beside ``0644`` tokenizer files): before the
folder is published, each file gets the read bits its folder's umask-derived mode grants.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_ATTEMPTS = 100  # name collisions among random 8-hex-digit suffixes are practically impossible
_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically (renameat2, Linux >= 3.15)
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the platform, libc or file system cannot, and nothing changed then."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no libc by that name, or glibc < 2.28
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _temp_name(path: Path) -> Path:
    # Hidden (leading dot) so that listings and globs for the real outputs skip it.
    return path.with_name(f".{path.name}-{secrets.token_hex(4)}.tmp")


def _create_temp_file(path: Path) -> Path:
    for _ in range(_ATTEMPTS):
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def write_file(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Atomically replace ``path`` with what ``write(tmp)`` writes to the temporary path ``tmp``.

    For writers that take a path (``DataFrame.to_csv``, ``Figure.savefig``). Creates the parent
    folder. Raises whatever ``write`` or the file system raises; ``path`` is then untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp_file(path)
    try:
        write(tmp)
        # Flush to disk before the rename, or a crash could leave an empty file under the name.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    return write_file(path, lambda p: p.write_bytes(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    return write_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike[str], data: Any, *, sort_keys: bool = False) -> Path:
    """Atomically replace ``path`` with ``data`` as indented JSON and a final newline.

    The JSON is serialised before anything is written, so a value JSON cannot hold leaves no trace.
    """
    return write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def _grant_reads(folder: Path) -> None:
    """Give every file under ``folder`` the read bits that ``folder``'s own mode (``0o777`` minus
    the umask, from ``os.mkdir``) grants; a file that already has them is left alone."""
    reads = stat.S_IMODE(folder.stat().st_mode) & 0o444
    for root, _, files in os.walk(folder):
        for name in files:
            file = os.path.join(root, name)
            st = os.lstat(file)
            mode = stat.S_IMODE(st.st_mode)
            if not stat.S_ISLNK(st.st_mode) and mode & reads != reads:
                os.chmod(file, mode | reads)


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block ends without an exception,
    the folder replaces ``path`` (an existing folder there is removed), else it is deleted.

    The old folder stays intact until the new one is complete. On Linux the two are swapped in
    one atomic step (``renameat2(RENAME_EXCHANGE)``), so ``path`` is never absent: a Serve
    replica loading the adapter sees the old folder or the new one. Elsewhere the old folder is
    renamed aside first, and ``path`` is briefly absent between the two renames (a folder cannot
    be renamed over a non-empty one). The old folder is deleted last. Creates the parent folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(_ATTEMPTS):
        tmp = _temp_name(path)
        try:
            os.mkdir(tmp, 0o777)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {path}")
    old: Path | None = None
    try:
        yield tmp
        _grant_reads(tmp)
        if path.exists() and _exchange(tmp, path):
            old = tmp  # it now holds the previous folder; the new one took the name in one step
        else:
            if path.exists():
                old = _temp_name(path)
                os.rename(path, old)
            os.rename(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old, path)  # the new folder never arrived: put the old one back
            old = None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
