"""The Ray Serve application: an OpenAI-compatible QA endpoint over the library's QAEngine.

Two deployments:

- ``QAIngress`` (FastAPI, light): auth, request validation, adapter lookup, JSON errors, SSE.
  It calls the model deployment through a handle, so a full queue comes back as
  ``BackPressureError`` and is answered as a JSON 503 (Serve's proxy would answer plain text).
- ``QAModel`` (autoscaling, one base model per replica): adapters are Serve multiplexed models
  (the adapter id is the multiplexed model id, so requests prefer replicas that have it loaded);
  ``@serve.batch`` batches requests, which Serve splits by adapter; generation runs in a thread
  so the replica keeps accepting requests. The engine locks around ``generate``.

Entry point: ``build_app(args)`` (``serve run serving.app:build_app config=...`` /
``serving/config.yaml``), or :func:`serving.deploy.deploy` from ``tinyqa serve``.
"""

import asyncio
import functools
import logging
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
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
    parse_body,
    sse,
    usage,
)
from tinyqa.config import TinyQAConfig, build_config, load_config, merge_dicts, parse_overrides
from tinyqa.errors import ConfigError, TinyQAError
from tinyqa.inference import GenerationRequest, QAEngine, ServingPlan, serving_plan

# Serve writes the "ray.serve" logger to the replica log files; a child logger goes there too.
logger = logging.getLogger("ray.serve").getChild("tinyqa")

REPO_ROOT = Path(__file__).resolve().parents[1]
API_KEY_ENV = "TINYQA_API_KEY"


