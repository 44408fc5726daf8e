"""Serving benchmark: the Serve endpoint under sequential and concurrent clients, with one adapter
and with four mixed, against the seed's way (an in-process ``generate`` loop, one question at a
time).

Without ``endpoint``, the bench deploys a scratch app on a private local Ray (in its own
process, removed afterwards) over four adapters it creates (fresh LoRA weights of ``cfg.lora``
on ``cfg.model``: the same compute as trained ones), with the model deployment pinned to
``replicas`` replicas so autoscaling does not move the figures. With ``endpoint``, it measures
that running deployment and its adapters as ``GET /v1/models`` lists them.

Every mode sends the same questions (the same number of requests), so requests/s and generated
tokens/s compare across modes. Clients speak the HTTP contract: ``POST /v1/ask``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchError,
    new_result,
    percentile,
    ratio,
    run_arm,
    set_ray_worker_niceness,
    target,
)
from tinyqa.config import TinyQAConfig, build_config

logger = logging.getLogger(__name__)

ADAPTER_IDS = ("bench-a0", "bench-a1", "bench-a2", "bench-a3")
FULL = {"concurrency": (1, 8, 16, 32), "requests": 96}
SERVE_ARMS = ("baseline", "static", "continuous", "engines", "llamacpp")
"""baseline: the seed's in-process loop; static / continuous: that engine behind Serve over HTTP;
engines: the engines in one process (loop, plain batched generate, continuous); llamacpp:
llama.cpp on the smollm2 GGUF."""
QUICK_ARMS = ("baseline", "llamacpp")  # plus the configured engine behind Serve
QUICK = {"concurrency": (1, 4), "requests": 8, "max_new_tokens": 8}
APP_NAME = "tinyqa-bench"


def _questions(cfg: TinyQAConfig, n: int) -> list[str]:
    from tinyqa.data import dataset_path, load_records

    records = load_records(dataset_path(cfg.data), cfg.data.max_question_chars)
    return [records[i % len(records)].question for i in range(n)]


def make_adapters(cfg: TinyQAConfig, ids: tuple[str, ...] = ADAPTER_IDS) -> list[Path]:
    """Write fresh (untrained) LoRA adapters of ``cfg.lora`` on ``cfg.model`` under
    ``cfg.adapters_dir``, one folder per id, each a valid tinyqa adapter with its manifest."""
    import torch

    from tinyqa.model import apply_lora, load_base_model, load_tokenizer, save_adapter

    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = apply_lora(load_base_model(cfg.model, "cpu", "none"), cfg.lora)
    paths = []
    for adapter_id in ids:
        manifest = {
            "adapter_id": adapter_id,
            "base_model": cfg.model.name,
            "config": cfg.to_dict(),
            "metrics": {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": "benchmark adapter: fresh LoRA weights, not trained",
        }
        paths.append(save_adapter(model, tokenizer, cfg.adapters_dir / adapter_id, manifest))
    return paths


# ----------------------------------------------------------------------------- load generation
async def _run_mode(
    client,
    url: str,
    questions: list[str],
    adapters: list[str | None],
    concurrency: int,
    max_new_tokens: int,
    headers: dict[str, str],
    stream: bool = False,
) -> dict[str, Any]:
    """``len(questions)`` requests from ``concurrency`` clients, each sending its next one as
    soon as its previous answer is back (closed loop). ``stream``: OpenAI-style streamed chat
    completions (SSE) instead of ``/v1/ask``, timing the first token too."""
    pending = list(range(len(questions)))
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    codes: dict[str, int] = {}
    first_error: list[str] = []

    async def streamed(body: dict[str, Any], t: float) -> tuple[str, str, float | None, int]:
        """One SSE answer: (status, error text, seconds to the first token, completion tokens)."""
        first, used = None, 0
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers
        ) as r:
            if r.status_code != 200:
                return str(r.status_code), (await r.aread()).decode()[:200], None, 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    used = int(chunk["usage"].get("completion_tokens", 0))
                elif first is None and any(
                    (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])
                ):
                    first = time.perf_counter() - t
        return "200", "", first, used

    async def client_loop() -> None:
        nonlocal tokens
        while pending:
            i = pending.pop(0)
            adapter = adapters[i % len(adapters)]
            t = time.perf_counter()
            r, first, used, error = None, None, 0, ""
            try:
                if stream:
                    body: dict[str, Any] = {
                        "messages": [{"role": "user", "content": questions[i]}],
                        "max_tokens": max_new_tokens,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    if adapter is not None:
                        body["model"] = adapter
                    code, error, first, used = await streamed(body, t)
                else:
                    body = {"question": questions[i], "max_new_tokens": max_new_tokens}
                    if adapter is not None:
                        body["adapter"] = adapter
                    r = await client.post(f"{url}/v1/ask", json=body, headers=headers)
                    code = str(r.status_code)
                    if r.status_code == 200:
                        used = int(r.json().get("usage", {}).get("completion_tokens", 0))
                    else:
                        error = r.text[:200]
            except Exception as e:  # a refused / reset connection counts as a failed request
                code, error = type(e).__name__, str(e)[:200]
            codes[code] = codes.get(code, 0) + 1
            if code == "200":
                latencies.append(time.perf_counter() - t)
                tokens += used
                if first is not None:
                    ttfts.append(first)
            elif not first_error:
                first_error.append(f"{code}: {error}")

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ok = len(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(questions),
        "ok": ok,
        "errors": len(questions) - ok,
        "status_codes": codes,
        "first_error": first_error[0] if first_error else None,
        "wall_seconds": wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_max_s": max(latencies) if latencies else None,
        "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
        "ttft_p95_s": percentile(ttfts, 95) if ttfts else None,
        "requests_per_second": ok / wall if wall > 0 else None,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / wall if wall > 0 else None,
    }


async def _run_modes(
    url: str,
    questions: list[str],
    adapter_sets: dict[str, list[str | None]],
    concurrency: tuple[int, ...],
    max_new_tokens: int,
    api_key: str | None,
    stream_concurrency: tuple[int, ...] = (),
) -> dict[str, dict[str, Any]]:
    """Every adapter set at every client count through ``/v1/ask``; then, at each of
    ``stream_concurrency``, the first set through streamed chat completions (label
    ``"<set>, streamed"``, with time to first token)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(
        max_connections=max(concurrency) + 4, max_keepalive_connections=max(concurrency) + 4
    )
    out: dict[str, dict[str, Any]] = {}
    # trust_env=False: a proxy from the environment must not sit between us and loopback.
    async with httpx.AsyncClient(timeout=300.0, limits=limits, trust_env=False) as client:
        for label, adapters in adapter_sets.items():
            # Warm-up: every adapter loaded on the replica, connections open, batch path taken.
            warm = [questions[i % len(questions)] for i in range(2 * max(len(adapters), 4))]
            await _run_mode(
                client, url, warm, adapters, min(8, max(concurrency)), max_new_tokens, headers
            )
            out[label] = {}
            for c in concurrency:
                out[label][f"c{c}"] = await _run_mode(
                    client, url, questions, adapters, c, max_new_tokens, headers
                )
                logger.info(
                    "serve bench %s, %d clients: %.1f req/s",
                    label,
                    c,
                    out[label][f"c{c}"]["requests_per_second"] or 0.0,
                )
        label, adapters = next(iter(adapter_sets.items()))
        for c in stream_concurrency:
            m = await _run_mode(
                client, url, questions, adapters, c, max_new_tokens, headers, stream=True
            )
            out.setdefault(f"{label}, streamed", {})[f"c{c}"] = m
            logger.info(
                "serve bench %s streamed, %d clients: %.1f req/s, TTFT p50 %.2f s",
                label,
                c,
                m["requests_per_second"] or 0.0,
                m["ttft_p50_s"] or 0.0,
            )
    return out


