"""The HTTP front of the QA endpoint: the ``QAIngress`` Serve deployment (FastAPI).

Auth, request validation, adapter lookup, JSON errors and SSE; the answers come from the
``QAModel`` deployment (:mod:`serving.replica`) through a handle, so a full queue comes back as
``BackPressureError`` and is answered as a JSON 503 (Serve's proxy would answer plain text).

This module imports ray.serve, FastAPI and the torch-free core of tinyqa (config, adapters,
errors) only: an ingress replica (0.1 CPU) never loads torch, transformers or peft
(``tests/unit/test_imports.py`` checks it).
"""

import asyncio
import functools
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api import (
    NOT_FOUND,
    OVERLOADED,
    SERVER,
    TIMEOUT,
    ApiError,
    AskRequest,
    ChatCompletionRequest,
    Generation,
    ModelCatalog,
    ask_generation,
    ask_response,
    chat_chunk,
    chat_generation,
    chat_response,
    check_api_key,
    completion_id,
    describe_errors,
    error_body,
    max_body_bytes,
    openapi_request_bodies,
    parse_body,
    read_body,
    served_device,
    sse,
    usage,
)
from tinyqa.adapters import BestFile, ServingPlan
from tinyqa.config import build_config
from tinyqa.secrets import KeyDigest

# Serve writes the "ray.serve" logger to the replica log files; a child logger goes there too.
logger = logging.getLogger("ray.serve").getChild("tinyqa")


fastapi_app = FastAPI(
    title="tinyqa",
    description="Question answering with a LoRA-adapted model (OpenAI-compatible).",
    docs_url=None,
    redoc_url=None,
    openapi_url="/openapi.json",
)


def _openapi() -> dict[str, Any]:
    if fastapi_app.openapi_schema is None:
        schema = get_openapi(
            title=fastapi_app.title,
            version="1",
            description=fastapi_app.description,
            routes=fastapi_app.routes,
        )
        fastapi_app.openapi_schema = openapi_request_bodies(schema)
    return fastapi_app.openapi_schema