# ----------------------------------------------------------------------------------------------
# application arguments
# ----------------------------------------------------------------------------------------------
class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args:`` of a Serve config file).

    Give ``config`` (a YAML file) with optional ``overrides``, or ``settings`` (a whole config as
    a dict, e.g. ``TinyQAConfig.to_dict()``) with optional ``overrides``.
    """

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(
        None,
        description="tinyqa YAML config; a relative path is tried against the working directory, "
        "then the repository root.",
    )
    settings: dict[str, Any] | None = Field(None, description="A whole tinyqa config as a dict.")
    overrides: list[str] = Field(
        default_factory=list, description="Dotted key=value overrides, e.g. serve.max_replicas=4."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "AppArgs":
        if self.config is not None and self.settings is not None:
            raise ValueError("give either 'config' (a YAML path) or 'settings' (a dict), not both")
        return self

    def config_path(self) -> Path | None:
        if self.config is None:
            return None
        path = Path(self.config).expanduser()
        if path.is_absolute() or path.is_file():
            return path
        in_repo = REPO_ROOT / path
        return in_repo if in_repo.is_file() else path

    def load(self) -> TinyQAConfig:
        """The validated tinyqa config; raises :class:`ConfigError`."""
        if self.settings is None:
            return load_config(self.config_path(), self.overrides)
        data = merge_dicts(self.settings, parse_overrides(self.overrides))
        return build_config(data, "build_app settings" + (" + overrides" if self.overrides else ""))


def resolved(cfg: TinyQAConfig) -> TinyQAConfig:
    """``cfg`` with an absolute storage path: replicas run in other working directories."""
    return cfg.model_copy(update={"storage_path": str(cfg.run_dir.parent)})


def api_key_for(cfg: TinyQAConfig) -> str | None:
    """``serve.api_key``, else ``$TINYQA_API_KEY``, else None (no auth)."""
    return cfg.serve.api_key or os.environ.get(API_KEY_ENV) or None


# ----------------------------------------------------------------------------------------------
# the model deployment
# ----------------------------------------------------------------------------------------------
def _setup_replica_logging() -> None:
    # Replicas are entry points: make the library's INFO logs (adapter loads) visible there.
    lib = logging.getLogger("tinyqa")
    if not lib.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        lib.addHandler(handler)
        lib.setLevel(logging.INFO)


def _device_and_quantization(requested: str) -> tuple[str, str]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "auto":
        return device, "nf4" if device == "cuda" else "none"
    return device, requested


_END = object()


@serve.deployment(name="QAModel")
class QAModel:
    """One base model with LoRA adapters; methods return ``{"result"}`` or ``{"error"}`` dicts."""

    def __init__(self, config: dict[str, Any], plan: dict[str, Any]):
        _setup_replica_logging()
        started = time.perf_counter()
        self.cfg = build_config(config, "QAModel config")
        self.plan = ServingPlan.from_dict(plan)
        s = self.cfg.serve
        self.device, self.quantization = _device_and_quantization(s.quantization)
        self.engine = QAEngine(
            self.plan.base,
            self.plan.adapter_root,
            quantization=self.quantization,
            device=self.device,
            max_adapters=s.max_adapters_per_replica,
            system_prompt=self.plan.system_prompt,
        )

        async def load_adapter(adapter_id: str) -> str:
            await asyncio.to_thread(self.engine.load, adapter_id)
            return adapter_id

        # Wrapped here because the cap comes from the config (Serve supports init-time wiring).
        self._load_adapter = serve.multiplexed(
            max_num_models_per_replica=s.max_adapters_per_replica
        )(load_adapter)
        self._generate_batch.set_max_batch_size(s.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        if self.plan.default_adapter:
            self.engine.load(self.plan.default_adapter)
        self.engine.health_check(probe_after_s=0)  # fail the replica now if it cannot generate
        logger.info(
            "QAModel ready in %.1f s: %s on %s (quantization %s), default adapter %s",
            time.perf_counter() - started,
            self.plan.base_id,
            self.device,
            self.quantization,
            self.plan.default_adapter,
        )

    def _request(self, payload: dict[str, Any]) -> GenerationRequest:
        # The adapter travels as the multiplexed model id ("" = the base model).
        return GenerationRequest(
            messages=payload["messages"],
            adapter=serve.get_multiplexed_model_id() or None,
            max_new_tokens=payload["max_new_tokens"],
            temperature=payload["temperature"],
            top_p=payload["top_p"],
            seed=payload["seed"],
        )

    async def _prepare(self, req: GenerationRequest) -> int:
        """Load the adapter and count prompt tokens; raises TinyQAError for a bad request."""
        if req.adapter is not None:
            await self._load_adapter(req.adapter)
        s = self.cfg.serve
        return await asyncio.to_thread(
            self.engine.check_prompt, req.messages, s.max_prompt_tokens, req.max_new_tokens
        )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, requests: list) -> list:
        return await asyncio.to_thread(self.engine.generate, requests)

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One answer (batched with concurrent requests for the same adapter)."""
        req = self._request(payload)
        try:
            await self._prepare(req)
        except TinyQAError as e:
            return {"error": ApiError.from_model_error(e).to_dict()}
        result = await self._generate_batch(req)
        return {"result": asdict(result)}

    async def stream(self, payload: dict[str, Any]):
        """Yield ``{"error"}`` or ``{"start"}``, then ``{"text"}`` pieces, then ``{"result"}``."""
        req = self._request(payload)
        try:
            prompt_tokens = await self._prepare(req)
        except TinyQAError as e:
            yield {"error": ApiError.from_model_error(e).to_dict()}
            return
        yield {"start": {"prompt_tokens": prompt_tokens}}
        cancel = threading.Event()
        events = self.engine.stream_events(req, cancel=cancel)
        started = False  # the non-streamed answer is stripped: drop leading whitespace here too
        try:
            while (event := await asyncio.to_thread(next, events, _END)) is not _END:
                if isinstance(event, str):
                    text = event if started else event.lstrip()
                    if text:
                        started = True
                        yield {"text": text}
                else:
                    yield {"result": asdict(event)}
        finally:
            cancel.set()  # the client went away: stop generating at the next token

    async def info(self) -> dict[str, Any]:
        return {
            "base_model": self.plan.base_id,
            "default_adapter": self.plan.default_adapter,
            "loaded_adapters": self.engine.loaded_adapters(),
            "device": self.device,
            "quantization": self.quantization,
        }

    async def check_health(self) -> None:
        """Serve restarts the replica when this raises (the model cannot generate)."""
        await asyncio.to_thread(self.engine.health_check)


