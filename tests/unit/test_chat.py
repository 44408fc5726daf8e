"""`ask` and `chat`, locally on the tiny model and against a stub endpoint speaking the HTTP contract.

The stub implements DESIGN.md's API (``/v1/ask``, ``/v1/chat/completions`` with SSE streaming,
``/v1/models``, JSON errors, Bearer auth, 413) on a free loopback port, so these tests need no
Ray and do not depend on the serving package.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tinyqa.chat import ContextOverflow, EndpointError, ask, iter_sse, run_chat
from tinyqa.config import load_config
from tinyqa.errors import TinyQAError

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "tiny-cpu.yaml"
ADAPTERS = ("tiny", "good")  # what the stub serves: the base id and one adapter


# ----------------------------------------------------------------------------------------------
# the stub endpoint
# ----------------------------------------------------------------------------------------------
class _Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.api_key: str | None = None
        self.max_chars: int | None = None  # 413 above this many message characters

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _reply(messages: list[dict]) -> str:
    """The stub's answer: how many user turns it saw and the last question."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return f"turns={len(users)} last={users[-1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Stub

    def log_message(self, *args):  # keep test output clean
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str) -> None:
        self._json(status, {"error": {"message": message, "type": "invalid_request", "code": code}})

    def _authorized(self) -> bool:
        if (
            self.server.api_key
            and self.headers.get("Authorization") != f"Bearer {self.server.api_key}"
        ):
            self._error(401, "missing or wrong API key", "unauthorized")
            return False
        return True

    def do_GET(self):
        if self.path == "/healthz":
            return self._json(200, {"status": "ok"})
        if not self._authorized():
            return None
        if self.path == "/v1/models":
            return self._json(
                200, {"object": "list", "data": [{"id": a, "object": "model"} for a in ADAPTERS]}
            )
        return self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
        )
        if not self._authorized():
            return None
        model = body.get("adapter") if self.path == "/v1/ask" else body.get("model")
        if model is not None and model not in ADAPTERS:
            return self._error(404, f"unknown adapter {model!r}", "adapter_not_found")
        if self.path == "/v1/ask":
            answer = f"answer to: {body['question']}"
            return self._json(
                200,
                {
                    "answer": answer,
                    "adapter": model or "good",
                    "usage": {"prompt_tokens": 3, "completion_tokens": 4},
                },
            )
        if self.path != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}", "not_found")
        messages = body["messages"]
        if (
            self.server.max_chars
            and sum(len(m["content"]) for m in messages) > self.server.max_chars
        ):
            return self._error(413, "prompt too long", "input_too_long")
        text = _reply(messages)
        if not body.get("stream"):
            return self._json(
                200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
            )
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b": keep-alive\n\n")
        for i, word in enumerate(text.split(" ")):
            piece = word if i == 0 else " " + word
            chunk = {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": piece}}],
            }
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        return None


@pytest.fixture
def stub():
    server = _Stub()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("TINYQA_API_KEY", raising=False)
    return load_config(CONFIG, [f"storage_path={tmp_path / 'runs'}"])


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


def _chat(cfg, lines: list[str], **kwargs) -> str:
    out = io.StringIO()
    assert (
        run_chat(cfg, stdin=io.StringIO("".join(f"{x}\n" for x in lines)), stdout=out, **kwargs)
        == 0
    )
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# ask against an endpoint
# ----------------------------------------------------------------------------------------------
def test_ask_endpoint_follows_the_contract(cfg, stub, monkeypatch):
    assert ask(cfg, "What is json?", endpoint=stub.url + "/") == "answer to: What is json?"
    assert stub.requests[-1]["path"] == "/v1/ask"
    assert stub.requests[-1]["body"] == {"question": "What is json?", "temperature": 0.0}
    assert stub.requests[-1]["auth"] is None

    stub.api_key = "sekret"
    monkeypatch.setenv("TINYQA_API_KEY", "sekret")
    answer = ask(cfg, "Why?", adapter="good", endpoint=stub.url, max_new_tokens=7)
    assert answer == "answer to: Why?"
    assert stub.requests[-1]["body"] == {
        "question": "Why?",
        "temperature": 0.0,
        "adapter": "good",
        "max_new_tokens": 7,
    }
    assert stub.requests[-1]["auth"] == "Bearer sekret"