fastapi_app.openapi = _openapi


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        body = error_body(f"no route {request.url.path}", NOT_FOUND, "route_not_found")
    elif exc.status_code == 405:
        body = error_body(
            f"{request.method} is not allowed on {request.url.path}",
            "invalid_request_error",
            "method_not_allowed",
        )
    else:
        body = error_body(str(exc.detail), "invalid_request_error", exc.status_code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI answers 422 by default; the contract says 400 with the JSON error shape.
    return _error_response(describe_errors(list(exc.errors())))


def _guarded(route):
    """ApiError -> its JSON answer; anything else is our bug: 500, logged with the traceback."""

    @functools.wraps(route)
    async def wrapper(self, request: Request):
        try:
            return await route(self, request)
        except ApiError as e:
            return _error_response(e)
        except Exception:
            logger.exception("%s %s failed", request.method, request.url.path)
            return _error_response(
                ApiError(500, "internal error (logged by the server)", "internal_error", SERVER)
            )

    return wrapper


def _unavailable(e: BaseException) -> ApiError | None:
    if isinstance(e, BackPressureError):
        return ApiError(
            503,
            "the server is overloaded (request queue full); retry shortly",
            "overloaded",
            OVERLOADED,
            {"Retry-After": "1"},
        )
    if isinstance(e, DeploymentUnavailableError | ReplicaUnavailableError | RayActorError):
        # A replica that died under this request (chaos test: killed replica): the client may
        # retry at once; Serve routes the retry to a live replica.
        return ApiError(
            503,
            "the model is restarting; retry shortly",
            "unavailable",
            OVERLOADED,
            {"Retry-After": "1"},
        )
    return None


async def _awaited(response):
    return await response


# NOTE: @serve.ingress pickles the FastAPI app (and so these route methods) while this module is
# still being imported: every module-level name the routes use must be defined above this line.
@serve.deployment(name="QAIngress")
@serve.ingress(fastapi_app)
class QAIngress:
    """HTTP front: ``/v1/ask``, ``/v1/chat/completions``, ``/v1/models``, ``/healthz``."""

    def __init__(
        self,
        model: DeploymentHandle,
        config: dict[str, Any],
        plan: dict[str, Any],
        api_key: dict[str, str] | None,
    ):
        # Plain dicts cross the Ray boundary; validated again here, on the replica's side.
        self.cfg = build_config(config, "QAIngress config")
        self.limits = self.cfg.serve
        self.model = model
        # Only a salted digest of the key reaches this replica (see tinyqa/secrets.py).
        self.api_key = KeyDigest.from_dict(api_key) if api_key else None
        served = ServingPlan.from_dict(plan)
        best = served.best_file
        self.catalog = ModelCatalog(
            served.base_id,
            served.adapter_root,
            served.default_adapter,
            BestFile(best, self.cfg.serve.best_ttl_s, served.default_adapter) if best else None,
        )
        self.device, self.quantization = served_device(self.limits)

    # ----- helpers -----
    def _authorize(self, request: Request) -> None:
        check_api_key(request.headers.get("authorization"), self.api_key)

    async def _body(self, request: Request, model: type) -> Any:
        raw = await read_body(
            request.stream(), request.headers.get("content-length"), max_body_bytes(self.limits)
        )
        return parse_body(raw, request.headers.get("content-type"), model)

    def _handle(self, adapter: str | None, stream: bool = False):
        return self.model.options(multiplexed_model_id=adapter or "", stream=stream)

    async def _result(self, awaitable, cancel) -> dict[str, Any]:
        """Await a model call with the request timeout; map Serve errors to JSON answers."""
        try:
            out = await asyncio.wait_for(awaitable, self.limits.request_timeout_s)
        except asyncio.TimeoutError as e:
            cancel()
            raise ApiError(
                504,
                f"no answer within {self.limits.request_timeout_s:g} s; retry or ask for fewer tokens",
                "timeout",
                TIMEOUT,
            ) from e
        except Exception as e:
            if (mapped := _unavailable(e)) is not None:
                raise mapped from e
            raise
        if "error" in out:
            raise ApiError.from_dict(out["error"])
        return out

    async def _answer(self, adapter: str | None, gen: Generation) -> dict[str, Any]:
        response = self._handle(adapter).generate.remote(gen.payload())
        return (await self._result(_awaited(response), response.cancel))["result"]

    # ----- routes -----
    @fastapi_app.get("/healthz")
    @_guarded
    async def healthz(self, request: Request):
        """Liveness, answered here without touching the model deployment (a load balancer's
        probes never take a place in the model's queue; Serve's own health checks watch the
        model replicas). What is served is shown only to callers that pass the API key (all
        callers when the endpoint has none)."""
        try:
            self._authorize(request)
        except ApiError:
            return {"status": "ok"}
        return {
            "status": "ok",
            "base_model": self.catalog.base_id,
            "default_adapter": self.catalog.default_adapter,
            "device": self.device,
            "quantization": self.quantization,
        }

    @fastapi_app.get("/v1/models")
    @_guarded
    async def models(self, request: Request):
        self._authorize(request)
        return self.catalog.model_list()

    @fastapi_app.post("/v1/ask")
    @_guarded
    async def ask(self, request: Request):
        self._authorize(request)
        body: AskRequest = await self._body(request, AskRequest)
        adapter = self.catalog.select(body.adapter)
        gen = ask_generation(body, self.limits)
        result = await self._answer(adapter, gen)
        return ask_response(result, adapter or self.catalog.base_id)

    @fastapi_app.post("/v1/chat/completions")
    @_guarded
    async def chat_completions(self, request: Request):
        self._authorize(request)
        body: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        adapter = self.catalog.select(body.model)
        gen = chat_generation(body, self.limits)
        model_id = adapter or self.catalog.base_id
        if not body.stream:
            return chat_response(await self._answer(adapter, gen), model_id)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await self._stream(adapter, gen, model_id, include_usage)

    async def _stream(
        self, adapter: str | None, gen: Generation, model_id: str, include_usage: bool
    ) -> StreamingResponse:
        chunks = self._handle(adapter, stream=True).stream.remote(gen.payload())
        # The first item says whether the request is acceptable, before any header goes out.
        first = await self._result(chunks.__anext__(), chunks.cancel)
        chunk_id, created = completion_id(), int(time.time())

        async def events():
            yield sse(chat_chunk(chunk_id, created, model_id, {"role": "assistant", "content": ""}))
            try:
                result = None
                async for item in chunks:
                    if "text" in item:
                        yield sse(
                            chat_chunk(chunk_id, created, model_id, {"content": item["text"]})
                        )
                    elif "result" in item:
                        result = item["result"]
                finish = result["finish_reason"] if result else "stop"
                yield sse(chat_chunk(chunk_id, created, model_id, {}, finish))
                if include_usage and result:
                    tokens = usage(first["start"]["prompt_tokens"], result["completion_tokens"])
                    yield sse(chat_chunk(chunk_id, created, model_id, None, usage_=tokens))
            except Exception as e:
                mapped = _unavailable(e)
                if mapped is None:
                    logger.exception("stream for %s failed", model_id)
                    mapped = ApiError(
                        500, "internal error (logged by the server)", "internal_error", SERVER
                    )
                yield sse(mapped.body())
            yield sse("[DONE]")

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
