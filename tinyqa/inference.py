"""Answer generation with a base model and any number of LoRA adapters (shared by CLI, eval, Serve).

One :class:`QAEngine` holds one base model (quantized on GPU where configured) and attaches adapters
from an adapter root on demand, keeping at most ``max_adapters`` loaded (least recently used goes).
Requests name an adapter id (never a path) or ``None`` for the base model. A lock serializes
adapter switching + ``generate`` on the shared PeftModel: concurrent sub-batches for different
adapters otherwise race on the active adapter. A second lock serializes tokenization: a fast
tokenizer shared between threads can fail with "Already borrowed".

:func:`build_engine` builds one engine for a list of adapter folders (``eval``, ``ask``, ``chat``).
Which adapter an endpoint serves is decided without torch, in :mod:`tinyqa.adapters`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinyqa.adapters import (
    base_settings_from_manifest,
    fetch_adapter,
    read_manifest,
    resolve_adapter,
)
from tinyqa.config import ModelSettings
from tinyqa.errors import AdapterMismatch, ModelError, PromptTooLong, TinyQAError
from tinyqa.model import (
    delete_adapter,
    is_peft_model,
    load_adapter,
    load_base_model,
    load_tokenizer,
)
from tinyqa.storage import location

logger = logging.getLogger(__name__)

BASE_LABEL = "base"


@dataclass
class GenerationRequest:
    messages: list[dict[str, str]]
    adapter: str | None = None  # None = base model
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenerationResult:
    text: str
    adapter: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"  # "stop" (eos) or "length"
    extra: dict = field(default_factory=dict)


class QAEngine:
    """Base model + LRU of LoRA adapters, batched greedy / sampled generation."""

    def __init__(
        self,
        model: ModelSettings,
        adapter_root: Path | None = None,
        *,
        quantization: str | None = None,
        device: str | torch.device | None = None,
        max_adapters: int = 4,
        system_prompt: str | None = None,
        extra_adapters: dict[str, Path] | None = None,
    ):
        self.model_settings = model
        self.adapter_root = location(adapter_root) if adapter_root else None
        self.max_adapters = max_adapters
        self.system_prompt = system_prompt
        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "left"  # decoder-only batch generation
        self.model = load_base_model(model, device, quantization)
        self.model.eval()
        self.model.config.use_cache = True
        self.device = next(self.model.parameters()).device
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapter id -> PEFT adapter name
        self._extra = {k: location(v) for k, v in (extra_adapters or {}).items()}
        self._lock = threading.RLock()
        self._tok_lock = threading.Lock()
        self._names_used = 0
        self.last_error: BaseException | None = None  # the last generate failure that was not ours
        self.last_ok: float | None = None  # time.monotonic() of the last successful generate

    @classmethod
    def for_adapter_dir(cls, adapter_dir: Path, **kwargs) -> tuple[QAEngine, str]:
        """An engine on the base model an adapter folder was trained from, with that adapter."""
        adapter_dir = location(adapter_dir)
        manifest = read_manifest(adapter_dir)
        name = manifest.get("adapter_id") or adapter_dir.name
        engine = cls(
            base_settings_from_manifest(manifest),
            adapter_root=adapter_dir.parent,
            system_prompt=manifest["config"]["data"].get("system_prompt"),
            extra_adapters={name: adapter_dir},
            **kwargs,
        )
        return engine, name

    # ----- adapters -----
    @property
    def base_id(self) -> str:
        return self.model_settings.name

    def adapter_path(self, adapter_id: str) -> Path:
        """Resolve an adapter id under the root, as a local folder (one in cloud storage is
        downloaded into the cache first); raises ModelError / UnknownAdapter / StorageError."""
        if adapter_id in self._extra:
            return fetch_adapter(self._extra[adapter_id])
        return fetch_adapter(resolve_adapter(self.adapter_root, adapter_id))

    def _ensure_loaded(self, adapter_id: str, keep: set[str] | frozenset[str] = frozenset()) -> str:
        """Load ``adapter_id`` if needed (LRU-evicting one past the cap); its PEFT name.

        Adapters in ``keep`` (in use by running sequences) are never evicted; when all loaded
        ones are, the cap is exceeded until they finish rather than failing the request.
        """
        if adapter_id in self._loaded:
            self._loaded.move_to_end(adapter_id)
            return self._loaded[adapter_id]
        path = self.adapter_path(adapter_id)
        manifest = read_manifest(path)
        if manifest.get("base_model") != self.base_id:
            raise AdapterMismatch(
                f"adapter {adapter_id!r} was trained on {manifest.get('base_model')!r}, "
                f"but this engine serves {self.base_id!r}"
            )
        if len(self._loaded) >= self.max_adapters:
            evictable = [a for a in self._loaded if a not in keep]  # least recently used first
            if evictable:
                evicted_name = self._loaded.pop(evictable[0])
                delete_adapter(self.model, evicted_name)
                logger.info("evicted adapter %s (LRU, cap %d)", evictable[0], self.max_adapters)
            else:
                logger.warning("all %d adapters are in use: loading one past the cap", len(keep))
        # Adapter ids may hold '.', which PEFT rejects in module names: load under a safe name.
        self._names_used += 1
        name = f"a{self._names_used}_" + re.sub(r"[^A-Za-z0-9_]", "_", adapter_id)
        self.model = load_adapter(self.model, path, adapter_name=name)
        self.model.eval()
        self._loaded[adapter_id] = name
        logger.info("loaded adapter %s from %s", adapter_id, path)
        return name

    def load(self, adapter_id: str) -> None:
        """Load an adapter now (e.g. when a Serve replica is asked for it); raises like
        :meth:`adapter_path`, or :class:`AdapterMismatch`."""
        with self._lock:
            self._ensure_loaded(adapter_id)

    def loaded_adapters(self) -> list[str]:
        return list(self._loaded)

    # ----- prompts -----
    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat prompt, formatted exactly as in training (with BOS)."""
        with self._tok_lock:
            text = self.tokenizer.apply_chat_template(
                self.with_system(messages), tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    @property
    def context_length(self) -> int | None:
        """The model's maximum sequence length (prompt + answer), if it declares one."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def check_prompt(
        self, messages: list[dict[str, str]], max_prompt_tokens: int, max_new_tokens: int
    ) -> int:
        """Number of prompt tokens; raises :class:`PromptTooLong` past ``max_prompt_tokens`` or
        when prompt plus answer would not fit the model's context."""
        n = len(self.prompt_ids(messages))
        limit = max_prompt_tokens
        if self.context_length is not None:
            limit = min(limit, self.context_length - max_new_tokens)
        if n > limit:
            raise PromptTooLong(
                f"the prompt has {n} tokens; the limit is {limit} (max prompt tokens "
                f"{max_prompt_tokens}, context {self.context_length}, {max_new_tokens} new tokens): "
                "shorten the question or the conversation"
            )
        return n

    # ----- generation -----
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Answer requests, batching those that share an adapter and sampling settings."""
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            # Greedy decoding ignores top_p and the seed: one group per adapter.
            key = (
                (req.adapter, req.temperature, req.top_p, req.seed)
                if req.temperature > 0
                else (req.adapter,)
            )
            groups.setdefault(key, []).append(i)
        for idxs in groups.values():
            batch = [requests[i] for i in idxs]
            for i, res in zip(idxs, self._generate_group(batch), strict=True):
                results[i] = res
        return results  # type: ignore[return-value]

    def _generation_kwargs(self, req: GenerationRequest, max_new_tokens: int) -> dict:
        kwargs = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if req.temperature > 0:
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _generate_group(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        adapter = batch[0].adapter
        encoded = [self.prompt_ids(r.messages) for r in batch]
        max_new = max(r.max_new_tokens for r in batch)
        with self._tok_lock:
            inputs = self.tokenizer.pad({"input_ids": encoded}, return_tensors="pt")
        inputs = inputs.to(self.device)
        with self._lock, self._tracked():
            ctx = self._adapter_context(adapter)
            with ctx, torch.inference_mode():
                if batch[0].seed is not None:
                    torch.manual_seed(batch[0].seed)
                out = self.model.generate(**inputs, **self._generation_kwargs(batch[0], max_new))
        new_tokens = out[:, inputs["input_ids"].shape[1] :]  # (B, T_new)
        results = []
        for req, prompt, row in zip(batch, encoded, new_tokens.tolist(), strict=True):
            results.append(self._result(row[: req.max_new_tokens], adapter, len(prompt)))
        return results

    def _result(self, row: list[int], adapter: str | None, prompt_tokens: int) -> GenerationResult:
        """Cut generated ids at eos (finish 'stop'; else 'length') and decode them."""
        finish = "length"
        if self.tokenizer.eos_token_id in row:
            row = row[: row.index(self.tokenizer.eos_token_id)]
            finish = "stop"
        with self._tok_lock:
            text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
        return GenerationResult(text, adapter, prompt_tokens, len(row), finish)

    @contextlib.contextmanager
    def _tracked(self):
        """Record the outcome of one generate call for :meth:`health_check`."""
        try:
            yield
        except TinyQAError:
            raise  # the request's fault (unknown adapter, ...), not the model's
        except BaseException as e:
            self.last_error = e
            raise
        self.last_error = None
        self.last_ok = time.monotonic()

    def _adapter_context(self, adapter: str | None):
        """Activate ``adapter`` (or disable adapters for the base) for one generate call."""
        if adapter is None:
            return (
                self.model.disable_adapter()
                if is_peft_model(self.model)
                else contextlib.nullcontext()
            )
        name = self._ensure_loaded(adapter)  # may replace self.model (base -> PeftModel)
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def stream(self, req: GenerationRequest) -> Iterator[str]:
        """Yield text pieces of one answer as they are generated."""
        for event in self.stream_events(req):
            if isinstance(event, str):
                yield event

    def stream_events(
        self, req: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[str | GenerationResult]:
        """Yield text pieces of one answer as they are generated, then its :class:`GenerationResult`.

        Setting ``cancel`` or closing the iterator early (a client that went away) stops the
        generation at the next token, so an abandoned stream does not hold the model.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        prompt = self.prompt_ids(req.messages)
        ids = torch.tensor([prompt], device=self.device)  # (1, T)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generation_kwargs(req, req.max_new_tokens)
        error: list[BaseException] = []
        output: list[torch.Tensor] = []
        cancelled = cancel or threading.Event()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw) -> torch.Tensor:
                return torch.full(
                    (input_ids.shape[0],),
                    cancelled.is_set(),
                    dtype=torch.bool,
                    device=input_ids.device,
                )

        def run() -> None:
            try:
                with self._lock, self._tracked():
                    ctx = self._adapter_context(req.adapter)
                    with ctx, torch.inference_mode():
                        if req.seed is not None:
                            torch.manual_seed(req.seed)
                        output.append(
                            self.model.generate(
                                input_ids=ids,
                                attention_mask=torch.ones_like(ids),
                                streamer=streamer,
                                stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                                **kwargs,
                            )
                        )
            except BaseException as e:  # surfaced to the consumer below
                error.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            cancelled.set()  # no-op when generation already ended
            thread.join()
        if error:
            raise error[0]
        yield self._result(output[0][0, len(prompt) :].tolist(), req.adapter, len(prompt))

    def health_check(self, probe_after_s: float = 30.0) -> None:
        """Raise :class:`ModelError` when the model cannot generate.

        While requests are being served, a recent success decides; when the engine has been idle
        for ``probe_after_s`` or the last call failed, one token is generated from the base model
        — unless a generation holds the lock right now: a busy engine is a live one, and a failed
        call may have been one bad request's fault (Serve restarts a replica whose check fails).
        """
        idle = self.last_ok is None or time.monotonic() - self.last_ok > probe_after_s
        if not idle and self.last_error is None:
            return
        if not self._lock.acquire(blocking=False):
            return  # busy generating: the probe waits for an idle moment
        try:
            probe = GenerationRequest([{"role": "user", "content": "ping"}], None, max_new_tokens=1)
            try:
                self._generate_group([probe])
            except Exception as e:
                raise ModelError(f"the model cannot generate: {e!r}") from e
        finally:
            self._lock.release()

    def ask(
        self, question: str, adapter: str | None = None, max_new_tokens: int = 64
    ) -> GenerationResult:
        """One question, one answer (greedy)."""
        req = GenerationRequest([{"role": "user", "content": question}], adapter, max_new_tokens)
        return self.generate([req])[0]


