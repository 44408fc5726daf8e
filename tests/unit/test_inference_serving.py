"""QAEngine behaviour the Serve endpoint relies on (tiny model, no Ray): adapter ids with dots,
LRU switching, batched == alone, streaming with cancel, prompt limits, health checks, and the
choice of what to serve."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tinyqa.adapters import serving_plan
from tinyqa.config import load_config
from tinyqa.errors import ModelError, PromptTooLong, UnknownAdapter
from tinyqa.inference import GenerationRequest, GenerationResult, QAEngine

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = ["How do I read a file?", "What does os.path.join do?", "What is json.loads for?"]


def _config(root: Path, *overrides: str):
    return load_config(
        REPO / "jobs/configs/tiny-cpu.yaml", [f"storage_path={root}", "experiment=exp", *overrides]
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_dir, adapter_helpers) -> Path:
    """Storage with two briefly trained adapters, 'alpha' and 'beta.v2' (a dot, as sweeps name them)."""
    helper = adapter_helpers
    from tinyqa.data import bundled_dataset_path

    root = tmp_path_factory.mktemp("engine")
    subset = helper.write_subset(bundled_dataset_path(), root / "subset.json", 24)
    for adapter_id, seed, lr in (("alpha", 1, 3.0e-3), ("beta.v2", 2, 1.0e-2)):
        cfg = _config(root, f"train.adapter_id={adapter_id}", f"seed={seed}", f"data.path={subset}")
        helper.train_tiny_adapter(cfg, steps=6, lr=lr)
    return root


@pytest.fixture(scope="module")
def engine(adapters) -> QAEngine:
    plan = serving_plan(_config(adapters, "serve.default_adapter=alpha"))
    return QAEngine(plan.base, plan.adapter_root, max_adapters=1)


def _req(question: str, adapter: str | None, n: int = 16, **kw) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": question}], adapter, n, **kw)


def test_dotted_ids_lru_and_batched_equals_alone(engine):
    mixed = [
        _req(q, a, 8 + i)
        for i, (q, a) in enumerate((q, a) for a in ("alpha", "beta.v2", None) for q in QUESTIONS)
    ]
    alone = [engine.generate([r])[0] for r in mixed]  # switches adapters; cap 1 evicts each time
    assert engine.loaded_adapters() in (["alpha"], ["beta.v2"])
    together = engine.generate(mixed)
    for a, b in zip(alone, together, strict=True):
        assert (b.text, b.completion_tokens, b.finish_reason) == (
            a.text,
            a.completion_tokens,
            a.finish_reason,
        )
    by_model = {
        a: tuple(r.text for r, q in zip(alone, mixed, strict=True) if q.adapter == a)
        for a in ("alpha", "beta.v2", None)
    }
    assert len(set(by_model.values())) == 3  # three different models


def test_unknown_and_path_like_adapters(engine):
    with pytest.raises(UnknownAdapter):
        engine.generate([_req("q", "ghost")])
    for bad in ("../exp", "/etc", "a/b", ""):
        with pytest.raises(ModelError, match="invalid"):
            engine.load(bad)


def test_stream_events_match_generate_and_cancel(engine):
    req = _req(QUESTIONS[1], "beta.v2", 24)
    expected = engine.generate([req])[0]
    events = list(engine.stream_events(req))
    final = events[-1]
    assert isinstance(final, GenerationResult)
    assert "".join(e for e in events[:-1]).strip() == expected.text == final.text
    assert (final.completion_tokens, final.finish_reason) == (
        expected.completion_tokens,
        expected.finish_reason,
    )

    cancel = threading.Event()
    long = _req(QUESTIONS[0], None, 400, temperature=2.0, seed=3)  # sampling: rarely stops early
    stream = engine.stream_events(long, cancel=cancel)
    next(stream)
    cancel.set()
    rest = list(stream)
    # Stopped neither by EOS ('stop') nor by the token cap: by the cancel.
    assert (rest[-1].finish_reason, rest[-1].completion_tokens < 400) == ("length", True)
    assert engine._lock.acquire(blocking=False)  # the generation let go of the model
    engine._lock.release()


def test_prompt_limit(engine):
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    n = engine.check_prompt(messages, max_prompt_tokens=512, max_new_tokens=16)
    assert n == len(engine.prompt_ids(messages))
    with pytest.raises(PromptTooLong, match=f"{n} tokens"):
        engine.check_prompt(messages, max_prompt_tokens=n - 1, max_new_tokens=16)
    with pytest.raises(PromptTooLong):  # prompt + answer beyond the model's context
        engine.check_prompt(messages, max_prompt_tokens=10**6, max_new_tokens=engine.context_length)


def test_health_check_fails_when_generation_breaks(adapters, monkeypatch):
    plan = serving_plan(_config(adapters))
    eng = QAEngine(plan.base, plan.adapter_root)
    eng.health_check(probe_after_s=0)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(eng.model, "generate", broken)
    with pytest.raises(RuntimeError):
        eng.generate([_req("q", None)])
    with pytest.raises(ModelError, match="cannot generate|last generation failed"):
        eng.health_check()
    monkeypatch.undo()
    eng.health_check()  # recovered: the probe generates again


def test_serving_plan_precedence(adapters, tmp_path):
    assert serving_plan(_config(adapters)).default_adapter is None  # no best.json, no 'exp'
    assert serving_plan(_config(adapters, "train.adapter_id=beta.v2")).default_adapter == "beta.v2"
    (adapters / "exp" / "best.json").write_text(json.dumps({"adapter_id": "alpha"}))
    try:
        plan = serving_plan(_config(adapters, "train.adapter_id=beta.v2"))
        assert (plan.default_adapter, plan.base_id) == ("alpha", "tiny")
        assert (
            serving_plan(_config(adapters, "serve.default_adapter=beta.v2")).default_adapter
            == "beta.v2"
        )
        with pytest.raises(ModelError, match="ghost"):
            serving_plan(_config(adapters, "serve.default_adapter=ghost"))
    finally:
        (adapters / "exp" / "best.json").unlink()
    empty = serving_plan(_config(tmp_path, "model.name=tiny"))
    assert empty.default_adapter is None and "serving the base model" in empty.reason
    moved = serving_plan(
        _config(
            tmp_path,
            f"serve.adapter_root={adapters / 'exp' / 'adapters'}",
            "serve.default_adapter=alpha",
        )
    )
    assert moved.adapter_root == adapters / "exp" / "adapters"


def test_health_check_passes_while_the_engine_is_busy(engine):
    """A busy engine is alive, even right after a failed call (one bad request's fault): Serve
    must not restart a replica because its lock is held."""
    bad = _req("q", None, temperature=0.7, seed=2**70)  # past torch's seed range
    with pytest.raises(ValueError, match="Overflow"):
        engine.generate([bad])
    assert engine.last_error is not None
    engine._lock.acquire()
    try:
        done = threading.Event()
        threading.Thread(target=lambda: (engine.health_check(), done.set())).start()
        assert done.wait(10), "health_check blocked on the busy engine"
    finally:
        engine._lock.release()
    engine.health_check()  # idle now: the probe generates, and it works
    assert engine.last_error is None


def test_replica_answers_a_failing_request_alone(engine):
    """The replica's batch handler: a request that fails inside generate (a seed past torch's
    range, as before the API bounded it) gets its own error; the others in its batch answer."""
    import asyncio

    from serving.replica import generate_isolated

    good = [_req(q, None, 8, temperature=0.8, seed=i) for i, q in enumerate(QUESTIONS)]
    bad = _req(QUESTIONS[0], None, 8, temperature=0.8, seed=2**70)
    expected = [engine.generate([r])[0] for r in good]
    results = asyncio.run(generate_isolated(engine, [good[0], bad, *good[1:]]))
    assert isinstance(results[1], ValueError)
    answers = [results[0], *results[2:]]
    assert all(isinstance(a, GenerationResult) for a in answers), answers
    assert [a.text for a in answers] == [e.text for e in expected]
