"""The HTTP contract of the QA endpoint, without Ray or torch: request models, limits, errors,
responses.

Everything a request can get wrong is decided here, so it is unit-tested without a cluster:
the body must be a JSON object (``Content-Type: application/json``), fields are strictly typed
(``"5"`` is not an int) and unknown fields are rejected; limits come from ``ServeSettings``.
Every error is :class:`ApiError`, rendered as ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tinyqa.adapters import (
    BestFile,
    check_adapter_id,
    list_adapters,
    read_manifest,
    resolve_adapter,
)
from tinyqa.config import ServeSettings
from tinyqa.errors import (
    AdapterMismatch,
    ModelError,
    PromptTooLong,
    StorageError,
    TinyQAError,
    UnknownAdapter,
)
from tinyqa.secrets import KeyDigest

# OpenAI's error "type" values, so OpenAI clients raise the matching exception classes.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
OVERLOADED = "overloaded_error"
TIMEOUT = "timeout_error"
SERVER = "server_error"

# Room for JSON syntax and field names around the longest allowed texts.
_BODY_OVERHEAD_BYTES = 64 * 1024

# torch.manual_seed's range: a seed outside it fails inside generate, for the whole batch.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Below this, sampling is greedy in all but name, and logits / temperature can overflow to inf
# (NaN probabilities, a failed batch): such temperatures are answered greedily.
MIN_TEMPERATURE = 0.01


class ApiError(Exception):
    """An HTTP error answer: status plus the JSON error body."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        type_: str = INVALID_REQUEST,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that crosses a Ray boundary (see :meth:`from_dict`)."""
        return {
            "status": self.status,
            "message": self.message,
            "code": self.code,
            "type": self.type,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ApiError:
        return cls(data["status"], data["message"], data["code"], data["type"])

    @classmethod
    def from_model_error(cls, e: TinyQAError) -> ApiError:
        """The answer to a request the model side refused (prompt too long, unknown adapter)."""
        if isinstance(e, PromptTooLong):
            return cls(413, str(e), "prompt_too_long")
        if isinstance(e, UnknownAdapter | AdapterMismatch):
            return cls(404, str(e), "model_not_found", NOT_FOUND)
        if isinstance(e, StorageError):  # cloud storage down or slow: retry later, not our bug
            return cls(503, str(e), "storage_unavailable", OVERLOADED, {"Retry-After": "5"})
        return cls(400, str(e), "invalid_request")


def error_body(message: str, type_: str, code: str | int) -> dict[str, Any]:
    # A message may quote the request (a field name, a path): lone surrogates from JSON escapes
    # like "\\ud800" cannot be encoded as UTF-8, and the answer would fail on its way out.
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": safe, "type": type_, "code": code}}


# ----------------------------------------------------------------------------------------------
# request models
# ----------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # strict: JSON "5" is not an int and 1 is not a bool; ints are accepted for floats.
    model_config = ConfigDict(extra="forbid", strict=True)


class AskRequest(_Strict):
    """``POST /v1/ask``."""

    question: str = Field(description="The question; not empty.")
    adapter: str | None = Field(None, description="Adapter id or the base id; empty = default.")
    max_new_tokens: int | None = Field(None, ge=1, description="Answer length cap (tokens).")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="0 = greedy (default); below 0.01 also greedy."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX, description="Seed for sampled (temperature > 0) answers."
    )

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions`` (the OpenAI fields this endpoint honours)."""

    model: str | None = Field(None, description="Adapter id or the base id; empty = default.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="0 = greedy (default); below 0.01 also greedy."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=1, description="Only one choice is generated.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = None  # accepted for OpenAI compatibility; not used


# ----------------------------------------------------------------------------------------------
# the OpenAPI description of the request bodies
# ----------------------------------------------------------------------------------------------
# The routes read and validate their bodies themselves (limits while reading, JSON error bodies),
# so FastAPI cannot see the models: these bodies go into the schema the app serves.
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "/v1/ask": AskRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            },
        }
    },
}


def openapi_request_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the JSON request bodies and the error body to an OpenAPI document (in place)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = _ERROR_SCHEMA
    for path, model in REQUEST_MODELS.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        operation = schema["paths"][path]["post"]
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    for item in schema["paths"].values():
        for operation in item.values():
            operation.setdefault("responses", {})["default"] = {
                "description": "An error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
    return schema


# ----------------------------------------------------------------------------------------------
# parsing and validation
# ----------------------------------------------------------------------------------------------
def max_body_bytes(limits: ServeSettings) -> int:
    """The largest request body worth reading (every message at the character limit, UTF-8)."""
    return limits.max_messages * limits.max_question_chars * 4 + _BODY_OVERHEAD_BYTES


def _too_large(what: str, limit: int) -> ApiError:
    return ApiError(413, f"the body has {what} bytes; the limit is {limit}", "body_too_large")


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The request body from its stream, refused (413) as soon as it passes ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before reading; a chunked body (no
    length) is read only up to the limit, never whole.
    """
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _too_large(declared.strip(), limit)
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_large(f"more than {limit}", limit)
        parts.append(chunk)
    return b"".join(parts)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, content_type: str | None, model: type[_Strict]) -> Any:
    """Decode and validate a JSON request body; raises :class:`ApiError` (400)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(
            400,
            f"Content-Type must be application/json, got {content_type or 'none'!r}",
            "invalid_content_type",
        )
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", "invalid_json") from e
    except RecursionError as e:
        raise ApiError(400, "the body is nested too deeply", "invalid_json") from e
    _check_unicode(data)
    if not isinstance(data, dict):
        raise ApiError(
            400, f"the body must be a JSON object, got {type(data).__name__}", "invalid_json"
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from e


def _check_unicode(data: Any) -> None:
    """400 for a lone UTF-16 surrogate (``"\\ud800"``) anywhere in the body: JSON allows the
    escape, but it is not text, and the tokenizer and every UTF-8 encoder reject it."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            "the body holds a lone UTF-16 surrogate escape (e.g. \\ud800), which is not text; "
            "send valid Unicode",
            "invalid_json",
        ) from e
    except RecursionError as e:
        raise ApiError(400, "the body is nested too deeply", "invalid_json") from e