# ----------------------------------------------------------------------------------------------
# one engine for a list of adapter folders (eval, ask, chat)
# ----------------------------------------------------------------------------------------------
@dataclass
class EngineModel:
    """One model an engine can answer with: the base (``engine_name`` None) or an adapter."""

    label: str  # shown in tables and files
    engine_name: str | None  # adapter name inside the engine; None = base
    path: Path | None
    system_prompt: str | None


def _unique(label: str, taken: set[str]) -> str:
    out, i = label, 2
    while out in taken:
        out, i = f"{label}#{i}", i + 1
    taken.add(out)
    return out


def _shared_base(adapters: list[tuple[Path, dict]]) -> ModelSettings:
    bases = {(m.get("base_model"), m["config"]["model"].get("revision")) for _, m in adapters}
    if len(bases) > 1:
        listing = "; ".join(f"{p} -> {m.get('base_model')!r}" for p, m in adapters)
        raise ModelError(
            f"the adapters were trained on different base models ({listing}); "
            "evaluate each base's adapters in a separate run"
        )
    return base_settings_from_manifest(adapters[0][1])


def build_engine(
    adapter_dirs: list[Path], fallback: ModelSettings, system_prompt: str | None
) -> tuple[QAEngine, list[EngineModel]]:
    """One engine on the adapters' shared base (``fallback`` when there are none), and its models:
    the base first, then one per adapter folder.

    Adapters get internal engine names (``adapter_0``...): an id may contain '.', which PEFT
    rejects as a module name. The base answers with the first adapter's system prompt (else
    ``system_prompt``), so base and adapter see the same prompt. Raises ModelError when the
    adapters were trained on different bases.
    """
    adapters = [(p, read_manifest(p)) for p in adapter_dirs]
    settings = _shared_base(adapters) if adapters else fallback
    taken: set[str] = {BASE_LABEL}
    models: list[EngineModel] = []
    extra: dict[str, Path] = {}
    for i, (path, manifest) in enumerate(adapters):
        label = _unique(str(manifest.get("adapter_id") or path.name), taken)
        name = f"adapter_{i}"
        extra[name] = path
        prompt = manifest["config"]["data"].get("system_prompt")
        models.append(EngineModel(label, name, path, prompt))
    engine = QAEngine(
        settings,
        adapter_root=None,
        max_adapters=max(1, len(extra)),
        system_prompt=None,  # every request carries its model's own system prompt
        extra_adapters=extra,
    )
    base_prompt = models[0].system_prompt if models else system_prompt
    return engine, [EngineModel(BASE_LABEL, None, None, base_prompt), *models]