def list_endpoint_adapters(url: str, api_key: str | None) -> list[str]:
    """Adapter ids a running endpoint serves (``GET /v1/models`` entries with a parent)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30.0, trust_env=False)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {url}/v1/models ({e!r}); is the endpoint running?") from e
    if r.status_code != 200:
        raise BenchError(f"{url}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
    return [m["id"] for m in r.json().get("data", []) if m.get("parent")]


# ----------------------------------------------------------------------------- arm processes
def _load_qa_engine(spec: dict[str, Any], min_adapters: int = 1) -> tuple[Any, Any, float]:
    """An arm process's config (adapters made when ``spec`` asks), its torch threads set, and a
    ``QAEngine`` holding at least ``min_adapters``; with the engine's load time in seconds."""
    import torch

    from tinyqa.inference import QAEngine

    cfg = build_config(spec["config"], "bench serve config")
    if spec.get("make_adapters"):
        make_adapters(cfg)
    torch.set_num_threads(int(spec["threads"]))
    t = time.perf_counter()
    engine = QAEngine(
        cfg.model,
        cfg.adapters_dir,
        quantization=cfg.serve.quantization,
        max_adapters=max(cfg.serve.max_adapters_per_replica, min_adapters),
        system_prompt=cfg.data.system_prompt,
    )
    return cfg, engine, time.perf_counter() - t