def validation_error(err: ValidationError) -> ApiError:
    """One 400 naming every bad field (unknown, missing, wrong type or out of range)."""
    return describe_errors(err.errors())


def describe_errors(errors: list[dict[str, Any]]) -> ApiError:
    """A 400 from pydantic-style error dicts (also FastAPI's ``RequestValidationError``)."""
    problems, codes = [], []
    for e in errors:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown field '{where}'")
            codes.append("unknown_field")
        elif e["type"] == "missing":
            problems.append(f"missing field '{where}'")
            codes.append("missing_field")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            shown = "" if isinstance(value, dict | list) else f" (got {value!r:.80})"
            problems.append(f"'{where}': {msg}{shown}")
            codes.append("invalid_field")
    # Several kinds at once: report the first (the order pydantic found them in).
    return ApiError(400, "; ".join(problems), codes[0] if codes else "invalid_field")


@dataclass
class Generation:
    """A validated request, as the model deployment receives it (plus the adapter, which travels
    as the multiplexed model id)."""

    messages: list[dict[str, str]]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None

    def payload(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


def _max_new_tokens(value: int | None, limits: ServeSettings, field: str) -> int:
    if value is None:
        return limits.max_new_tokens
    if value > limits.max_new_tokens_cap:
        raise ApiError(
            400,
            f"'{field}' is {value}; the maximum is {limits.max_new_tokens_cap}",
            "invalid_field",
        )
    return value


def _temperature(value: float | None) -> float:
    """The sampling temperature to use; 0 (greedy) for unset and below :data:`MIN_TEMPERATURE`."""
    return value if value is not None and value >= MIN_TEMPERATURE else 0.0


def _check_chars(text: str, limits: ServeSettings, what: str) -> None:
    if len(text) > limits.max_question_chars:
        raise ApiError(
            413,
            f"{what} has {len(text)} characters; the limit is {limits.max_question_chars}",
            "prompt_too_long",
        )


def ask_generation(req: AskRequest, limits: ServeSettings) -> Generation:
    """Apply the configured limits to an ask request (413 too long, 400 over the token cap)."""
    _check_chars(req.question, limits, "the question")
    return Generation(
        messages=[{"role": "user", "content": req.question}],
        max_new_tokens=_max_new_tokens(req.max_new_tokens, limits, "max_new_tokens"),
        temperature=_temperature(req.temperature),
        top_p=req.top_p or 1.0,
        seed=req.seed,
    )


def chat_generation(req: ChatCompletionRequest, limits: ServeSettings) -> Generation:
    """Apply the configured limits to a chat request (413 too many / too long messages)."""
    if len(req.messages) > limits.max_messages:
        raise ApiError(
            413,
            f"{len(req.messages)} messages; the limit is {limits.max_messages}",
            "too_many_messages",
        )
    messages = []
    for i, m in enumerate(req.messages):
        text = m.text()
        _check_chars(text, limits, f"messages[{i}]")
        messages.append({"role": m.role, "content": text})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise ApiError(400, "'messages' needs at least one non-empty user message", "invalid_field")
    if req.max_completion_tokens is not None:
        max_new = _max_new_tokens(req.max_completion_tokens, limits, "max_completion_tokens")
    else:
        max_new = _max_new_tokens(req.max_tokens, limits, "max_tokens")
    return Generation(
        messages=messages,
        max_new_tokens=max_new,
        temperature=_temperature(req.temperature),
        top_p=req.top_p or 1.0,
        seed=req.seed,
    )


def check_api_key(authorization: str | None, api_key: KeyDigest | None) -> None:
    """Bearer auth against the key's salted digest, in constant time; no key configured = open.
    Raises 401."""
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            "missing_api_key",
            AUTHENTICATION,
            challenge,
        )
    if not api_key.matches(token.strip()):
        raise ApiError(401, "invalid API key", "invalid_api_key", AUTHENTICATION, challenge)


