"""Adapter ids, manifests, the adapter registry, ``best.json`` and what an endpoint serves.

Everything here is plain files and JSON: it imports neither torch nor ray nor transformers nor
peft, so the HTTP ingress, ``tinyqa --help`` and the chat client can use it without loading a
model stack (``tests/unit/test_imports.py`` keeps it that way). Loading an adapter's weights is
:mod:`tinyqa.model`'s business.

An adapter folder is ``<storage>/<experiment>/adapters/<adapter_id>/`` holding the PEFT adapter,
the tokenizer and the manifest ``tinyqa.json``. On cloud storage the folder is a
:class:`~tinyqa.storage.RemotePath` (read through the same calls) whose manifest is uploaded last,
so a folder without its manifest is treated as absent; :func:`fetch_adapter` gives a local copy. Requests and configs name adapters by id, never by
path: an id is checked against :data:`~tinyqa.config.NAME_PATTERN` before it touches the
filesystem.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinyqa.config import NAME_PATTERN, ModelSettings, TinyQAConfig
from tinyqa.errors import AdapterMismatch, ModelError, UnknownAdapter
from tinyqa.storage import FolderCache, Location, RemotePath, StorageOptions, location

MANIFEST = "tinyqa.json"
BEST_FILE = "best.json"
# The files that make a folder an adapter a tinyqa engine can load.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", MANIFEST)
_ADAPTER_ID_RE = re.compile(NAME_PATTERN)


def check_adapter_id(adapter_id: str) -> str:
    """Return ``adapter_id`` if it is a valid id (a name, not a path); raises :class:`ModelError`."""
    if not _ADAPTER_ID_RE.match(adapter_id or ""):
        raise ModelError(
            f"adapter id {adapter_id!r} is invalid: it must match {NAME_PATTERN} (a name, not a path)"
        )
    return adapter_id


def read_manifest(adapter_dir: Location) -> dict[str, Any]:
    """Validate an adapter folder and return its manifest; raises :class:`ModelError`."""
    adapter_dir = location(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise ModelError(
            f"{adapter_dir} is not a tinyqa adapter folder (missing {', '.join(missing)}); "
            "point to <storage>/<experiment>/adapters/<adapter_id>"
        )
    try:
        return json.loads((adapter_dir / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{adapter_dir / MANIFEST}: not valid JSON ({e})") from e


def base_settings_from_manifest(manifest: dict[str, Any]) -> ModelSettings:
    """The model settings of the base an adapter was trained on (from its manifest)."""
    return ModelSettings.model_validate(manifest["config"]["model"])


def list_adapters(adapter_root: Location | None) -> list[str]:
    """Adapter ids (folder names that are valid ids, with a manifest) under the root, sorted.

    Folders being written (``.name-xxxx.tmp``, see :mod:`tinyqa.fileio`) and old ones waiting to
    be deleted start with a dot, which no id may: they are never listed.
    """
    if adapter_root is None or not location(adapter_root).is_dir():
        return []
    return sorted(
        p.name
        for p in location(adapter_root).iterdir()
        if _ADAPTER_ID_RE.match(p.name) and (p / MANIFEST).is_file()
    )


def resolve_adapter(
    adapter_root: Location | None, adapter_id: str, base_id: str | None = None
) -> Location:
    """The folder of adapter ``adapter_id`` under the root, checked before any filesystem access.

    The id is validated against the adapter-id pattern first, so ``../x``, ``/etc`` or ``a/b``
    never reach the filesystem. Raises :class:`ModelError` (invalid id), :class:`UnknownAdapter`
    (no such adapter) or :class:`AdapterMismatch` (trained on another base than ``base_id``).
    """
    check_adapter_id(adapter_id)
    path = location(adapter_root) / adapter_id if adapter_root else None
    if path is None or not (path / MANIFEST).is_file():
        available = ", ".join(list_adapters(adapter_root)) or "none"
        raise UnknownAdapter(f"unknown adapter {adapter_id!r}; available: {available}")
    if base_id is not None:
        trained_on = read_manifest(path).get("base_model")
        if trained_on != base_id:
            raise AdapterMismatch(
                f"adapter {adapter_id!r} was trained on {trained_on!r}, but this endpoint serves "
                f"{base_id!r}; serve it from its own base model"
            )
    return path


def locate_adapter(cfg: TinyQAConfig, ref: str) -> Location:
    """The folder a user's ``--adapter`` / ``eval.adapters`` entry names: an adapter id under
    ``cfg.adapters_dir`` first, else an adapter folder path. Raises :class:`ModelError` /
    :class:`UnknownAdapter`.

    Unlike :func:`resolve_adapter` (requests: ids only), a person at a terminal may point at a
    folder.
    """
    if _ADAPTER_ID_RE.match(ref) and (cfg.adapters_dir / ref / MANIFEST).is_file():
        return cfg.adapters_dir / ref
    path = location(ref, cfg.storage)
    if path.is_dir():
        read_manifest(path)  # names the missing files when it is not an adapter folder
        return path.resolve()
    available = ", ".join(list_adapters(cfg.adapters_dir)) or "none"
    raise UnknownAdapter(
        f"unknown adapter {ref!r}: no adapter with that id under {cfg.adapters_dir} (available: "
        f"{available}) and no such folder; pass a trained adapter id or an adapter folder"
    )


def read_best(run_dir: Location) -> dict | None:
    """The sweep's ``best.json`` under a run folder, or None."""
    path = location(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e}); rerun `tinyqa tune`") from e