# ----------------------------------------------------------------------------------------------
# the HTTP ingress
# ----------------------------------------------------------------------------------------------
fastapi_app = FastAPI(
    title="tinyqa",
    description="Question answering with a LoRA-adapted model (OpenAI-compatible).",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


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
        return ApiError(503, "the model is restarting; retry shortly", "unavailable", OVERLOADED)
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
        api_key: str | None,
    ):
        self.cfg = build_config(config, "QAIngress config")
        self.limits = self.cfg.serve
        self.model = model
        self.api_key = api_key
        self.catalog = ModelCatalog(
            plan["base"]["name"], Path(plan["adapter_root"]), plan["default_adapter"]
        )

    # ----- helpers -----
    def _authorize(self, request: Request) -> None:
        check_api_key(request.headers.get("authorization"), self.api_key)

    async def _body(self, request: Request, model: type) -> Any:
        limit = max_body_bytes(self.limits)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413, f"the body has {declared} bytes; the limit is {limit}", "body_too_large"
            )
        raw = await request.body()
        if len(raw) > limit:
            raise ApiError(
                413, f"the body has {len(raw)} bytes; the limit is {limit}", "body_too_large"
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
        response = self.model.info.remote()
        info = await self._result(_awaited(response), response.cancel)
        return {"status": "ok", **info}

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


# ----------------------------------------------------------------------------------------------
# build_app
# ----------------------------------------------------------------------------------------------
def deployment_options(cfg: TinyQAConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Serve options of (QAModel, QAIngress) from ``cfg.serve``."""
    from tinyqa.cluster import worker_env

    s = cfg.serve
    autoscaling: dict[str, Any] = {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
        "upscale_delay_s": s.upscale_delay_s,
        "downscale_delay_s": s.downscale_delay_s,
    }
    if s.initial_replicas is not None:
        autoscaling["initial_replicas"] = s.initial_replicas
    if s.look_back_period_s is not None:
        autoscaling["look_back_period_s"] = s.look_back_period_s
    if s.metrics_interval_s is not None:
        autoscaling["metrics_interval_s"] = s.metrics_interval_s
    env = {"env_vars": worker_env()}
    model = {
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "runtime_env": env},
    }
    # The ingress must never be the bottleneck that queues: it admits everything the model
    # deployment could run or queue, so overload is decided (and answered as JSON) downstream.
    queued = s.max_queued_requests if s.max_queued_requests >= 0 else 1000
    ingress = {
        "num_replicas": s.ingress_replicas,
        "max_ongoing_requests": s.max_replicas * s.max_ongoing_requests + queued + 32,
        "ray_actor_options": {"num_cpus": 0.1, "runtime_env": env},
    }
    return model, ingress


def build_app(args: AppArgs) -> serve.Application:
    """The Serve application for a tinyqa config (``args``: :class:`AppArgs` or a plain dict).

    Raises :class:`ConfigError` for a bad config and :class:`~tinyqa.errors.ModelError` when the
    default adapter cannot be served.
    """
    if not isinstance(args, AppArgs):
        try:
            args = AppArgs.model_validate(args)
        except Exception as e:
            raise ConfigError(f"build_app arguments: {e}") from e
    cfg = resolved(args.load())
    plan = serving_plan(cfg)
    logger.info(
        "serving plan: %s (base %s, adapters under %s)",
        plan.reason,
        plan.base_id,
        plan.adapter_root,
    )
    model_opts, ingress_opts = deployment_options(cfg)
    config, plan_dict = cfg.to_dict(), plan.to_dict()
    model = QAModel.options(**model_opts).bind(config, plan_dict)
    return QAIngress.options(**ingress_opts).bind(model, config, plan_dict, api_key_for(cfg))