def measure_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """The seed's way: one process, one question at a time through ``QAEngine`` (spec: config,
    threads, requests, max_new_tokens, adapter, make_adapters)."""
    import torch

    cfg, engine, load_seconds = _load_qa_engine(spec)
    questions = _questions(cfg, int(spec["requests"]))
    adapter, n_new = spec.get("adapter"), int(spec["max_new_tokens"])
    engine.ask(questions[0], adapter, n_new)  # warm-up (adapter load, first-call costs)
    latencies, tokens = [], 0
    started = time.perf_counter()
    for q in questions:
        t = time.perf_counter()
        tokens += engine.ask(q, adapter, n_new).completion_tokens
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    return {
        "name": "in-process loop",
        "concurrency": 1,
        "requests": len(questions),
        "ok": len(questions),
        "errors": 0,
        "threads": torch.get_num_threads(),
        "load_seconds": load_seconds,
        "wall_seconds": wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_max_s": max(latencies),
        "requests_per_second": len(questions) / wall,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / wall,
    }


def measure_llamacpp(spec: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp (``llama-cpp-python``) on the GGUF the ``smollm2`` preset is made from, the way a
    user serving a small model on CPUs runs it: one stream at a time (the high-level API holds
    one context), greedy, the GGUF's own chat template, as many threads as a replica gets. Spec:
    config, gguf, threads, requests, max_new_tokens. Streamed, to time the first token; each
    streamed piece is one token."""
    from llama_cpp import Llama

    cfg = build_config(spec["config"], "bench serve config")
    threads, n_new = int(spec["threads"]), int(spec["max_new_tokens"])
    t = time.perf_counter()
    llm = Llama(
        model_path=spec["gguf"],
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=2048,
        seed=cfg.seed,
        verbose=False,
    )
    load_seconds = time.perf_counter() - t

    def answer(question: str) -> tuple[float, float | None, int]:
        t0, first, n = time.perf_counter(), None, 0
        for chunk in llm.create_chat_completion(
            messages=[{"role": "user", "content": question}],
            max_tokens=n_new,
            temperature=0.0,
            stream=True,
        ):
            if chunk["choices"][0]["delta"].get("content"):
                n += 1
                if first is None:
                    first = time.perf_counter() - t0
        return time.perf_counter() - t0, first, n

    questions = _questions(cfg, int(spec["requests"]))
    answer(questions[0])  # warm-up
    latencies, ttfts, tokens, decode = [], [], 0, []
    started = time.perf_counter()
    for q in questions:
        latency, first, n = answer(q)
        latencies.append(latency)
        tokens += n
        if first is not None:
            ttfts.append(first)
            if n > 1:
                decode.append((n - 1) / (latency - first))
    wall = time.perf_counter() - started
    return {
        "name": "llama.cpp",
        "gguf": Path(spec["gguf"]).name,
        "concurrency": 1,
        "requests": len(questions),
        "ok": len(questions),
        "errors": 0,
        "threads": threads,
        "load_seconds": load_seconds,
        "wall_seconds": wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
        "requests_per_second": len(questions) / wall,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / wall,
        "decode_tokens_per_second_p50": percentile(decode, 50) if decode else None,
    }


def measure_serving(spec: dict[str, Any]) -> dict[str, Any]:
    """Deploy the scratch app on a private local Ray, run every mode, remove it (spec: config,
    threads, requests, concurrency, max_new_tokens)."""
    # Ray and serving are imported here, not at the top: the gpu suite (no Ray on those machines)
    # shares this package.
    import ray

    from serving.deploy import deploy
    from tinyqa.cluster import start_private
    from tinyqa.secrets import resolve_api_key

    cfg = build_config(spec["config"], "bench serve config")
    set_ray_worker_niceness(spec.get("worker_niceness"))  # replicas vs the baseline at 0
    t = time.perf_counter()
    start_private(int(spec["threads"]))
    ray_init = time.perf_counter() - t
    try:
        t = time.perf_counter()
        url = deploy(cfg, blocking=False)
        cold = time.perf_counter() - t
        questions = _questions(cfg, int(spec["requests"]))
        sets: dict[str, list[str | None]] = {
            "1 adapter": [ADAPTER_IDS[0]],
            "4 adapters": list(ADAPTER_IDS),
        }
        modes = asyncio.run(
            _run_modes(
                url,
                questions,
                sets,
                tuple(spec["concurrency"]),
                int(spec["max_new_tokens"]),
                resolve_api_key(cfg.serve.api_key),
                tuple(spec.get("stream_concurrency", ())),
            )
        )
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return {"url": url, "ray_init_seconds": ray_init, "deploy_seconds": cold, "modes": modes}


# ----------------------------------------------------------------------------- driver side
def _scratch_config(
    cfg: TinyQAConfig, work: Path, replicas: int | None, max_new_tokens: int
) -> dict[str, Any]:
    d = cfg.to_dict()
    d.update(storage_path=str(work), experiment="bench-serve")
    s = d["serve"]
    s.update(
        app_name=APP_NAME,
        adapter_root=None,
        default_adapter=ADAPTER_IDS[0],
        max_new_tokens=min(max_new_tokens, s["max_new_tokens_cap"]),
    )
    s["max_adapters_per_replica"] = max(s["max_adapters_per_replica"], len(ADAPTER_IDS))
    if replicas is not None:
        s.update(min_replicas=replicas, max_replicas=replicas, initial_replicas=replicas)
    return build_config(d, "bench serve config").to_dict()


def _served_precision(c: Any) -> str:
    """What this machine's replicas compute in: ``serve.quantization`` and ``model.dtype``
    resolved for their device (e.g. ``bfloat16``, ``nf4, compute float32``)."""
    import torch

    from serving.api import served_device
    from tinyqa.model import compute_dtype

    device, quant = served_device(c.serve)
    if quant == "bf16":
        return "bfloat16"
    dtype = str(compute_dtype(c.model, torch.device(device))).removeprefix("torch.")
    return dtype if quant == "none" else f"{quant}, compute {dtype}"


def bench_serve(
    cfg: TinyQAConfig,
    out: Path,
    quick: bool = False,
    endpoint: str | None = None,
    replicas: int | None = 1,
    ray_worker_niceness: int | None = 0,
    requests: int | None = None,
    concurrency: tuple[int, ...] | None = None,
    arms: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Measure serving (see the module docstring) and return the suite's result.

    ``ray_worker_niceness``: niceness of the scratch Ray's workers (None = Ray's default, 15).
    ``requests`` / ``concurrency`` replace the preset sizes (a real model on a few CPUs needs
    fewer requests per mode than the full preset's 96). ``arms``: a subset of :data:`SERVE_ARMS`
    (default: all of them in a full run; a quick run: baseline, llama.cpp); the configured
    ``serve.engine`` always runs behind Serve.
    """
    started = time.perf_counter()
    if arms is not None and (unknown := set(arms) - set(SERVE_ARMS)):
        raise BenchError(
            f"unknown serve bench arm(s) {', '.join(sorted(unknown))}; choose from "
            f"{', '.join(SERVE_ARMS)}"
        )
    if arms is not None and endpoint is not None:
        raise BenchError("--arms does not apply with --endpoint (that measures the deployment)")
    sizes = dict(QUICK if quick else FULL)
    if requests is not None:
        if requests < 1:
            raise BenchError(f"--requests must be at least 1, not {requests}")
        sizes["requests"] = requests
    if concurrency is not None:
        if not concurrency or min(concurrency) < 1:
            raise BenchError(f"--concurrency must list client counts >= 1, not {concurrency}")
        sizes["concurrency"] = tuple(sorted(set(concurrency)))
    max_new = sizes.get("max_new_tokens", cfg.serve.max_new_tokens)
    threads = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="_work-serve-", dir=out))
    config = _scratch_config(cfg, work, replicas, max_new)
    c = build_config(config)
    # A replica gets floor(num_cpus) threads from Ray; the baseline gets as many.
    base_threads = max(1, int(c.serve.num_cpus))
    settings = {
        "model": c.model.name,
        "quantization": c.serve.quantization,
        "precision": _served_precision(c) if endpoint is None else "as deployed",
        "endpoint": endpoint,
        "replicas": replicas if endpoint is None else "as deployed",
        "engine": c.serve.engine,
        "max_batch_size": c.serve.max_batch_size,
        "batch_wait_timeout_s": c.serve.batch_wait_timeout_s,
        "replica_num_cpus": c.serve.num_cpus,
        "baseline_threads": base_threads,
        "max_new_tokens": max_new,
        "requests_per_mode": sizes["requests"],
        "concurrency": list(sizes["concurrency"]),
        "ray_cpus": threads,
        "ray_worker_niceness": ray_worker_niceness if endpoint is None else "as deployed",
    }
    selected = set(arms) if arms is not None else set(QUICK_ARMS if quick else SERVE_ARMS)
    settings["arms"] = [a for a in SERVE_ARMS if a in selected]
    # A hang guard, not a budget: a real model on 2 CPUs answers 64 tokens in ~5 s, one at a time.
    arm_timeout = 600.0 if quick else max(1800.0, 60.0 * sizes["requests"])
    result = new_result("serve", quick, settings)
    result["arms"] = {}
    baseline = None
    try:
        if endpoint is None and "baseline" in selected:
            baseline = run_arm(
                "serve_baseline",
                {
                    "name": "baseline",
                    "config": config,
                    "threads": base_threads,
                    "requests": sizes["requests"],
                    "max_new_tokens": max_new,
                    "adapter": ADAPTER_IDS[0],
                    "make_adapters": True,
                },
                arm_timeout,
                work / "arms",
            )
        elif endpoint is None:
            make_adapters(c)  # the baseline arm writes them otherwise
        if endpoint is None:
            # The configured engine is arms["serve"]; a full run also deploys the other one and
            # measures the engines in-process (no Serve, no HTTP) against plain batched generate.
            engines = [c.serve.engine] + [
                e for e in ("static", "continuous") if e != c.serve.engine and e in selected
            ]
            for engine in engines:
                arm_config = {**config, "serve": {**config["serve"], "engine": engine}}
                result["arms"]["serve" if engine == c.serve.engine else f"serve_{engine}"] = (
                    run_arm(
                        "serve_load",
                        {
                            "name": f"serve-{engine}",
                            "config": arm_config,
                            "threads": threads,
                            "requests": sizes["requests"],
                            "concurrency": list(sizes["concurrency"]),
                            # Streamed answers (TTFT over HTTP): alone and at 16 clients.
                            "stream_concurrency": [
                                c_ for c_ in sizes["concurrency"] if c_ in (1, 16)
                            ],
                            "max_new_tokens": max_new,
                            "worker_niceness": ray_worker_niceness,
                        },
                        arm_timeout,
                        work / "arms",
                    )
                )
            served = result["arms"]["serve"]
            if "llamacpp" in selected:
                llamacpp = _llamacpp_arm(c, config, base_threads, sizes, max_new, work, arm_timeout)
                if isinstance(llamacpp, str):
                    result["notes"].append(llamacpp)
                else:
                    result["arms"]["llamacpp"] = llamacpp
            if "engines" in selected:
                result["arms"]["engines"] = run_arm(
                    "serve_engines",
                    {
                        "name": "engines",
                        "config": config,
                        "threads": base_threads,
                        "requests": sizes["requests"],
                        "concurrency": [c_ for c_ in sizes["concurrency"] if c_ > 1],
                        "max_new_tokens": max_new,
                        "arms": ["loop", "batched", "continuous", "continuous-stream"],
                        "make_adapters": False,
                    },
                    2 * arm_timeout,
                    work / "arms",
                )
        else:
            baseline, served = _bench_endpoint(
                cfg, endpoint.rstrip("/"), sizes, max_new, base_threads, work, result["notes"]
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["arms"].update(baseline=baseline, serve=served)
    _fill_serve_tables(result, baseline, served, quick)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _llamacpp_arm(
    c: TinyQAConfig,
    config: dict[str, Any],
    threads: int,
    sizes: dict[str, Any],
    max_new: int,
    work: Path,
    timeout_s: float,
) -> dict[str, Any] | str:
    """The llama.cpp arm's result, or a note saying why it did not run."""
    import importlib.util

    if c.model.name != "smollm2":
        return f"llama.cpp arm: only for model.name=smollm2 (its GGUF), not {c.model.name!r}"
    if importlib.util.find_spec("llama_cpp") is None:
        return (
            "llama.cpp arm skipped: llama-cpp-python is not installed (`pip install "
            "'tinyqa[llamacpp]'`, which compiles llama.cpp)"
        )
    from tinyqa.smollm2 import obtain_gguf

    gguf = obtain_gguf(Path(tempfile.mkdtemp(prefix="gguf-", dir=work)))
    spec = {
        "name": "llamacpp",
        "config": config,
        "gguf": str(gguf),
        "threads": threads,
        "requests": sizes["requests"],
        "max_new_tokens": max_new,
    }
    return run_arm("serve_llamacpp", spec, timeout_s, work / "arms")


def _bench_endpoint(
    cfg: TinyQAConfig,
    url: str,
    sizes: dict[str, Any],
    max_new: int,
    base_threads: int,
    work: Path,
    notes: list[str],
):
    """Load a running endpoint; the baseline uses the same adapter from the local adapter root."""
    from tinyqa.adapters import list_adapters
    from tinyqa.secrets import resolve_api_key

    api_key = resolve_api_key(cfg.serve.api_key)
    adapters = list_endpoint_adapters(url, api_key)
    if not adapters:
        notes.append("the endpoint lists no adapters: every mode asks the base model")
    sets: dict[str, list[str | None]] = {"1 adapter": [adapters[0] if adapters else None]}
    if len(adapters) > 1:
        sets[f"{min(4, len(adapters))} adapters"] = list(adapters[:4])
    t = time.perf_counter()
    modes = asyncio.run(
        _run_modes(
            url,
            _questions(cfg, sizes["requests"]),
            sets,
            tuple(sizes["concurrency"]),
            max_new,
            api_key,
        )
    )
    served = {
        "url": url,
        "ray_init_seconds": None,
        "deploy_seconds": None,
        "modes": modes,
        "load_seconds": time.perf_counter() - t,
    }
    local = list_adapters(cfg.adapters_dir)
    baseline = None
    if not adapters or adapters[0] in local:
        baseline = run_arm(
            "serve_baseline",
            {
                "name": "baseline",
                "config": cfg.to_dict(),
                "threads": base_threads,
                "requests": sizes["requests"],
                "max_new_tokens": max_new,
                "adapter": adapters[0] if adapters else None,
                "make_adapters": False,
            },
            600.0,
            work / "arms",
        )
    else:
        notes.append(f"baseline skipped: adapter {adapters[0]!r} is not under {cfg.adapters_dir}")
    return baseline, served


def _fill_serve_tables(
    result: dict[str, Any], baseline: dict[str, Any] | None, served: dict[str, Any], quick: bool
) -> None:
    cols = [
        "mode",
        "adapters",
        "clients",
        "requests",
        "errors",
        "p50 s",
        "p95 s",
        "req/s",
        "generated tok/s",
        "TTFT p50 s",
    ]
    rows = []
    if baseline:
        rows.append(
            [
                "in-process generate loop",
                1,
                1,
                baseline["requests"],
                0,
                baseline["latency_p50_s"],
                baseline["latency_p95_s"],
                baseline["requests_per_second"],
                baseline["tokens_per_second"],
                None,
            ]
        )
    llamacpp = result["arms"].get("llamacpp")
    if llamacpp:
        rows.append(
            [f"llama.cpp ({llamacpp['gguf']})", "-", 1, llamacpp["requests"], 0]
            + [llamacpp["latency_p50_s"], llamacpp["latency_p95_s"]]
            + [llamacpp["requests_per_second"], llamacpp["tokens_per_second"]]
            + [llamacpp["ttft_p50_s"]]
        )
    engine = result["settings"].get("engine", "static")
    runs = [(f"Serve /v1/ask ({engine})", served)]
    runs += [
        (f"Serve /v1/ask ({k.split('_', 1)[1]})", v)
        for k, v in result["arms"].items()
        if k.startswith("serve_") and v
    ]
    for label, modes in (result["arms"].get("engines") or {}).items():
        if not isinstance(modes, dict):
            continue
        for arm, by_clients in modes.items():
            for m in by_clients.values():
                rows.append(
                    [f"in-process {arm}", label.split()[0], m["concurrency"], m["requests"]]
                    + [m["errors"], m["latency_p50_s"], m["latency_p95_s"]]
                    + [m["requests_per_second"], m["tokens_per_second"], m.get("ttft_p50_s")]
                )
    for name, run in runs:
        for label, modes in run["modes"].items():
            shown = name.replace("/v1/ask", "chat SSE") if label.endswith("streamed") else name
            for m in modes.values():
                rows.append(
                    [
                        shown,
                        label.split()[0],
                        m["concurrency"],
                        m["requests"],
                        m["errors"],
                        m["latency_p50_s"],
                        m["latency_p95_s"],
                        m["requests_per_second"],
                        m["tokens_per_second"],
                        m.get("ttft_p50_s"),
                    ]
                )
    s = result["settings"]
    result["table"] = {
        "title": f"Serving {s['model']} ({s['precision']}, {s['max_new_tokens']} new tokens "
        f"max, {s['replicas']} model replica(s), batch ≤{s['max_batch_size']})",
        "columns": cols,
        "rows": rows,
    }

    def rps(m: dict | None) -> float | None:
        return m.get("requests_per_second") if m else None

    def tps(m: dict | None) -> float | None:
        return m.get("tokens_per_second") if m else None

    # Per Serve engine (the configured one, and the other in a full run): the issue-15 measures.
    serve_runs = {engine: served} | {
        k.split("_", 1)[1]: v for k, v in result["arms"].items() if k.startswith("serve_") and v
    }
    batched16 = (
        ((result["arms"].get("engines") or {}).get("1 adapter") or {}).get("batched") or {}
    ).get("c16")
    r: dict[str, float | None] = {}
    targets = []
    for name, run in serve_runs.items():
        one = run["modes"].get("1 adapter", {})
        four = next((v for k, v in run["modes"].items() if k.endswith(" adapters")), {})
        seq, c16 = one.get("c1", {}), one.get("c16") or {}
        errors = sum(m.get("errors", 0) for modes in run["modes"].values() for m in modes.values())
        tag = f" [{name}]"
        r.update(
            {
                "16 clients / sequential req/s" + tag: ratio(rps(c16), rps(seq)),
                "p95 at 16 clients / sequential p50" + tag: ratio(
                    c16.get("latency_p95_s"), seq.get("latency_p50_s")
                ),
                "4 adapters / 1 adapter req/s at 16 clients" + tag: ratio(
                    rps(four.get("c16")), rps(c16)
                ),
                "16 clients Serve / in-process loop req/s" + tag: ratio(rps(c16), rps(baseline)),
                "16 clients Serve / plain batched generate (16) tok/s" + tag: ratio(
                    tps(c16), tps(batched16)
                ),
                "sequential Serve / llama.cpp generated tok/s" + tag: ratio(
                    tps(seq), tps(llamacpp)
                ),
                "failed requests" + tag: errors,
                "deploy (cold start) s" + tag: run.get("deploy_seconds"),
            }
        )
        targets += [
            target(
                "16 clients ≥ 4× the seed's loop (req/s)" + tag,
                4.0,
                r["16 clients Serve / in-process loop req/s" + tag],
            ),
            target(
                "16 clients ≥ 0.8× plain batched generate (tok/s)" + tag,
                0.8,
                r["16 clients Serve / plain batched generate (16) tok/s" + tag],
            ),
            target(
                "p95 at 16 clients ≤ 3× sequential p50" + tag,
                3.0,
                r["p95 at 16 clients / sequential p50" + tag],
                higher_is_better=False,
            ),
            target(
                "4 mixed adapters cost ≤ 25 % (req/s ratio ≥ 0.75)" + tag,
                0.75,
                r["4 adapters / 1 adapter req/s at 16 clients" + tag],
            ),
            target(
                "one stream ≥ 0.5× llama.cpp's tok/s" + tag,
                0.5,
                r["sequential Serve / llama.cpp generated tok/s" + tag],
            ),
            target("no request fails" + tag, 0, errors, higher_is_better=False),
        ]
    r["in-process loop / llama.cpp generated tok/s"] = ratio(tps(baseline), tps(llamacpp))
    result["ratios"] = r
    result["targets"] = targets
    result["notes"] += [
        "Closed loop: each client sends its next request when its answer is back; every mode "
        "sends the same questions. Latency is the client's (HTTP round trip).",
        "Adapters are fresh (untrained) LoRA weights: the same compute per token as trained ones; "
        "answers run until end-of-sequence or the token limit.",
        "The in-process loop (the seed's way) runs one question at a time through QAEngine, with "
        "as many threads as a replica gets.",
    ]
    if quick:
        result["notes"].append("quick run: 16-client figures not measured")


# ----------------------------------------------------------------------------- engines, no Serve
def measure_engines(spec: dict[str, Any]) -> dict[str, Any]:
    """The generation engines in one process, without Serve or HTTP (spec: config, threads,
    requests, concurrency, max_new_tokens, arms, adapter_sets, make_adapters).

    Arms: ``loop`` (the seed's way: one question at a time), ``batched`` (plain batched
    ``generate``: the questions in chunks of ``clients``, each chunk generated to its end: the
    ceiling of static batching), ``continuous`` and ``continuous-stream`` (closed-loop client
    threads against :class:`~tinyqa.engine.ContinuousEngine`, non-streamed / streamed).
    """
    import threading

    import torch

    from tinyqa.engine import ContinuousEngine
    from tinyqa.inference import GenerationRequest

    cfg, qa, load_seconds = _load_qa_engine(spec, min_adapters=len(ADAPTER_IDS))
    n_new = int(spec["max_new_tokens"])
    questions = _questions(cfg, int(spec["requests"]))
    sets: dict[str, list[str | None]] = {
        k: v
        for k, v in {"1 adapter": [ADAPTER_IDS[0]], "4 adapters": list(ADAPTER_IDS)}.items()
        if k in spec.get("adapter_sets", ("1 adapter", "4 adapters"))
    }

    def req(i: int, adapters: list[str | None]) -> GenerationRequest:
        q = [{"role": "user", "content": questions[i]}]
        return GenerationRequest(q, adapters[i % len(adapters)], n_new)

    def summary(lat: list[float], ttft: list[float], tokens: int, wall: float, c: int) -> dict:
        return {
            "concurrency": c,
            "requests": len(questions),
            "ok": len(lat),
            "errors": len(questions) - len(lat),
            "wall_seconds": wall,
            "latency_p50_s": percentile(lat, 50),
            "latency_p95_s": percentile(lat, 95),
            "ttft_p50_s": percentile(ttft, 50) if ttft else None,
            "ttft_p95_s": percentile(ttft, 95) if ttft else None,
            "requests_per_second": len(lat) / wall,
            "completion_tokens": tokens,
            "tokens_per_second": tokens / wall,
        }

    def run_loop(adapters: list[str | None], c: int) -> dict:
        lat, tokens, started = [], 0, time.perf_counter()
        for i in range(len(questions)):
            t0 = time.perf_counter()
            tokens += qa.generate([req(i, adapters)])[0].completion_tokens
            lat.append(time.perf_counter() - t0)
        return summary(lat, [], tokens, time.perf_counter() - started, 1)

    def run_batched(adapters: list[str | None], c: int) -> dict:
        lat, tokens, started = [], 0, time.perf_counter()
        for k in range(0, len(questions), c):
            t0 = time.perf_counter()
            out = qa.generate([req(i, adapters) for i in range(k, min(k + c, len(questions)))])
            lat += [time.perf_counter() - t0] * len(out)  # every answer waits for its chunk
            tokens += sum(r.completion_tokens for r in out)
        return summary(lat, [], tokens, time.perf_counter() - started, c)

    def run_continuous(adapters: list[str | None], c: int, stream: bool) -> dict:
        engine = ContinuousEngine(qa, max_batch=max(c, 1))
        pending = list(range(len(questions)))
        lock = threading.Lock()
        lat: list[float] = []
        ttft: list[float] = []
        tokens = [0]

        def client() -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    i = pending.pop(0)
                t0 = time.perf_counter()
                first = None
                for event in engine.submit(req(i, adapters), stream=stream).events(timeout=600):
                    if first is None:
                        first = time.perf_counter() - t0
                    if not isinstance(event, str):
                        with lock:
                            lat.append(time.perf_counter() - t0)
                            ttft.append(first if stream else event.extra["ttft_s"])
                            tokens[0] += event.completion_tokens

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(c)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - started
        engine.close()
        return summary(lat, ttft, tokens[0], wall, c)

    runners = {
        "loop": run_loop,
        "batched": run_batched,
        "continuous": lambda a, c: run_continuous(a, c, False),
        "continuous-stream": lambda a, c: run_continuous(a, c, True),
    }
    out: dict[str, Any] = {"load_seconds": load_seconds, "threads": torch.get_num_threads()}
    for label, adapters in sets.items():
        for r in adapters:  # warm-up: adapters loaded, first-call costs paid
            qa.generate([GenerationRequest([{"role": "user", "content": "hi"}], r, 2)])
        for arm in spec["arms"]:
            for c in [1] if arm == "loop" else spec["concurrency"]:
                m = runners[arm](adapters, c)
                out.setdefault(label, {}).setdefault(arm, {})[f"c{c}"] = m
                logger.info(
                    "engines %s %s c%d: %.2f req/s, %.1f tok/s, p50 %.2f s, p95 %.2f s",
                    label,
                    arm,
                    c,
                    m["requests_per_second"],
                    m["tokens_per_second"],
                    m["latency_p50_s"] or 0,
                    m["latency_p95_s"] or 0,
                )
    return out