def test_ask_endpoint_errors_carry_the_server_message(cfg, stub):
    with pytest.raises(EndpointError, match="404: unknown adapter 'other'"):
        ask(cfg, "q", adapter="other", endpoint=stub.url)
    stub.api_key = "sekret"
    with pytest.raises(EndpointError, match="401: missing or wrong API key; pass --api-key"):
        ask(cfg, "q", endpoint=stub.url, api_key="wrong")


def test_ask_endpoint_that_does_not_answer_names_the_url(cfg):
    url = _dead_url()
    with pytest.raises(EndpointError, match=f"endpoint {url}/v1/ask does not answer"):
        ask(cfg, "q", endpoint=url)


def test_ask_rejects_bad_endpoint_urls_adapter_paths_and_empty_questions(cfg, stub):
    with pytest.raises(EndpointError, match="not an http"):
        ask(cfg, "q", endpoint="localhost:8000")
    with pytest.raises(EndpointError, match="not an adapter id"):
        ask(cfg, "q", adapter="/some/folder", endpoint=stub.url)
    with pytest.raises(TinyQAError, match="question is empty"):
        ask(cfg, "  ", endpoint=stub.url)
    assert stub.requests == []


# ----------------------------------------------------------------------------------------------
# chat against an endpoint
# ----------------------------------------------------------------------------------------------
def test_chat_endpoint_streams_keeps_history_and_resets(cfg, stub):
    out = _chat(
        cfg,
        ["first question", "", "second one", "/reset", "third", "/exit", "never sent"],
        endpoint=stub.url,
        adapter="good",
    )
    lines = out.splitlines()
    assert lines[0].startswith("tinyqa chat with good at http://127.0.0.1:")
    assert "assistant> turns=1 last=first question" in lines
    assert "assistant> turns=2 last=second one" in lines
    assert "(history cleared)" in lines
    assert "assistant> turns=1 last=third" in lines
    chats = [r["body"] for r in stub.requests if r["path"] == "/v1/chat/completions"]
    assert len(chats) == 3  # nothing after /exit
    assert all(b["stream"] is True and b["model"] == "good" for b in chats)
    # The second turn carries the first exchange, answer included.
    assert chats[1]["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "turns=1 last=first question"},
        {"role": "user", "content": "second one"},
    ]


def test_chat_endpoint_drops_oldest_turns_to_fit(cfg, stub):
    # Budget of 20 "tokens" ~ 60 characters: two turns of ~40 characters do not fit together.
    cfg = load_config(CONFIG, [f"storage_path={cfg.storage_path}", "eval.chat_context_tokens=20"])
    out = _chat(cfg, ["a" * 30, "b" * 30, "c" * 30], endpoint=stub.url)
    assert "(dropped the oldest 1 turn to stay within the 20-token context)" in out
    chats = [r["body"] for r in stub.requests if r["path"] == "/v1/chat/completions"]
    assert [m["content"] for m in chats[-1]["messages"]] == ["c" * 30]
    assert "model" not in chats[-1]  # no --adapter: the server's default model


def test_chat_endpoint_retries_with_less_history_on_413(cfg, stub):
    stub.max_chars = 150  # the server's limit is stricter than the client's estimate
    out = _chat(cfg, ["x" * 60, "y" * 60, "z" * 200, "ok"], endpoint=stub.url)
    lines = out.splitlines()
    # The second turn (with the first exchange: 60 + 73 + 60 characters) is refused with 413; the
    # client drops the first exchange and retries. A single message over the limit is an error.
    assert lines[1:] == [
        "assistant> turns=1 last=" + "x" * 60,
        "(the endpoint found the conversation too long: dropped the oldest turn)",
        "assistant> turns=1 last=" + "y" * 60,
        "(the endpoint found the conversation too long: dropped the oldest turn)",
        f"error: {stub.url}/v1/chat/completions answered 413: prompt too long",
        "assistant> turns=2 last=ok",
    ]
    sizes = [[len(m["content"]) for m in r["body"]["messages"]] for r in stub.requests]
    assert sizes == [[60], [60, 73, 60], [60], [60, 73, 200], [200], [60, 73, 2]]


