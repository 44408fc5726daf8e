"""Loading base models and tokenizers, and everything that touches peft.

This is the only module that imports peft: applying LoRA, saving / loading adapters. What an adapter
folder holds and how ids are checked is :mod:`tinyqa.adapters` (no torch there).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tinyqa.adapters import MANIFEST, read_manifest
from tinyqa.card import build_model_card, write_model_card
from tinyqa.config import LoraSettings, ModelSettings
from tinyqa.errors import ModelError, first_line
from tinyqa.presets import PRESETS, ZEPHYR_TEMPLATE, preset_dir
from tinyqa.storage import Location, atomic_folder, location

logger = logging.getLogger(__name__)


def resolve_model_path(name: str) -> str:
    """A preset name becomes its cached folder; a local path must exist; anything else is a hub id."""
    if name in PRESETS:
        return str(preset_dir(name))
    p = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or p.exists() or name.count("/") > 1
    if looks_local:
        if not (p / "config.json").is_file():
            raise ModelError(
                f"model path {p} does not exist or has no config.json; give a model folder, a hub id "
                f"like TinyLlama/TinyLlama-1.1B-Chat-v1.0, or a preset ({', '.join(PRESETS)})"
            )
        return str(p.resolve())
    return name


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def effective_quantization(settings: ModelSettings, device: torch.device) -> str:
    if settings.quantization == "auto":
        return "nf4" if device.type == "cuda" else "none"
    return settings.quantization


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 / AMX, through oneDNN).
    Without it torch falls back to a scalar bfloat16 GEMM: the first SmolLM2 LoRA step measured 178 s
    against 19.9 s in float32 on an AVX2-only AMD EPYC (docs/smollm2.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


_warned_emulated_bf16 = False


def compute_dtype(settings: ModelSettings, device: torch.device) -> torch.dtype:
    global _warned_emulated_bf16
    if settings.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if settings.dtype == "fastest":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if fast else torch.float32
    if (
        settings.dtype == "bfloat16"
        and device.type == "cpu"
        and not cpu_has_native_bf16()
        and not _warned_emulated_bf16
    ):
        _warned_emulated_bf16 = True
        logger.warning(
            "model.dtype=bfloat16 on a CPU without native bfloat16 (no AVX512-BF16 / AMX): torch "
            "emulates it, ~9x slower than float32 (docs/smollm2.md); use model.dtype=fastest "
            "or float32"
        )
    return getattr(torch, settings.dtype)


def load_tokenizer(settings: ModelSettings):
    """Load the tokenizer, with a pad token and the Zephyr chat template where it has none."""
    from transformers import AutoTokenizer

    path = resolve_model_path(settings.name)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=settings.revision, trust_remote_code=False
        )
    except OSError as e:
        raise ModelError(f"cannot load the tokenizer of {settings.name!r}: {first_line(e)}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = ZEPHYR_TEMPLATE
    return tok


def load_base_model(
    settings: ModelSettings,
    device: str | torch.device | None = None,
    quantization: str | None = None,
):
    """Load the base model onto one device (never ``device_map="auto"``: each Ray worker owns its copy).

    ``quantization`` overrides ``settings.quantization`` ('bf16' = no quantization in bfloat16).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dev = resolve_device(device)
    quant = quantization or effective_quantization(settings, dev)
    if quant == "auto":
        quant = "nf4" if dev.type == "cuda" else "none"
    dtype = torch.bfloat16 if quant == "bf16" else compute_dtype(settings, dev)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": settings.attn_implementation,
        "use_safetensors": True,
        "trust_remote_code": False,
        "revision": settings.revision,
    }
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": dev}
    elif quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": dev}
    path = resolve_model_path(settings.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load model {settings.name!r}: {first_line(e)}") from e
    if "quantization_config" not in kwargs:
        model.to(dev)
    model.config.use_cache = False
    return model


def is_quantized(model) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def keep_4bit_trainable(model) -> int:
    """Keep bitsandbytes 4-bit layers in the layout their backward expects.

    On CPUs with AVX512-BF16, a no-grad forward in eval mode repacks a ``Linear4bit`` weight into an
    inference layout, after which LoRA gradients through that layer are silently wrong. We undo any
    repack that already happened and switch the repack off for this model. Returns how many layers
    were restored.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    restored = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = (
                    _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
                )
                restored += 1
    return restored


def apply_lora(model, lora: LoraSettings, gradient_checkpointing: bool = False):
    """Wrap ``model`` with fresh LoRA adapters; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        keep_4bit_trainable(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ModelError(f"cannot apply LoRA: {first_line(e)}; check lora.target_modules") from e


def save_adapter(model, tokenizer, out_dir: Location, manifest: dict[str, Any]) -> Location:
    """Write adapter weights, tokenizer and manifest and model card (``README.md``) into ``out_dir`` atomically (a complete
    folder replaces the old one, or nothing changes). On cloud storage the folder is saved
    locally, then uploaded with the manifest last (see :func:`tinyqa.storage.atomic_folder`)."""
    out_dir = location(out_dir)
    with atomic_folder(out_dir, MANIFEST) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # Replaces the placeholder card PEFT writes with one that says what this adapter is.
        write_model_card(tmp, build_model_card(manifest))
    return out_dir


def load_adapter(
    base_model, adapter_dir: Path, adapter_name: str = "default", trainable: bool = False
):
    """Attach a saved adapter to ``base_model`` (a plain model or an existing PeftModel)."""
    from peft import PeftModel

    read_manifest(adapter_dir)
    if isinstance(base_model, PeftModel):
        base_model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable)
        return base_model
    return PeftModel.from_pretrained(
        base_model, str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable
    )


def merge_adapter(adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write the adapter's base model with the adapter merged in, as a standalone Hugging Face
    folder (safetensors, config, generation config, tokenizer) into the existing folder ``out_dir``.

    The base is loaded the way the adapter was trained (a 4-bit / 8-bit base quantized again,
    then dequantized to its compute dtype), so the LoRA update lands on the weights it was trained
    against. Returns ``{"dtype": str, "dequantized_from": "nf4" | "int8" | None}``. Raises
    :class:`ModelError`.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    manifest = read_manifest(adapter_dir)
    settings = ModelSettings.model_validate(manifest["config"]["model"])
    trained_on = torch.device("cuda" if manifest.get("device") == "cuda" else "cpu")
    quant = effective_quantization(settings, trained_on)
    dtype = compute_dtype(settings, trained_on)
    device = resolve_device()
    base = load_base_model(settings, device, quantization=quant)
    dequantized_from = None
    if is_quantized(base):
        keep_4bit_trainable(base)  # the training layout, not the CPU inference repack
        base = base.dequantize(dtype=dtype)
        dequantized_from = quant
    base = base.to(dtype)
    try:
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    except (ValueError, OSError, RuntimeError) as e:
        raise ModelError(f"cannot merge {adapter_dir} into its base: {first_line(e)}") from e
    merged.config.use_cache = True  # load_base_model turns the cache off for training
    merged.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=False)
    tokenizer.save_pretrained(out_dir)
    return {"dtype": str(dtype).removeprefix("torch."), "dequantized_from": dequantized_from}


def delete_adapter(peft_model, adapter_name: str) -> None:
    peft_model.delete_adapter(adapter_name)


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_parameter_count(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
