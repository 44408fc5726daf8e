"""The model side of the QA endpoint: the ``QAModel`` Serve deployment (the torch side).

One base model per replica, autoscaled. Adapters are Serve multiplexed models (the adapter id is
the multiplexed model id, so requests prefer replicas that have it loaded). Two engines
(``serve.engine``): ``continuous`` (:class:`~tinyqa.engine.ContinuousEngine`: a scheduler thread
batches at the token level, mixed adapters in one step, streams from the same batch) and
``static`` (``@serve.batch`` batches, which Serve splits by adapter, each generated to its end in
a thread under the :class:`~tinyqa.inference.QAEngine` lock; streams run one request at a time).
"""

import asyncio
import contextlib
import logging
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

import torch
from ray import serve

from serving.api import SERVER, TIMEOUT, ApiError
from tinyqa.adapters import ServingPlan, configure_adapter_cache
from tinyqa.config import build_config
from tinyqa.engine import ContinuousEngine, Event
from tinyqa.errors import TinyQAError
from tinyqa.inference import GenerationRequest, GenerationResult, QAEngine

# Serve writes the "ray.serve" logger to the replica log files; a child logger goes there too.
logger = logging.getLogger("ray.serve").getChild("tinyqa")


def _setup_replica_logging() -> None:
    # Replicas are entry points: make the library's INFO logs (adapter loads) visible there.
    lib = logging.getLogger("tinyqa")
    if not lib.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        lib.addHandler(handler)
        lib.setLevel(logging.INFO)


def _device_and_quantization(requested: str) -> tuple[str, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "auto":
        return device, "nf4" if device == "cuda" else "none"
    return device, requested


_END = object()


async def generate_isolated(
    engine: QAEngine, requests: list[GenerationRequest]
) -> list[GenerationResult | Exception]:
    """Results in order; a request that cannot be answered gets its exception instead, so one
    bad request never fails the others batched with it (a failed batch is retried one by one)."""
    try:
        return await asyncio.to_thread(engine.generate, requests)
    except Exception as e:
        if len(requests) == 1:
            return [e]
        logger.warning("a batch of %d failed (%r); answering one by one", len(requests), e)
    results: list[GenerationResult | Exception] = []
    for req in requests:
        try:
            results.append((await asyncio.to_thread(engine.generate, [req]))[0])
        except Exception as e:
            results.append(e)
    return results


def _failed(e: BaseException) -> dict[str, Any]:
    """The answer to one request that failed on our side: logged here, a JSON 500 for that
    request only (returned, not raised: the replica stays healthy for the others)."""
    logger.error("generation failed for one request", exc_info=e)
    error = ApiError(500, "generation failed (logged by the server)", "generation_failed", SERVER)
    return {"error": error.to_dict()}


def _engine_error(e: TinyQAError | TimeoutError) -> ApiError:
    """The answer to a request the continuous engine refused or gave up on."""
    if isinstance(e, TimeoutError):
        return ApiError(
            504, f"no answer in time: {e}; retry or ask for fewer tokens", "timeout", TIMEOUT
        )
    return ApiError.from_model_error(e)


@serve.deployment(name="QAModel")
class QAModel:
    """One base model with LoRA adapters; methods return ``{"result"}`` or ``{"error"}`` dicts."""

    def __init__(self, config: dict[str, Any], plan: dict[str, Any]):
        _setup_replica_logging()
        started = time.perf_counter()
        # Plain dicts cross the Ray boundary; validated again here, on the replica's side.
        self.cfg = build_config(config, "QAModel config")
        self.plan = ServingPlan.from_dict(plan)
        configure_adapter_cache(self.cfg)
        s = self.cfg.serve
        self.device, self.quantization = _device_and_quantization(s.quantization)
        if s.num_threads:
            torch.set_num_threads(s.num_threads)
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
        self.continuous = (
            ContinuousEngine(self.engine, max_batch=s.max_batch_size, num_threads=s.num_threads)
            if s.engine == "continuous"
            else None
        )
        logger.info(
            "QAModel ready in %.1f s: %s on %s (quantization %s, %s engine), default adapter %s",
            time.perf_counter() - started,
            self.plan.base_id,
            self.device,
            self.quantization,
            s.engine,
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
        return await generate_isolated(self.engine, requests)

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One answer (batched with concurrent requests for the same adapter)."""
        req = self._request(payload)
        try:
            await self._prepare(req)
        except TinyQAError as e:
            return {"error": ApiError.from_model_error(e).to_dict()}
        except Exception as e:
            return _failed(e)
        if self.continuous is None:
            result = await self._generate_batch(req)
            if isinstance(result, Exception):
                return _failed(result)
            return {"result": asdict(result)}
        try:
            async for event in self._submit(req, stream=False):
                if isinstance(event, GenerationResult):
                    return {"result": asdict(event)}
        except (TinyQAError, TimeoutError) as e:
            return {"error": _engine_error(e).to_dict()}
        raise RuntimeError("the engine ended a request without a result")  # a bug: 500

    async def _submit(self, req: GenerationRequest, stream: bool):
        """Events of one request from the continuous engine, without a thread per request; the
        request leaves the batch when this generator is closed or cancelled (client gone)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        ticket = self.continuous.submit(
            req,
            stream=stream,
            on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
            # a backstop: the ingress answers 504 and cancels us at request_timeout_s
            timeout_s=self.cfg.serve.request_timeout_s + 5.0,
        )
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, GenerationResult):
                    return
        finally:
            ticket.cancel()  # no-op once finished

    async def stream(self, payload: dict[str, Any]):
        """Yield ``{"error"}`` or ``{"start"}``, then ``{"text"}`` pieces, then ``{"result"}``."""
        req = self._request(payload)
        try:
            prompt_tokens = await self._prepare(req)
        except TinyQAError as e:
            yield {"error": ApiError.from_model_error(e).to_dict()}
            return
        except Exception as e:
            yield _failed(e)
            return
        yield {"start": {"prompt_tokens": prompt_tokens}}
        events = (
            self._submit(req, stream=True)
            if self.continuous is not None
            else self._static_events(req)
        )
        started = False  # the non-streamed answer is stripped: drop leading whitespace here too
        try:
            # aclosing: a client that goes away closes this generator, and with it the engine's
            # stream at once (its cleanup stops generation at the next token), not at GC time.
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, str):
                        text = event if started else event.lstrip()
                        if text:
                            started = True
                            yield {"text": text}
                    else:
                        yield {"result": asdict(event)}
        except (TinyQAError, TimeoutError) as e:
            if self.continuous is None:
                raise  # the static engine's errors keep their old path (logged, a 500)
            yield {"error": _engine_error(e).to_dict()}

    async def _static_events(self, req: GenerationRequest):
        """Text pieces, then the result, from the static engine's own streaming thread."""
        cancel = threading.Event()
        events = self.engine.stream_events(req, cancel=cancel)
        try:
            while (event := await asyncio.to_thread(next, events, _END)) is not _END:
                yield event
        finally:
            cancel.set()  # the client went away: stop generating at the next token

    async def check_health(self) -> None:
        """Serve restarts the replica when this raises (the model cannot generate)."""
        await asyncio.to_thread(self.engine.health_check)