def default_adapter_dir(cfg: TinyQAConfig) -> Location | None:
    """The adapter ``best.json`` names, else the trained ``cfg.adapter_id`` if it exists, else None.

    What ``eval``, ``ask`` and ``chat`` use when no adapter is given (an endpoint also honours
    ``serve.default_adapter``: see :func:`serving_plan`).
    """
    best = read_best(cfg.run_dir)
    if best and best.get("adapter_id"):
        path = cfg.adapters_dir / str(best["adapter_id"])
        if not (path / MANIFEST).is_file():
            raise ModelError(
                f"{cfg.run_dir / BEST_FILE} names adapter {best['adapter_id']!r}, but {path} "
                "holds no adapter; rerun `tinyqa tune`, or pick one with eval.adapters=[ID]"
            )
        return path
    path = cfg.adapters_dir / cfg.adapter_id
    return path if (path / MANIFEST).is_file() else None


_CACHES: dict[tuple[Path, int, float], FolderCache] = {}
_CACHE_CONFIG: list[TinyQAConfig] = []  # set by configure_adapter_cache


def configure_adapter_cache(cfg: TinyQAConfig) -> None:
    """Make :func:`fetch_adapter` use ``cfg``'s cache folder, size and timeout in this process
    (a Serve replica, an eval run) without passing the config through the engine."""
    _CACHE_CONFIG[:] = [cfg]


def fetch_adapter(adapter_dir: Location, cfg: TinyQAConfig | None = None) -> Path:
    """A local folder with the adapter's files: ``adapter_dir`` itself when local, else a copy in
    the node's download cache (``storage.cache_dir``, bounded by ``serve.adapter_cache_bytes``;
    ``cfg`` else the one given to :func:`configure_adapter_cache`, else the defaults).

    Raises :class:`UnknownAdapter` when the folder has no manifest (absent, or still being
    uploaded) and :class:`~tinyqa.errors.StorageError` when the store is unreachable or the
    download times out.
    """
    if not isinstance(adapter_dir, RemotePath):
        return Path(adapter_dir)
    cfg = cfg or (_CACHE_CONFIG[0] if _CACHE_CONFIG else TinyQAConfig())
    key = (
        cfg.cache_dir / "adapters",
        cfg.serve.adapter_cache_bytes,
        cfg.storage.download_timeout_s,
    )
    cache = _CACHES.get(key) or _CACHES.setdefault(key, FolderCache(*key))
    try:
        return cache.get(adapter_dir, MANIFEST)
    except FileNotFoundError as e:
        raise UnknownAdapter(f"no adapter at {adapter_dir} (no {MANIFEST} there)") from e