def test_chat_endpoint_refuses_a_message_over_the_character_limit(cfg, stub):
    cfg = load_config(CONFIG, [f"storage_path={cfg.storage_path}", "serve.max_question_chars=10"])
    out = _chat(cfg, ["x" * 11, "short"], endpoint=stub.url)
    assert "(that message has 11 characters; the endpoint takes at most 10)" in out
    assert "assistant> turns=1 last=short" in out
    assert len(stub.requests) == 1


def test_chat_endpoint_checks_adapter_and_reachability_before_the_first_turn(cfg, stub):
    with pytest.raises(
        EndpointError, match="does not serve adapter 'other'; it serves: tiny, good"
    ):
        _chat(cfg, ["hi"], endpoint=stub.url, adapter="other")
    url = _dead_url()
    with pytest.raises(EndpointError, match=f"endpoint {url}/v1/models does not answer"):
        _chat(cfg, ["hi"], endpoint=url)
    stub.api_key = "sekret"
    with pytest.raises(EndpointError, match="401"):
        _chat(cfg, ["hi"], endpoint=stub.url)
    assert (
        run_chat(
            cfg, endpoint=stub.url, api_key="sekret", stdin=io.StringIO(""), stdout=io.StringIO()
        )
        == 0
    )


def test_chat_exits_cleanly_on_ctrl_c(cfg, stub):
    class Interrupting(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    out = io.StringIO()
    assert run_chat(cfg, endpoint=stub.url, stdin=Interrupting(), stdout=out) == 0
    assert out.getvalue().startswith("tinyqa chat with")


def test_iter_sse_parses_events():
    lines = [
        ": comment",
        "data: one",
        "",
        "event: x",
        "data:two",
        "data: lines",
        "",
        "data: [DONE]\r",
        "",
    ]
    assert list(iter_sse(iter(lines))) == ["one", "two\nlines", "[DONE]"]
    assert list(iter_sse(iter(["data: tail"]))) == ["tail"]
    assert issubclass(ContextOverflow, EndpointError)


# ----------------------------------------------------------------------------------------------
# locally, on the tiny model
# ----------------------------------------------------------------------------------------------
def test_local_chat_streams_and_trims_history_in_tokens(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.delenv("TINYQA_API_KEY", raising=False)
    # 70 tokens with 16 kept for the answer: a question and answer each ~20 tokens, so the third
    # turn no longer fits beside the first two.
    cfg = load_config(
        CONFIG,
        [
            f"storage_path={tmp_path / 'runs'}",
            "eval.chat_context_tokens=70",
            "serve.max_new_tokens=16",
        ],
    )
    q = "What does `json.dumps` do?"
    out = _chat(cfg, [q, q, q, "/reset", q])
    lines = out.splitlines()
    assert lines[0].startswith("tinyqa chat with base model tiny.")
    answers = [line for line in lines if line.startswith("assistant> ")]
    assert len(answers) == 4 and all(len(a) > len("assistant> ") for a in answers)
    assert any(line.startswith("(dropped the oldest") for line in lines)
    assert "(history cleared)" in lines
    # Greedy and the same fresh history: the answers after /reset and to the first turn agree.
    assert answers[3] == answers[0]

    # The answer ask() gives is the chat's first answer (same prompt, same greedy decoding).
    assert "assistant> " + ask(cfg, q, max_new_tokens=16) == answers[0]


def test_local_chat_refuses_a_message_longer_than_the_context(tmp_path, tiny_dir):
    cfg = load_config(CONFIG, [f"storage_path={tmp_path / 'runs'}", "eval.chat_context_tokens=40"])
    out = _chat(cfg, ["word " * 100])
    assert "(that message is too long for the 40-token context)" in out
    assert "assistant> " not in out


def test_local_ask_with_unknown_adapter(cfg):
    with pytest.raises(TinyQAError, match="unknown adapter 'nope'"):
        ask(cfg, "q", adapter="nope")


# ----------------------------------------------------------------------------------------------
# as a user runs it: the CLI with piped stdin
# ----------------------------------------------------------------------------------------------
def _cli(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyqa.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_cli_chat_and_ask_against_the_stub(stub, tmp_path):
    common = ["--config", str(CONFIG), "--endpoint", stub.url, f"storage_path={tmp_path}"]
    proc = _cli("chat", *common, stdin="hello there\nand again\n")
    assert proc.returncode == 0, proc.stderr
    assert "assistant> turns=1 last=hello there" in proc.stdout
    assert "assistant> turns=2 last=and again" in proc.stdout

    # Overrides right after the question: argparse cannot put positionals after options here.
    proc = _cli("ask", "What is json?", f"storage_path={tmp_path}", *common[:4])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "answer to: What is json?"

    proc = _cli("ask", "q", *common[:4], "--adapter", "other")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"tinyqa ask: error: {stub.url}/v1/ask answered 404: unknown adapter 'other'"
    ]


def test_cli_chat_locally_and_endpoint_down(tmp_path, tiny_dir):
    proc = _cli(
        "chat",
        "--config",
        str(CONFIG),
        f"storage_path={tmp_path}",
        stdin="What does `os.getcwd` do?\n/exit\n",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].startswith("tinyqa chat with base model tiny.")
    assert out[1].startswith("assistant> ") and len(out[1]) > len("assistant> ")

    url = _dead_url()
    proc = _cli("chat", "--config", str(CONFIG), "--endpoint", url, f"storage_path={tmp_path}")
    assert proc.returncode == 2
    assert f"endpoint {url}/v1/models does not answer" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# in a real terminal: prompts, Ctrl-D and Ctrl-C
# ----------------------------------------------------------------------------------------------
def _read_until(
    fd: int, needle: bytes, seen: bytearray, start: int = 0, timeout: float = 60.0
) -> bool:
    """Read the terminal into ``seen`` until ``needle`` shows up after offset ``start``."""
    import select
    import time

    deadline = time.monotonic() + timeout
    while needle not in seen[start:]:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not chunk:
            return False
        seen.extend(chunk)
    return True


def _wait_or_kill(pid: int, timeout: float = 30.0) -> int:
    """The child's exit code; a child still running after ``timeout`` is killed (-9)."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("key", [b"\x04", b"\x03"], ids=["ctrl-d", "ctrl-c"])
def test_chat_in_a_terminal_exits_cleanly_on_ctrl_d_and_ctrl_c(stub, tmp_path, key):
    import pty

    args = [sys.executable, "-m", "tinyqa.cli", "chat", "--config", str(CONFIG)]
    args += ["--endpoint", stub.url, f"storage_path={tmp_path}"]
    env = {**os.environ, "TERM": "dumb"}  # no terminal escape sequences around the prompt
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C is a SIGINT
        try:
            os.chdir(REPO)
            os.execve(sys.executable, args, env)
        finally:
            os._exit(127)  # never run the parent's code in the forked child
    seen = bytearray()
    code = None
    try:
        assert _read_until(fd, b"you> ", seen), seen.decode(errors="replace")
        os.write(fd, b"hello\n")
        assert _read_until(fd, b"assistant> turns=1 last=hello", seen), seen.decode(
            errors="replace"
        )
        # Only at the next prompt is readline waiting for a key (earlier, Ctrl-D could be lost).
        assert _read_until(fd, b"you> ", seen, start=seen.index(b"assistant> "))
        os.write(fd, key)
        _read_until(fd, b"\x00never", seen, timeout=30)  # read until the child closes the pty
    finally:
        code = _wait_or_kill(pid)
        os.close(fd)
    assert code == 0, seen.decode(errors="replace")
    assert b"Traceback" not in seen and b"interrupted" not in seen