# ----------------------------------------------------------------------------------------------
# models (base + adapters)
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelCatalog:
    """What the endpoint can answer with: the base id, adapters under the root, the default."""

    base_id: str
    adapter_root: Path
    default_adapter: str | None
    best: BestFile | None = None  # when set, best.json's adapter replaces the default (TTL)

    def current_default(self) -> str | None:
        """The default adapter now: best.json's (re-read after its TTL) when it may change."""
        if self.best is not None:
            self.default_adapter = self.best.adapter_id()
        return self.default_adapter

    def select(self, name: str | None) -> str | None:
        """The adapter id for a request's ``adapter`` / ``model`` (None = the base model).

        Empty = the default adapter; the base id = the base model (it wins over an adapter of
        the same name). Raises :class:`ApiError` 400 for an id that is not a name (paths never
        reach the filesystem) and 404 for an unknown adapter — never a silent fallback.
        """
        if name is None:
            return self.current_default()
        if name == self.base_id:
            return None
        try:
            check_adapter_id(name)
        except ModelError as e:
            raise ApiError(400, str(e), "invalid_model") from e
        try:
            resolve_adapter(self.adapter_root, name, self.base_id)
        except ModelError as e:  # unknown, trained on another base, or a broken folder
            raise ApiError(404, str(e), "model_not_found", NOT_FOUND) from e
        except StorageError as e:
            raise ApiError.from_model_error(e) from e
        return name

    def adapters(self) -> list[str]:
        """Adapters under the root that were trained on the served base."""
        out = []
        for adapter_id in list_adapters(self.adapter_root):
            try:
                base = read_manifest(self.adapter_root / adapter_id).get("base_model")
            except ModelError:
                continue  # a half-written or broken folder is not servable
            if base == self.base_id:
                out.append(adapter_id)
        return out

    def model_list(self) -> dict[str, Any]:
        """``GET /v1/models`` in OpenAI's list format."""
        created = int(time.time())
        self.current_default()
        try:
            adapters = self.adapters()
        except StorageError as e:
            raise ApiError.from_model_error(e) from e
        data = [_model_card(self.base_id, created, None, self.default_adapter is None)]
        data += [_model_card(a, created, self.base_id, a == self.default_adapter) for a in adapters]
        return {"object": "list", "data": data}


def served_device(settings: ServeSettings) -> tuple[str, str]:
    """(device, quantization) the model replicas run with: Ray gives a replica a GPU exactly
    when ``num_gpus`` > 0, and ``auto`` quantization means NF4 on a GPU, none on a CPU."""
    device = "cuda" if settings.num_gpus > 0 else "cpu"
    if settings.quantization == "auto":
        return device, "nf4" if device == "cuda" else "none"
    return device, settings.quantization


def _model_card(model_id: str, created: int, parent: str | None, default: bool) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "tinyqa",
        "root": parent or model_id,
        "parent": parent,
        "default": default,
    }


# ----------------------------------------------------------------------------------------------
# responses
# ----------------------------------------------------------------------------------------------
def ask_response(result: dict[str, Any], model_id: str) -> dict[str, Any]:
    return {
        "answer": result["text"],
        "adapter": model_id,
        "finish_reason": result["finish_reason"],
        "usage": {
            "prompt_tokens": result["prompt_tokens"],
            "completion_tokens": result["completion_tokens"],
        },
    }


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(result: dict[str, Any], model_id: str) -> dict[str, Any]:
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"]},
                "finish_reason": result["finish_reason"],
            }
        ],
        "usage": usage(result["prompt_tokens"], result["completion_tokens"]),
    }


def chat_chunk(
    chunk_id: str,
    created: int,
    model_id: str,
    delta: dict[str, str] | None = None,
    finish_reason: str | None = None,
    usage_: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` with usage = the final usage-only chunk."""
    chunk: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model_id,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line pair."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"
