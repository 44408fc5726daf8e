"""The Serve endpoint end to end: a real local Ray, real HTTP, two tiny adapters trained in-process.

One Ray cluster and one main app per module (cold start dominates); a second, small app with an
API key and a one-slot queue covers auth and back-pressure.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PORT = 8123
URL = f"http://127.0.0.1:{PORT}"
KEY = "s3cret-test-key"
QUESTIONS = [
    "How do I read a file line by line?",
    "What does os.path.join do?",
    "How can I sort a list of dicts by a key?",
    "What is json.loads used for?",
]
# The engine under test: the default, or the other one with TINYQA_TEST_SERVE_ENGINE=static.
ENGINE = os.environ.get("TINYQA_TEST_SERVE_ENGINE", "continuous")
LIMITS = [
    "serve.max_question_chars=2000",
    "serve.max_prompt_tokens=64",
    "serve.max_new_tokens=16",
    "serve.max_new_tokens_cap=400",
    "serve.max_messages=8",
]


@pytest.fixture(scope="module")
def storage(tmp_path_factory, adapter_helpers) -> Path:
    """Two distinct adapters (alpha, beta.v2) on the tiny base and a best.json naming alpha."""
    from tinyqa.config import load_config
    from tinyqa.data import bundled_dataset_path

    helper = adapter_helpers
    root = tmp_path_factory.mktemp("serve")
    subset = helper.write_subset(bundled_dataset_path(), root / "subset.json", 32)
    for adapter_id, seed, lr in (("alpha", 1, 3.0e-3), ("beta.v2", 2, 1.0e-2)):
        cfg = load_config(
            REPO / "jobs/configs/tiny-cpu.yaml",
            [
                f"storage_path={root}",
                "experiment=exp",
                f"train.adapter_id={adapter_id}",
                f"seed={seed}",
                f"data.path={subset}",
            ],
        )
        helper.train_tiny_adapter(cfg, steps=10, lr=lr)
    best = {"adapter_id": "alpha", "metric": "eval_loss", "value": 1.0, "trial": "t0"}
    (root / "exp" / "best.json").write_text(json.dumps(best))
    return root


def _config(storage: Path, *overrides: str):
    from tinyqa.config import load_config

    return load_config(
        REPO / "jobs/configs/tiny-cpu.yaml",
        [
            f"storage_path={storage}",
            "experiment=exp",
            f"serve.port={PORT}",
            "serve.num_cpus=0.5",
            "serve.min_replicas=1",
            "serve.max_replicas=1",
            f"serve.engine={ENGINE}",
            *LIMITS,
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def serve_cluster():
    import ray
    from ray import serve

    # A private test cluster on loopback (tests/conftest.py turns Ray token auth off).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def url(serve_cluster, storage) -> str:
    """The main app (deployed through the same `deploy` that `tinyqa serve` uses)."""
    from serving.deploy import deploy

    return deploy(_config(storage))


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60.0) as c:
        yield c


def _ask(client: httpx.Client, question: str, adapter: str | None = None, **extra) -> dict:
    body = {"question": question, **extra}
    if adapter is not None:
        body["adapter"] = adapter
    r = client.post("/v1/ask", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _still_serving(client: httpx.Client) -> None:
    assert _ask(client, QUESTIONS[0])["adapter"] == "alpha"


# ----------------------------------------------------------------------------------------------
def test_health_and_models(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok"
    assert (health["base_model"], health["default_adapter"]) == ("tiny", "alpha")
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    ids = [m["id"] for m in listing["data"]]
    assert ids == ["tiny", "alpha", "beta.v2"]
    assert [m["id"] for m in listing["data"] if m["default"]] == ["alpha"]


def test_ask_answers_with_the_chosen_model(client):
    default = _ask(client, QUESTIONS[1], max_new_tokens=24)
    assert default["adapter"] == "alpha"  # best.json's adapter
    assert isinstance(default["answer"], str)
    assert default["usage"]["prompt_tokens"] > 0
    assert 0 <= default["usage"]["completion_tokens"] <= 24
    assert _ask(client, QUESTIONS[1], "alpha", max_new_tokens=24)["answer"] == default["answer"]
    assert _ask(client, QUESTIONS[1], "tiny")["adapter"] == "tiny"
    # Three models, not one model under three names.
    per_model = {
        m: tuple(_ask(client, q, m, max_new_tokens=24)["answer"] for q in QUESTIONS)
        for m in ("alpha", "beta.v2", "tiny")
    }
    assert len(set(per_model.values())) == 3, per_model


def test_chat_completion_multi_turn(client):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": "Use a for loop over the file object."},
        {"role": "user", "content": QUESTIONS[3]},
    ]
    r = client.post(
        "/v1/chat/completions", json={"model": "beta.v2", "messages": messages, "max_tokens": 12}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "beta.v2"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["completion_tokens"] <= 12


def _sse_events(text: str) -> list[str]:
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e.removeprefix("data: ") for e in events]


@pytest.mark.parametrize("model", ["alpha", "tiny"])
def test_streaming_is_well_formed_and_matches(client, model):
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    plain = client.post(
        "/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 24}
    )
    expected = plain.json()["choices"][0]["message"]["content"]
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = _sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content.strip() == expected
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_openai_client(url, client):
    from openai import OpenAI

    oai = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60.0)
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    expected = _ask(client, QUESTIONS[1], "beta.v2", max_new_tokens=20)["answer"]
    reply = oai.chat.completions.create(model="beta.v2", messages=messages, max_tokens=20)
    assert reply.choices[0].message.content == expected
    stream = oai.chat.completions.create(
        model="beta.v2", messages=messages, max_tokens=20, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed.strip() == expected
    assert {"tiny", "alpha", "beta.v2"} <= {m.id for m in oai.models.list()}


# ----------------------------------------------------------------------------------------------
# bad input: (method, path, body, content type, status, code)
_LONG_QUESTION = " ".join(f"word{i}" for i in range(150))  # < 2000 chars, > 64 tokens
BAD_REQUESTS = [
    ("POST", "/v1/ask", b'{"question": "unterminated', "application/json", 400, "invalid_json"),
    ("POST", "/v1/ask", b"[1, 2]", "application/json", 400, "invalid_json"),
    ("POST", "/v1/ask", b'{"question": "q"}', "text/plain", 400, "invalid_content_type"),
    ("POST", "/v1/ask", {}, None, 400, "missing_field"),
    ("POST", "/v1/ask", {"question": ""}, None, 400, "invalid_field"),
    ("POST", "/v1/ask", {"question": 123}, None, 400, "invalid_field"),
    ("POST", "/v1/ask", {"question": "q", "max_new_tokens": "8"}, None, 400, "invalid_field"),
    ("POST", "/v1/ask", {"question": "q", "colour": "red"}, None, 400, "unknown_field"),
    ("POST", "/v1/ask", {"question": "q", "max_new_tokens": 0}, None, 400, "invalid_field"),
    ("POST", "/v1/ask", {"question": "q", "max_new_tokens": -5}, None, 400, "invalid_field"),
    ("POST", "/v1/ask", {"question": "q", "max_new_tokens": 401}, None, 400, "invalid_field"),
    ("POST", "/v1/ask", {"question": "q", "temperature": -0.5}, None, 400, "invalid_field"),
    ("POST", "/v1/ask", {"question": "q", "top_p": 0}, None, 400, "invalid_field"),
    ("POST", "/v1/ask", {"question": "x" * 2001}, None, 413, "prompt_too_long"),
    ("POST", "/v1/ask", {"question": _LONG_QUESTION}, None, 413, "prompt_too_long"),
    (
        "POST",
        "/v1/ask",
        b'{"question": "' + b"y" * 300_000 + b'"}',
        "application/json",
        413,
        "body_too_large",
    ),
    ("POST", "/v1/ask", {"question": "q", "adapter": "nope"}, None, 404, "model_not_found"),
    ("POST", "/v1/ask", {"question": "q", "adapter": "../exp"}, None, 400, "invalid_model"),
    ("POST", "/v1/ask", {"question": "q", "adapter": "/etc"}, None, 400, "invalid_model"),
    ("POST", "/v1/ask", {"question": "q", "adapter": "a/b"}, None, 400, "invalid_model"),
    ("POST", "/v1/ask", {"question": "q", "adapter": ""}, None, 400, "invalid_model"),
    ("POST", "/v1/ask", {"question": "q", "adapter": "a" * 200}, None, 400, "invalid_model"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "../../etc/passwd", "messages": [{"role": "user", "content": "q"}]},
        None,
        400,
        "invalid_model",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "ghost", "messages": [{"role": "user", "content": "q"}], "stream": True},
        None,
        404,
        "model_not_found",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "alpha", "messages": []},
        None,
        400,
        "invalid_field",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "alpha", "messages": [{"role": "robot", "content": "q"}]},
        None,
        400,
        "invalid_field",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "alpha", "messages": [{"role": "user", "content": "q"}], "n": 3},
        None,
        400,
        "invalid_field",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "alpha", "messages": [{"role": "user", "content": "q"}] * 9},
        None,
        413,
        "too_many_messages",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "alpha",
            "messages": [{"role": "user", "content": _LONG_QUESTION}],
            "stream": True,
        },
        None,
        413,
        "prompt_too_long",
    ),
    ("GET", "/v1/nowhere", None, None, 404, "route_not_found"),
    ("GET", "/v1/ask", None, None, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "status", "code"),
    BAD_REQUESTS,
    ids=[f"{i:02d}-{r[5]}" for i, r in enumerate(BAD_REQUESTS)],
)
def test_bad_input_gets_a_json_error(client, method, path, body, content_type, status, code):
    if isinstance(body, dict):
        r = client.request(method, path, json=body)
    else:
        r = client.request(method, path, content=body, headers={"content-type": content_type or ""})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code and error["message"]
    _still_serving(client)


# ----------------------------------------------------------------------------------------------
def test_concurrent_mixed_adapters_match_sequential(client):
    """16 concurrent requests over two adapters and the base: all 200, each answer equal to the
    same request sent alone (greedy decoding; batching and adapter switching change nothing)."""
    models = ["alpha", "beta.v2", "tiny"]
    requests = [(QUESTIONS[i % len(QUESTIONS)], models[i % 3], 8 + i) for i in range(16)]
    alone = [_ask(client, q, m, max_new_tokens=n) for q, m, n in requests]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda r: _ask(client, r[0], r[1], max_new_tokens=r[2]), requests))
    for (q, m, _), a, b in zip(requests, alone, together, strict=True):
        assert b["adapter"] == m
        assert b["answer"] == a["answer"], (q, m)
        assert b["usage"] == a["usage"]


# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(serve_cluster, storage):
    """A second app: API key on, one request running and one queued at most."""
    from serving.deploy import deploy

    cfg = _config(
        storage,
        "serve.app_name=tinyqa-guarded",
        "serve.route_prefix=/guarded",
        f"serve.api_key={KEY}",
        "serve.max_ongoing_requests=1",
        "serve.max_queued_requests=1",
        "serve.max_batch_size=1",
    )
    guarded_url = deploy(cfg)
    assert guarded_url == f"{URL}/guarded"
    with httpx.Client(base_url=guarded_url, timeout=60.0) as c:
        yield cfg, c


def test_auth(guarded, url):
    from openai import AuthenticationError, OpenAI

    _, c = guarded
    ok = {"authorization": f"Bearer {KEY}"}
    assert c.get("/healthz").status_code == 200  # open for load balancers
    for headers, code in (
        ({}, "missing_api_key"),
        ({"authorization": "Bearer nope"}, "invalid_api_key"),
        ({"authorization": f"Basic {KEY}"}, "missing_api_key"),
    ):
        for method, path, body in (
            ("GET", "/v1/models", None),
            ("POST", "/v1/ask", {"question": "q"}),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}]}),
        ):
            r = c.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == code
            assert r.headers["www-authenticate"] == "Bearer"
    assert c.post("/v1/ask", json={"question": QUESTIONS[0]}, headers=ok).status_code == 200
    oai = OpenAI(base_url=f"{url}/guarded/v1", api_key=KEY, max_retries=0, timeout=60.0)
    assert oai.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "q"}], max_tokens=4
    ).choices
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{url}/guarded/v1", api_key="wrong", max_retries=0).models.list()


def test_full_queue_answers_503_fast_and_recovers(guarded):
    _, c = guarded
    ok = {"authorization": f"Bearer {KEY}"}
    # Sampling at temperature 2 rarely hits EOS: each answer runs to its 400-token cap.
    slow = {"question": QUESTIONS[0], "temperature": 2.0, "max_new_tokens": 400, "seed": 1}

    def send(_):
        return c.post("/v1/ask", json=slow, headers=ok)

    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(send, range(10)))
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    rejected = [r for r in answers if r.status_code == 503]
    for r in rejected:
        assert r.json()["error"]["code"] == "overloaded"
        assert r.headers["retry-after"] == "1"
    assert c.post("/v1/ask", json={"question": QUESTIONS[1]}, headers=ok).status_code == 200


def test_shutdown_removes_only_that_app(guarded, client):
    from ray import serve

    from serving.deploy import shutdown

    cfg, _ = guarded
    shutdown(cfg)
    assert "tinyqa-guarded" not in serve.status().applications
    shutdown(cfg)  # already gone: nothing to do
    _still_serving(client)
