"""Hostile HTTP input against a real Serve deployment of the tiny model (issue 12).

One private Ray cluster and one app for the module: the contract is fuzzed from the OpenAPI schema
the app serves (schemathesis, positive and negative cases), then hand-written cases cover what a
schema cannot express (bytes that are not UTF-8, lone surrogates, deep JSON, huge numbers, chunked
bodies over the limit), then bad and good requests are sent concurrently. Every answer must be
2xx, 4xx, 503 or 504 with the JSON error body, never another 5xx, good requests must keep
answering, and no model replica may be restarted.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from test_serve import QUESTIONS, storage  # noqa: F401  (the module's adapters fixture)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# Small limits keep every generated answer short (the fuzzer sends hundreds of requests).
LIMITS = [
    "serve.max_question_chars=2000",
    "serve.max_prompt_tokens=64",
    "serve.max_new_tokens=4",
    "serve.max_new_tokens_cap=8",
    "serve.max_messages=8",
    "serve.request_timeout_s=60",
]
# Examples per operation and mode; 4 operations x 2 modes. A minute or two on 2 shared cores.
MAX_EXAMPLES = 40
ALLOWED = {503, 504}  # besides 2xx and 4xx

_seen: Counter = Counter()  # (path, status) of every fuzzed request
_server_errors: list[str] = []  # one line per answer outside the contract


@pytest.fixture(scope="module")
def port(get_free_port) -> int:
    return get_free_port()


@pytest.fixture(scope="module")
def cluster(port):
    import ray
    from ray import serve

    # A private test cluster on loopback (tests/conftest.py turns Ray token auth off). Ray gives
    # its raylet a fixed 30 s to register, which a loaded shared machine can miss: try again.
    for attempt in range(5):
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 4:
                raise
            time.sleep(10)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def app_url(cluster, storage, port) -> str:  # noqa: F811
    from serving.deploy import deploy
    from tinyqa.config import load_config

    cfg = load_config(
        REPO / "jobs/configs/tiny-cpu.yaml",
        [
            f"storage_path={storage}",
            "experiment=exp",
            f"serve.port={port}",
            "serve.num_cpus=0.5",
            "serve.min_replicas=1",
            "serve.max_replicas=1",
            *LIMITS,
        ],
    )
    return deploy(cfg)


@pytest.fixture(scope="module")
def client(app_url):
    with httpx.Client(base_url=app_url, timeout=60.0) as c:
        yield c


def _model_replicas() -> set[str]:
    """Names of the live QAModel replica actors (a restarted replica gets a new name)."""
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in names if "QAModel" in a["name"]}


@pytest.fixture(scope="module")
def replicas_at_start(client) -> set[str]:
    names = _model_replicas()
    assert names, "no QAModel replica found"
    return names


def _good(client: httpx.Client, question: str = QUESTIONS[0]) -> dict:
    r = client.post("/v1/ask", json={"question": question})
    assert r.status_code == 200, r.text
    return r.json()


def _problem(response: httpx.Response) -> str | None:
    """Why an answer breaks the contract, or None."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    if status >= 500 and status not in ALLOWED:
        return f"HTTP {status}"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status} without the JSON error body"
    if set(error) != {"message", "type", "code"} or not error["message"]:
        return f"HTTP {status} with a malformed error body"
    return None


# ----------------------------------------------------------------------------------------------
# fuzzing from the served OpenAPI schema
# ----------------------------------------------------------------------------------------------
def _fuzz(schema, mode: GenerationMode) -> None:
    """Send ``MAX_EXAMPLES`` generated requests per operation; record answers, raise nothing."""
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,  # the same requests on every run, so runs compare
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def send(case) -> None:
            response = case.call(timeout=60)
            _seen[(case.operation.path, response.status_code)] += 1
            problem = _problem(response)
            if problem is not None:
                # Recorded, not raised: a run lists every failure instead of shrinking the first.
                body = case.body[:200] if isinstance(case.body, bytes) else case.body
                _server_errors.append(
                    f"{case.method} {case.operation.path} {problem}: {response.text[:200]!r} "
                    f"(body {str(body)[:300]})"
                )

        try:
            send()
        except Unsatisfiable:
            continue  # no request can break this operation's schema (GET without parameters)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_get_contract_answers(app_url, replicas_at_start, mode):
    """Requests generated from the served OpenAPI schema: valid ones (positive) and ones that
    break it (negative: wrong types, missing fields, bodies that are not objects...)."""
    schema = schemathesis.openapi.from_url(f"{app_url}/openapi.json")
    _fuzz(schema, mode)


def test_fuzzing_found_no_server_errors(client, replicas_at_start):
    total = sum(_seen.values())
    by_status = Counter()
    for (_, status), n in _seen.items():
        by_status[status] += n
    print(f"\nschemathesis sent {total} requests; statuses {dict(sorted(by_status.items()))}")
    for line in _server_errors:
        print("  ", line)
    assert total >= 2 * 4 * 10, _seen  # the fuzzer really ran
    assert not _server_errors, "\n".join(_server_errors[:20])
    _good(client)
    assert _model_replicas() == replicas_at_start


