"""ContinuousEngine (token-level batching) on the tiny model, no Ray: the same greedy answers as the
static engine (one adapter and mixed), per-request limits and usage, failure isolation,
cancellation, timeouts and streaming from the shared batch."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest

from tinyqa.adapters import serving_plan
from tinyqa.config import load_config
from tinyqa.engine import ContinuousEngine, GenerationRejected
from tinyqa.errors import UnknownAdapter
from tinyqa.inference import GenerationRequest, GenerationResult, QAEngine

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = [
    "How do I read a file?",
    "What does os.path.join do?",
    "What is json.loads for?",
    "How do I sort a list of tuples by the second item?",
]


def _config(root: Path, *overrides: str):
    return load_config(
        REPO / "jobs/configs/tiny-cpu.yaml", [f"storage_path={root}", "experiment=exp", *overrides]
    )


@pytest.fixture(scope="module")
def qa(tmp_path_factory, tiny_dir, adapter_helpers) -> QAEngine:
    """An engine over storage with two briefly trained adapters, 'alpha' and 'beta.v2'; a cap of
    one loaded adapter, so mixed batches must keep in-use adapters past the cap."""
    from tinyqa.data import bundled_dataset_path

    root = tmp_path_factory.mktemp("cengine")
    subset = adapter_helpers.write_subset(bundled_dataset_path(), root / "subset.json", 24)
    for adapter_id, seed, lr in (("alpha", 1, 3.0e-3), ("beta.v2", 2, 1.0e-2)):
        cfg = _config(root, f"train.adapter_id={adapter_id}", f"seed={seed}", f"data.path={subset}")
        adapter_helpers.train_tiny_adapter(cfg, steps=6, lr=lr)
    plan = serving_plan(_config(root))
    return QAEngine(plan.base, plan.adapter_root, max_adapters=1)


@pytest.fixture
def engine(qa):
    eng = ContinuousEngine(qa, max_batch=3)
    yield eng
    eng.close()


def _never_ending(eng: ContinuousEngine, monkeypatch) -> None:
    """Mask end-of-turn in ``eng``'s logits: its answers run to their token cap, so a test that
    needs a request still running is not at the mercy of the sampler."""
    real = eng._forward
    eos = eng.qa.tokenizer.eos_token_id

    def forward(*args, **kwargs):
        logits, kv = real(*args, **kwargs)
        logits[:, eos] = -math.inf
        return logits, kv

    monkeypatch.setattr(eng, "_forward", forward)


def _req(question: str, adapter: str | None, n: int = 16, **kw) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": question}], adapter, n, **kw)


def _same(a: GenerationResult, b: GenerationResult) -> None:
    assert (b.text, b.completion_tokens, b.prompt_tokens, b.finish_reason, b.adapter) == (
        a.text,
        a.completion_tokens,
        a.prompt_tokens,
        a.finish_reason,
        a.adapter,
    )


@pytest.mark.parametrize("mixed", [False, True], ids=["one-adapter", "mixed-adapters"])
def test_greedy_answers_equal_static(qa, engine, mixed):
    models = ("alpha", "beta.v2", None) if mixed else ("alpha",)
    # more requests than slots and different lengths: sequences join and leave mid-batch
    reqs = [
        _req(q, models[i % len(models)], 4 + 5 * i)
        for i, q in enumerate(QUESTIONS + QUESTIONS[::-1])
    ]
    static = [qa.generate([r])[0] for r in reqs]
    continuous = engine.generate(reqs)
    for a, b in zip(static, continuous, strict=True):
        _same(a, b)
    assert engine.max_seen_batch == 3  # really batched, never past its slots
    assert engine.load == (0, 0)
    if mixed:
        # three models answered: mixed-adapter steps did not collapse onto one adapter
        by_model = {
            m: tuple(r.text for r, q in zip(static, reqs, strict=True) if q.adapter == m)
            for m in models
        }
        assert len(set(by_model.values())) == 3


def test_per_request_limits_and_usage(qa, engine):
    reqs = [_req(QUESTIONS[3], "alpha", n) for n in (1, 3, 40)]
    out = engine.generate(reqs)
    prompt = len(qa.prompt_ids(reqs[0].messages))
    assert [r.prompt_tokens for r in out] == [prompt] * 3
    assert out[0].completion_tokens == 1 and out[0].finish_reason in ("length", "stop")
    for r, req in zip(out, reqs, strict=True):
        assert r.completion_tokens <= req.max_new_tokens
        assert r.finish_reason == (
            "length" if r.completion_tokens == req.max_new_tokens else "stop"
        )
    assert out[2].finish_reason == "stop"  # the tiny model ends its answers well before 40
    assert out[0].extra["ttft_s"] >= 0


def test_a_failing_request_does_not_fail_the_others(qa, engine):
    good = [_req(q, "beta.v2", 12) for q in QUESTIONS[:2]]
    expected = [qa.generate([r])[0] for r in good]
    bad = {
        "nan temperature": _req("q", None, temperature=math.nan),
        "negative temperature": _req("q", None, temperature=-1.0),
        "top_p 0": _req("q", None, temperature=1.0, top_p=0.0),
        "huge seed": _req("q", None, temperature=1.0, seed=2**70),
        "unknown adapter": _req("q", "ghost"),
    }
    tickets = [engine.submit(good[0]), *(engine.submit(r) for r in bad.values())]
    tickets.append(engine.submit(good[1]))
    _same(expected[0], tickets[0].result(timeout=60))
    _same(expected[1], tickets[-1].result(timeout=60))
    for name, ticket in zip(bad, tickets[1:-1], strict=True):
        error = UnknownAdapter if name == "unknown adapter" else GenerationRejected
        with pytest.raises(error):
            ticket.result(timeout=60)
    assert engine.load == (0, 0)


def test_seeded_sampling_is_per_request(engine):
    sampled = _req(QUESTIONS[0], "alpha", 20, temperature=1.5, top_p=0.9, seed=7)
    alone = engine.generate([sampled])[0]
    # the same seed in a busy batch, next to other sampled and greedy rows: the same answer
    crowd = [sampled, _req(QUESTIONS[1], None, 20, temperature=1.5, seed=8), _req("x", "alpha")]
    assert engine.generate(crowd)[0].text == alone.text


def test_streaming_yields_the_same_text(qa, engine):
    req = _req(QUESTIONS[1], "beta.v2", 24)
    expected = qa.generate([req])[0]
    # stream while non-streamed requests share the batch
    others = [engine.submit(_req(q, "alpha", 30)) for q in QUESTIONS]
    events = list(engine.stream_events(req))
    final = events[-1]
    assert isinstance(final, GenerationResult)
    pieces = events[:-1]
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces).strip() == expected.text == final.text
    _same(expected, final)
    for t in others:
        assert isinstance(t.result(timeout=60), GenerationResult)


def test_cancel_frees_the_slot(qa, monkeypatch):
    eng = ContinuousEngine(qa, max_batch=1)
    _never_ending(eng, monkeypatch)
    try:
        long = _req(QUESTIONS[0], None, 400, temperature=2.0, seed=3)  # rarely stops early
        ticket = eng.submit(long, stream=True)
        events = ticket.events(timeout=60)
        next(events)  # it is generating
        waiting = eng.submit(_req(QUESTIONS[1], "alpha", 8))  # no slot until the first leaves
        ticket.cancel()
        assert isinstance(waiting.result(timeout=60), GenerationResult)
        assert eng.steps < 390  # the cancelled sequence left; it did not run to 400 tokens
        assert eng.load == (0, 0)
        # a waiting request cancelled before it was admitted never runs
        blocker = eng.submit(_req(QUESTIONS[2], None, 30))
        dropped = eng.submit(_req(QUESTIONS[3], None, 30))
        dropped.cancel()
        blocker.result(timeout=60)
        assert eng.load == (0, 0)
    finally:
        eng.close()


def test_timeout_answers_with_an_error_and_leaves(qa, monkeypatch):
    eng = ContinuousEngine(qa, max_batch=2)
    _never_ending(eng, monkeypatch)
    try:
        slow = eng.submit(_req(QUESTIONS[0], None, 400, temperature=2.0, seed=1), timeout_s=0.3)
        with pytest.raises(TimeoutError):
            slow.result(timeout=60)
        assert isinstance(eng.generate([_req(QUESTIONS[1], None, 8)])[0], GenerationResult)
        assert eng.load == (0, 0)
    finally:
        eng.close()


def test_model_failure_fails_the_batch_and_the_engine_recovers(qa, monkeypatch):
    eng = ContinuousEngine(qa, max_batch=4)
    try:
        _never_ending(eng, monkeypatch)
        real = eng._forward
        broken = threading.Event()

        def flaky(*args, **kwargs):
            if broken.is_set():
                raise RuntimeError("injected kernel failure")
            return real(*args, **kwargs)

        monkeypatch.setattr(eng, "_forward", flaky)
        running = eng.submit(_req(QUESTIONS[0], None, 300, temperature=2.0, seed=5), stream=True)
        next(running.events(timeout=120))  # it is in the batch
        broken.set()
        waiting = eng.submit(_req(QUESTIONS[1], None, 30))
        tickets = [running, waiting]
        for t in tickets:
            with pytest.raises(RuntimeError, match="injected"):
                t.result(timeout=120)
        assert qa.last_error is not None  # the health check sees it
        monkeypatch.undo()
        assert isinstance(eng.generate([_req(QUESTIONS[0], None, 8)])[0], GenerationResult)
        # The result is delivered from inside the scheduler's step; its success is recorded when
        # that step ends, a moment later.
        deadline = time.monotonic() + 10
        while qa.last_error is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert qa.last_error is None
    finally:
        eng.close()
