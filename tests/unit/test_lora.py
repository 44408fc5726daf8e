"""LoRA / QLoRA behaviour on the offline tiny model: what trains, what must not move, and the
bitsandbytes CPU repack trap (DESIGN.md) that silently corrupts 4-bit LoRA gradients."""

from __future__ import annotations

import pytest
import torch

from tinyqa.config import LoraSettings, ModelSettings
from tinyqa.model import apply_lora, keep_4bit_trainable, load_base_model

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    text = "<|user|>\nWhat does `json.dumps` do?</s>\n<|assistant|>\nSerialize obj to a JSON formatted str.</s>\n"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    return {"input_ids": ids, "labels": ids.clone()}


def test_lora_trains_adapter_only_and_loss_falls(tiny_dir, tiny_tokenizer):
    model = load_base_model(ModelSettings(name="tiny", quantization="none"), "cpu")
    base_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = apply_lora(model, LORA)

    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    lora_before = {
        n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad
    }
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tiny_tokenizer)
    peft_model.train()
    losses = []
    for _ in range(30):
        loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

    changed = [
        n
        for n, p in peft_model.named_parameters()
        if p.requires_grad and not torch.equal(p, lora_before[n])
    ]
    assert set(changed) == set(lora_before)
    base_after = peft_model.get_base_model().state_dict()
    for key, before in base_before.items():
        after_key = next(k for k in base_after if k.replace(".base_layer", "") == key)
        assert torch.equal(base_after[after_key], before), f"base weight {key} moved"


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def nf4_model(tiny_dir):
    pytest.importorskip("bitsandbytes")
    return load_base_model(ModelSettings(name="tiny", quantization="nf4"), "cpu")


def _dequantized_reference(q_peft):
    """A float copy of a LoRA-wrapped NF4 model: its current weights dequantized, same LoRA."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    ref = apply_lora(load_base_model(ModelSettings(name="tiny", quantization="none"), "cpu"), LORA)
    ref_modules = dict(ref.named_modules())
    n = 0
    for name, module in q_peft.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = dequantize_4bit(module.weight.data, module.weight.quant_state)
            ref_modules[name].weight.data.copy_(w.to(torch.float32))
            n += 1
    assert n > 0
    ref_params = dict(ref.named_parameters())
    for name, p in q_peft.named_parameters():
        if p.requires_grad:
            ref_params[name].data.copy_(p.data)
    return ref


def _randomize_lora(q_peft) -> None:
    # lora_B starts at zero, which would make lora_A's gradient zero: randomize both.
    torch.manual_seed(0)
    for p in q_peft.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)


def _assert_close(grads, ref_grads) -> None:
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        err = (g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)
        assert err < 1e-3, f"{name}: relative gradient error {err:.3%}"


def test_qlora_gradients_match_dequantized_reference(nf4_model, tiny_tokenizer):
    q_peft = apply_lora(nf4_model, LORA)
    _randomize_lora(q_peft)
    batch = _batch(tiny_tokenizer)
    _assert_close(_lora_grads(q_peft, batch), _lora_grads(_dequantized_reference(q_peft), batch))


def test_qlora_gradients_stay_correct_after_evaluation(nf4_model, tiny_tokenizer):
    """An eval-mode no-grad forward (what evaluation does) before and between training steps.

    On CPUs with AVX512-BF16 that forward repacks the 4-bit weights; without keep_4bit_trainable
    the LoRA gradients are off by ~100 %.
    """
    import bitsandbytes as bnb

    batch = _batch(tiny_tokenizer)
    nf4_model.eval()
    with torch.no_grad():
        nf4_model(**batch)  # may repack weights into the CPU inference layout
    q_peft = apply_lora(nf4_model, LORA)  # apply_lora undoes a repack
    _randomize_lora(q_peft)
    _assert_close(_lora_grads(q_peft, batch), _lora_grads(_dequantized_reference(q_peft), batch))

    q_peft.eval()
    with torch.no_grad():
        q_peft(**batch)  # evaluation between steps
    keep_4bit_trainable(q_peft)  # what training's on_evaluate callback does
    _assert_close(_lora_grads(q_peft, batch), _lora_grads(_dequantized_reference(q_peft), batch))
    packed = [
        m
        for m in q_peft.modules()
        if isinstance(m, bnb.nn.Linear4bit)
        and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]
    assert not packed


def test_fastest_dtype_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, caplog):
    """'fastest' takes bfloat16 on CUDA and on CPUs with native bf16 GEMMs; on an AVX2-only CPU
    (where torch emulates bf16, ~9x slower than float32) it is float32, and an explicit bfloat16
    there warns once with the fix."""
    import logging

    from tinyqa import model as model_module

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fastest, bf16 = ModelSettings(dtype="fastest"), ModelSettings(dtype="bfloat16")
    assert model_module.compute_dtype(fastest, cuda) == torch.bfloat16
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    assert model_module.compute_dtype(fastest, cpu) == torch.bfloat16
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: False)
    assert model_module.compute_dtype(fastest, cpu) == torch.float32
    assert model_module.compute_dtype(ModelSettings(), cpu) == torch.float32  # 'auto' unchanged
    monkeypatch.setattr(model_module, "_warned_emulated_bf16", False)
    with caplog.at_level(logging.WARNING, logger="tinyqa.model"):
        assert model_module.compute_dtype(bf16, cpu) == torch.bfloat16  # the user's choice holds
        model_module.compute_dtype(bf16, cpu)
    warnings = [r for r in caplog.records if "without native bfloat16" in r.getMessage()]
    assert len(warnings) == 1 and "model.dtype=fastest" in warnings[0].getMessage()