# ----------------------------------------------------------------------------------------------
# what a schema cannot express
# ----------------------------------------------------------------------------------------------
_DEEP = 50_000  # 100 kB: under the body limit, far past the parser's recursion limit
HOSTILE = [
    ("not UTF-8", b'{"question": "\xff\xfe caf\xe9"}', 400, "invalid_json"),
    ("lone surrogate", b'{"question": "why \\ud800?"}', 400, "invalid_json"),
    ("surrogate key", b'{"question": "q", "\\udfff": 1}', 400, "invalid_json"),
    ("deep array", b"[" * _DEEP + b"]" * _DEEP, 400, "invalid_json"),
    ("deep field", b'{"question": "q", "user": ' + b"[" * _DEEP + b"]" * _DEEP + b"}", 400, None),
    ("deep object", b'{"a":' * 5_000 + b"1" + b"}" * 5_000, 400, "invalid_json"),
    ("seed 2**70", b'{"question": "q", "seed": 1180591620717411303424}', 400, "invalid_field"),
    ("seed -2**70", b'{"question": "q", "seed": -1180591620717411303424}', 400, "invalid_field"),
    ("tokens 2**70", b'{"question": "q", "max_new_tokens": 1180591620717411303424}', 400, None),
    ("temperature 1e400", b'{"question": "q", "temperature": 1e400}', 400, "invalid_field"),
    ("top_p -1e400", b'{"question": "q", "top_p": -1e400}', 400, "invalid_field"),
    ("5000 digits", b'{"question": "q", "seed": ' + b"9" * 5000 + b"}", 400, "invalid_json"),
    ("NaN", b'{"question": "q", "temperature": NaN}', 400, "invalid_json"),
]


@pytest.mark.parametrize(("what", "body", "status", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_json_4xx(client, what, body, status, code):
    for path in ("/v1/ask", "/v1/chat/completions"):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert _problem(r) is None, (what, path, r.status_code, r.text[:300])
        assert r.status_code == status, (what, path, r.text[:300])
        if code is not None and path == "/v1/ask":
            assert r.json()["error"]["code"] == code, r.text
    _good(client)


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-9])
def test_tiny_temperatures_answer_like_greedy(client, temperature):
    greedy = client.post("/v1/ask", json={"question": QUESTIONS[1], "max_new_tokens": 8})
    tiny = client.post(
        "/v1/ask",
        json={"question": QUESTIONS[1], "max_new_tokens": 8, "temperature": temperature},
    )
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["answer"] == greedy.json()["answer"]


