"""``tinyqa export``: an adapter as a Hub-ready folder (with its model card), or merged into its base
as a standalone model, optionally uploaded to the Hugging Face Hub.

- without ``merged``: the adapter's files (PEFT weights, tokenizer, ``tinyqa.json``) and a fresh
  ``README.md`` card that includes the experiment's evaluation of this adapter, when there is one;
- with ``merged``: base + adapter merged (:func:`tinyqa.model.merge_adapter`; peft is only touched
  there), safetensors, loadable by plain ``AutoModelForCausalLM.from_pretrained``, and its card.

The folder is written atomically (:func:`tinyqa.fileio.atomic_folder`) and never over an existing
one. ``push_to_hub`` uploads it with ``huggingface_hub`` (token from ``$HF_TOKEN``, a private repo
unless ``public``); ``dry_run`` builds it in a temporary folder, reports what would be written and
uploaded, and leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tinyqa.adapters import locate_adapter, read_manifest
from tinyqa.card import build_model_card, check_no_secrets, eval_metrics_for, write_model_card
from tinyqa.config import TinyQAConfig
from tinyqa.errors import TinyQAError, first_line
from tinyqa.fileio import atomic_folder

logger = logging.getLogger(__name__)

EXPORT_DIR = "export"
TOKEN_ENV = "HF_TOKEN"
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TEXT_SUFFIXES = (".json", ".md", ".txt", ".jinja", ".yaml", ".model")


class ExportError(TinyQAError):
    """The export cannot be done as asked (output exists, no token, bad repo id, upload refused)."""


@dataclass
class ExportResult:
    adapter_id: str
    source: Path
    out_dir: Path | None  # None after a dry run
    merged: bool
    files: list[tuple[str, int]] = field(default_factory=list)  # (relative path, bytes)
    repo: str | None = None
    private: bool = True
    url: str | None = None  # set once uploaded
    dry_run: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def default_out_dir(cfg: TinyQAConfig, adapter_id: str, merged: bool) -> Path:
    return cfg.run_dir / EXPORT_DIR / (adapter_id + ("-merged" if merged else ""))


def _check_repo(repo: str) -> str:
    if not _REPO_ID.match(repo) or ".." in repo or repo.endswith((".git", ".")):
        raise ExportError(
            f"--push-to-hub {repo!r} is not a Hub repo id; write NAME or OWNER/NAME (letters, "
            "digits, '-', '_', '.')"
        )
    return repo


def _hub_token(dry_run: bool) -> str | None:
    """``$HF_TOKEN``; a real push without one (or in offline mode) is a user error."""
    from huggingface_hub import constants

    token = os.environ.get(TOKEN_ENV) or None
    if dry_run:
        return token
    if not token:
        raise ExportError(
            f"--push-to-hub needs a Hugging Face write token in ${TOKEN_ENV} (create one at "
            "https://huggingface.co/settings/tokens); nothing was written"
        )
    if constants.HF_HUB_OFFLINE:
        raise ExportError(
            "--push-to-hub needs the network, but HF_HUB_OFFLINE is set; unset it, or use "
            "--dry-run to see what would be uploaded"
        )
    return token


def _copy_adapter(adapter_dir: Path, dest: Path) -> None:
    for path in sorted(adapter_dir.iterdir()):
        # Hidden entries are leftovers of atomic writes; the card is written fresh below.
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, dest / path.name)


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file()
    )


def _check_folder_for_secrets(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in _TEXT_SUFFIXES and path.stat().st_size < 50_000_000:
            check_no_secrets(path.read_text(encoding="utf-8", errors="replace"))


def _build(
    cfg: TinyQAConfig,
    adapter_dir: Path,
    dest: Path,
    merged: bool,
    repo: str | None,
    dataset_id: str | None,
) -> None:
    manifest = read_manifest(adapter_dir)
    adapter_id = str(manifest.get("adapter_id") or adapter_dir.name)
    evaluation = eval_metrics_for(cfg.run_dir, adapter_dir, adapter_id)
    merge_info = None
    if merged:
        from tinyqa.model import merge_adapter

        logger.info("merging %s into its base %s", adapter_id, manifest.get("base_model"))
        merge_info = merge_adapter(adapter_dir, dest)
        shutil.copy2(adapter_dir / "tinyqa.json", dest / "tinyqa.json")  # provenance
    else:
        _copy_adapter(adapter_dir, dest)
    card = build_model_card(
        manifest, evaluation=evaluation, merged=merge_info, dataset_id=dataset_id, repo=repo
    )
    write_model_card(dest, card)
    _check_folder_for_secrets(dest)


def _upload(folder: Path, repo: str, token: str, private: bool, adapter_id: str) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=url.repo_id,
            repo_type="model",
            commit_message=f"tinyqa export of {adapter_id}",
        )
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ExportError(
            f"upload to {repo} failed: {first_line(e)}; the export is in {folder}"
        ) from e
    return str(url)


def export_adapter(
    cfg: TinyQAConfig,
    adapter: str | None = None,
    *,
    out: str | Path | None = None,
    merged: bool = False,
    push_to_hub: str | None = None,
    public: bool = False,
    dry_run: bool = False,
    dataset_id: str | None = None,
) -> ExportResult:
    """Export ``adapter`` (an id under the experiment or an adapter folder; default: the one
    ``best.json`` names, else the experiment's adapter).

    Raises :class:`ExportError` (output exists, no token, bad repo id, upload refused) and the
    adapter lookup's :class:`~tinyqa.errors.ModelError` / ``UnknownAdapter``.
    """
    from tinyqa.adapters import default_adapter_dir

    if adapter:
        adapter_dir = locate_adapter(cfg, adapter)
    else:
        found = default_adapter_dir(cfg)
        if found is None:
            raise ExportError(
                f"no adapter to export under {cfg.adapters_dir} (no best.json, no "
                f"{cfg.adapter_id!r}); name one: tinyqa export ADAPTER"
            )
        adapter_dir = found
    manifest = read_manifest(adapter_dir)
    adapter_id = str(manifest.get("adapter_id") or adapter_dir.name)
    repo = _check_repo(push_to_hub) if push_to_hub else None
    token = _hub_token(dry_run) if repo else None
    out_dir = Path(out).expanduser().resolve() if out else default_out_dir(cfg, adapter_id, merged)
    if out_dir.exists() and not dry_run:
        raise ExportError(
            f"output folder {out_dir} already exists; remove it or choose another with --out"
        )
    result = ExportResult(
        adapter_id, adapter_dir, None, merged, repo=repo, private=not public, dry_run=dry_run
    )
    if dry_run:
        with tempfile.TemporaryDirectory(prefix="tinyqa-export-") as tmp:
            _build(cfg, adapter_dir, Path(tmp), merged, repo, dataset_id)
            result.files = _listing(Path(tmp))
        return result
    with atomic_folder(out_dir) as tmp:
        _build(cfg, adapter_dir, tmp, merged, repo, dataset_id)
    result.out_dir = out_dir
    result.files = _listing(out_dir)
    logger.info("exported %s to %s (%d files)", adapter_id, out_dir, len(result.files))
    if repo and token:
        result.url = _upload(out_dir, repo, token, not public, adapter_id)
    return result


def format_export(result: ExportResult) -> str:
    """What was (or, for a dry run, would be) written and uploaded."""
    size = f"{result.total_bytes / 1e6:.1f} MB"
    kind = "merged model" if result.merged else "adapter"
    lines = [f"  {name}  ({n:,} bytes)" for name, n in result.files]
    visibility = "private" if result.private else "public"
    if result.dry_run:
        head = f"dry run: {kind} {result.adapter_id} -> {len(result.files)} files, {size}"
        tail = (
            f"would upload them to https://huggingface.co/{result.repo} ({visibility}); nothing "
            "was written or uploaded"
            if result.repo
            else "nothing was written"
        )
    else:
        head = f"exported {kind} {result.adapter_id} -> {result.out_dir} ({len(result.files)} files, {size})"
        tail = f"uploaded to {result.url} ({visibility})" if result.url else ""
    return "\n".join([head, *lines, *([tail] if tail else [])])