class BestFile:
    """``best.json``'s adapter id, re-read at most every ``ttl_s`` seconds, so an endpoint picks up
    a new sweep's winner without a redeploy. A read error keeps the last good value."""

    def __init__(self, path: Location, ttl_s: float, current: str | None) -> None:
        self.path, self.ttl_s = location(path), ttl_s
        self._value, self._read_at = current, time.monotonic()

    def adapter_id(self) -> str | None:
        now = time.monotonic()
        if now - self._read_at >= self.ttl_s:
            self._read_at = now
            try:
                best = read_best(self.path.parent)
            except Exception:  # storage hiccup or a broken file: keep serving the last default
                return self._value
            if best and best.get("adapter_id"):
                self._value = str(best["adapter_id"])
        return self._value


@dataclass
class ServingPlan:
    """What an endpoint serves: one base model, the adapters under a root, a default adapter."""

    base: ModelSettings
    adapter_root: Location
    default_adapter: str | None  # None = the base model answers by default
    system_prompt: str | None
    reason: str  # how the default was chosen, for the log
    # The best.json that may change the default later (None when serve.default_adapter pins it).
    best_file: Location | None = None

    @property
    def base_id(self) -> str:
        return self.base.name

    def to_dict(self) -> dict:
        """A plain dict that crosses a Ray boundary (see :meth:`from_dict`)."""
        return {
            "base": self.base.model_dump(mode="json"),
            "adapter_root": str(self.adapter_root),
            "default_adapter": self.default_adapter,
            "system_prompt": self.system_prompt,
            "reason": self.reason,
            "best_file": str(self.best_file) if self.best_file is not None else None,
            "storage": asdict(self._options()),
        }

    def _options(self) -> StorageOptions:
        root = self.adapter_root
        return root.options if isinstance(root, RemotePath) else StorageOptions()

    @classmethod
    def from_dict(cls, data: dict) -> ServingPlan:
        options = StorageOptions(**data.get("storage", {}))
        best = data.get("best_file")
        return cls(
            base=ModelSettings.model_validate(data["base"]),
            adapter_root=location(data["adapter_root"], options),
            default_adapter=data["default_adapter"],
            system_prompt=data["system_prompt"],
            reason=data["reason"],
            best_file=location(best, options) if best else None,
        )


def serving_plan(cfg: TinyQAConfig) -> ServingPlan:
    """Pick the base model and the default adapter for an endpoint.

    The default adapter is ``serve.default_adapter`` if set, else the one ``best.json`` names,
    else the adapter named ``cfg.adapter_id`` if it exists. The base model comes from that
    adapter's manifest; with no adapter at all, ``cfg.model`` is served alone. Raises
    :class:`ModelError` when a named adapter is missing.
    """
    root = cfg.adapters_dir
    if cfg.serve.adapter_root:
        root = location(cfg.serve.adapter_root, cfg.storage)
    best_file = None if cfg.serve.default_adapter else cfg.run_dir / BEST_FILE
    chosen: str | None = None
    if cfg.serve.default_adapter:
        chosen, reason = cfg.serve.default_adapter, "serve.default_adapter"
    elif (best := read_best(cfg.run_dir)) is not None:
        chosen, reason = best.get("adapter_id"), f"{cfg.run_dir / BEST_FILE}"
        if not chosen:
            raise ModelError(f"{cfg.run_dir / BEST_FILE} names no adapter_id; rerun `tinyqa tune`")
    elif (root / cfg.adapter_id / MANIFEST).is_file():
        chosen, reason = cfg.adapter_id, "the experiment's trained adapter"
    if chosen is None:
        return ServingPlan(
            cfg.model,
            root,
            None,
            cfg.data.system_prompt,
            f"no adapter under {root} (no best.json, no {cfg.adapter_id!r}): serving the base model",
            best_file,
        )
    try:
        path = resolve_adapter(root, chosen)
    except ModelError as e:
        raise ModelError(
            f"default adapter {chosen!r} (from {reason}) cannot be served: {e}; train it "
            "(`tinyqa train` / `tinyqa tune`) or set serve.default_adapter to an existing one"
        ) from e
    manifest = read_manifest(path)
    base = base_settings_from_manifest(manifest)
    prompt = manifest["config"]["data"].get("system_prompt")
    return ServingPlan(
        base, root, chosen, prompt, f"default adapter {chosen!r} from {reason}", best_file
    )