def _chunked_upload(url: str, path: str, total_bytes: int) -> tuple[int, bytes, int]:
    """POST a chunked body of ``total_bytes`` without Content-Length over a raw socket, reading
    the answer while still sending; (status, body, bytes sent before the answer came)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode())
    sent = [0]
    answered = threading.Event()

    def send() -> None:
        piece = b'{"question": "' + b"z" * (64 * 1024)
        try:
            while sent[0] < total_bytes and not answered.is_set():
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sent[0] += len(piece)
                piece = b"z" * (64 * 1024)
            if not answered.is_set():
                sock.sendall(b'1\r\n"\r\n1\r\n}\r\n0\r\n\r\n')
        except OSError:
            pass  # the server answered and closed: what we want

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data or not _complete(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        answered.set()
        at_answer = sent[0]
        sock.close()
        sender.join(10)
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, body, at_answer


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return body.endswith(b"0\r\n\r\n")


def test_chunked_body_over_the_limit_is_cut_off_while_reading(client, app_url):
    from serving.api import max_body_bytes
    from tinyqa.config import build_config

    serve = {"max_messages": 8, "max_question_chars": 2000}
    limit = max_body_bytes(build_config({"serve": serve}).serve)
    total = 1024 * 1024 * 1024
    started = time.perf_counter()
    status, body, sent = _chunked_upload(app_url, "/v1/ask", total)
    elapsed = time.perf_counter() - started
    assert status == 413, body[:300]
    assert _dechunk(body)["error"]["code"] == "body_too_large"
    # Answered long before the upload could have ended: the handler stopped at the limit. Serve
    # itself keeps receiving until the connection closes (the replica fetches the request's
    # messages eagerly), so what the client got out before the 413 reached it varies with the
    # machine's load: 42 MB in 83 ms once on a loaded 2-core CI machine, hence the 1 GiB upload.
    assert sent < total // 2, (sent, limit, elapsed)
    _good(client)


def _dechunk(body: bytes) -> dict:
    if body.lstrip().startswith(b"{"):
        return json.loads(body)
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return json.loads(out)


# ----------------------------------------------------------------------------------------------
# one bad request never hurts another
# ----------------------------------------------------------------------------------------------
# (body, status): a temperature of 1e-40 used to fail its whole batch; now it is answered greedily.
BAD_BODIES = [
    ({"question": QUESTIONS[2], "seed": 2**70, "temperature": 0.7}, 400),
    ({"question": QUESTIONS[2], "temperature": 1e-40, "seed": 3}, 200),
    ({"question": QUESTIONS[2], "seed": -(2**64), "temperature": 1.0}, 400),
    ({"question": "why \ud800"}, 400),
]


def test_bad_requests_never_fail_good_ones(client, replicas_at_start):
    """24 concurrent requests, every third one hostile: every good one answers 200 (the issue's
    probe: 1 of 16 did), every bad one gets its own 4xx, no replica restarts."""
    good = [
        {"question": QUESTIONS[i % 4], "temperature": 0.8, "seed": i, "max_new_tokens": 8}
        for i in range(16)
    ]
    bad = [BAD_BODIES[i % len(BAD_BODIES)] for i in range(8)]
    mixed = []
    for i in range(24):
        mixed.append(("bad", bad.pop()) if i % 3 == 2 else ("good", good.pop()))

    def send(item):
        kind, body = item
        body, _ = body if kind == "bad" else (body, 200)
        raw = json.dumps(body).encode()  # json.dumps escapes the surrogate as \\ud800
        return kind, client.post(
            "/v1/ask", content=raw, headers={"content-type": "application/json"}
        )

    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(send, mixed))
    goods = [r for kind, r in answers if kind == "good"]
    bads = [r for kind, r in answers if kind == "bad"]
    expected = [item[1] for kind, item in mixed if kind == "bad"]
    assert [r.status_code for r in goods] == [200] * 16, [r.text[:200] for r in goods]
    assert [r.status_code for r in bads] == expected, [r.text[:200] for r in bads]
    assert all(_problem(r) is None for r in bads)
    # Health checks ran meanwhile (Serve checks every 10 s): no replica was replaced.
    time.sleep(1)
    assert _model_replicas() == replicas_at_start
    _good(client)


# ----------------------------------------------------------------------------------------------
# the API key is a secret: never stored, logged or bound into a deployment
# ----------------------------------------------------------------------------------------------
def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue  # a socket or a file removed meanwhile
    return hits


def test_the_api_key_is_never_written_anywhere(cluster, port, tmp_path, adapter_helpers):
    """A real Ray Train run and a deploy with ``serve.api_key`` set in the config: the key
    works, yet no file under the storage path, no file of the Ray session (logs included) and
    nothing Serve was given holds it."""
    import secrets as pysecrets

    import ray
    from ray import cloudpickle, serve

    from serving.app import application, resolved
    from serving.deploy import deploy
    from tinyqa.config import load_config
    from tinyqa.data import bundled_dataset_path
    from tinyqa.training import run_training

    key = "tq-" + pysecrets.token_urlsafe(24)
    runs = tmp_path / "runs"
    subset = adapter_helpers.write_subset(bundled_dataset_path(), tmp_path / "subset.json", 24)
    cfg = load_config(
        REPO / "jobs/configs/tiny-cpu.yaml",
        [
            f"storage_path={runs}",
            "experiment=keyed",
            f"data.path={subset}",
            f"serve.api_key={key}",
            "train.num_workers=1",
            "train.max_steps=4",
            "train.eval_steps=2",
            "train.save_steps=2",
            f"serve.port={port}",
            "serve.app_name=tinyqa-keyed",
            "serve.route_prefix=/keyed",
            "serve.num_cpus=0.5",
            "serve.max_replicas=1",
            *LIMITS,
        ],
    )
    assert key not in repr(cfg)
    trained = run_training(cfg)
    assert trained.manifest["config"]["serve"].get("api_key") is None
    url = deploy(cfg)
    try:
        ok = {"authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, timeout=60.0) as c:
            assert c.post("/v1/ask", json={"question": "q"}).status_code == 401
            assert c.post("/v1/ask", json={"question": "q"}, headers=ok).status_code == 200
            # /healthz: liveness for anyone, what is served only with the key.
            assert c.get("/healthz").json() == {"status": "ok"}
            assert c.get("/healthz", headers={"authorization": "Bearer no"}).json() == {
                "status": "ok"
            }
            details = c.get("/healthz", headers=ok).json()
            assert (details["base_model"], details["default_adapter"]) == ("tiny", "keyed")
            assert details["device"] == "cpu"
        needle = key.encode()
        assert _files_holding(runs, needle) == []
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        assert _files_holding(session, needle) == []
        # What Serve keeps: the application it was given, and the details it reports.
        assert needle not in cloudpickle.dumps(application(resolved(cfg)))
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        assert key not in json.dumps(details, default=str)
        assert key not in str(serve.status())
    finally:
        serve.delete("tinyqa-keyed")
