"""``tinyqa ask`` and ``tinyqa chat``: one answer, or a multi-turn conversation in the terminal.

Both work locally (a :class:`~tinyqa.inference.QAEngine` on the adapter's base model) or against a
running Serve endpoint over HTTP (``POST /v1/ask``; ``POST /v1/chat/completions`` with
``stream: true``, read as server-sent events). This is an interactive IO module: ``run_chat``
writes the conversation to the given output stream.

Chat history is kept within the model's context: before each turn the oldest turns are dropped
(with a notice) until the prompt plus the answer budget fits. Locally that is counted in tokens
with the engine's tokenizer; against an endpoint, whose tokenizer we do not have, it is estimated
from characters against the server's prompt limit (``serve.max_prompt_tokens``), and a 413 from
the server drops another turn and retries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from tinyqa.adapters import (
    check_adapter_id,
    configure_adapter_cache,
    default_adapter_dir,
    locate_adapter,
)
from tinyqa.config import NAME_PATTERN, TinyQAConfig
from tinyqa.errors import ModelError, TinyQAError
from tinyqa.secrets import API_KEY_ENV, resolve_api_key

logger = logging.getLogger(__name__)

# Characters per token when estimating an endpoint prompt's size without its tokenizer; on the low
# side for English BPE (about 4), so the estimate errs towards dropping a turn early.
CHARS_PER_TOKEN = 3
CONNECT_TIMEOUT_S = 10.0
ANSWER_PREFIX = "assistant> "
HELP = "commands: /reset clears the history, /exit quits (also Ctrl-D or Ctrl-C), /help"


class EndpointError(TinyQAError):
    """A Serve endpoint did not answer, or answered with an error."""


class ContextOverflow(EndpointError):
    """The endpoint rejected the prompt as too long (HTTP 413)."""


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
class _Local:
    """Answers from a QAEngine in this process."""

    def __init__(self, cfg: TinyQAConfig, adapter: str | None):
        # Imported here so that `chat --endpoint` starts without loading torch.
        from tinyqa.inference import build_engine

        path = locate_adapter(cfg, adapter) if adapter else default_adapter_dir(cfg)
        configure_adapter_cache(cfg)  # adapters in a bucket are downloaded into cfg's cache
        if path is None:
            logger.warning(
                "no adapter given and none trained under %s: answering with the base model %s",
                cfg.adapters_dir,
                cfg.model.name,
            )
        self.engine, models = build_engine(
            [path] if path else [], cfg.model, cfg.data.system_prompt
        )
        self.model = models[-1]  # the adapter, or the base when there is none
        base = self.engine.base_id
        self.label = f"adapter {self.model.label} on {base}" if path else f"base model {base}"
        positions = int(self.engine.model.config.max_position_embeddings)
        self.context = cfg.eval.chat_context_tokens or positions

    def _messages(self, history: list[dict[str, str]]) -> list[dict[str, str]]:
        prompt = self.model.system_prompt
        return [{"role": "system", "content": prompt}, *history] if prompt else history

    def prompt_size(self, history: list[dict[str, str]]) -> int:
        return len(self.engine.prompt_ids(self._messages(history)))

    def ask(self, question: str, max_new_tokens: int) -> str:
        from tinyqa.inference import GenerationRequest

        messages = self._messages([{"role": "user", "content": question}])
        req = GenerationRequest(messages, self.model.engine_name, max_new_tokens)
        return self.engine.generate([req])[0].text

    def stream(self, history: list[dict[str, str]], max_new_tokens: int | None) -> Iterator[str]:
        from tinyqa.inference import GenerationRequest

        req = GenerationRequest(
            self._messages(history), self.model.engine_name, max_new_tokens or 64
        )
        yield from self.engine.stream(req)

    def close(self) -> None:
        pass


class _Endpoint:
    """Answers from a running Serve endpoint, following the HTTP contract in DESIGN.md."""

    def __init__(
        self, cfg: TinyQAConfig, url: str, adapter: str | None, api_key: str | None
    ) -> None:
        import httpx

        try:
            parsed = httpx.URL(url.strip())
        except httpx.InvalidURL as e:
            raise EndpointError(f"endpoint {url!r} is not a URL ({e})") from e
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise EndpointError(
                f"endpoint {url!r} is not an http(s) URL; give e.g. --endpoint http://127.0.0.1:8000"
            )
        if adapter is not None:
            try:
                check_adapter_id(adapter)
            except ModelError as e:
                raise EndpointError(
                    f"adapter {adapter!r} is not an adapter id ({NAME_PATTERN}); with --endpoint, "
                    "--adapter names an adapter the server serves, not a folder"
                ) from e
        self.url = str(parsed).rstrip("/")
        self.adapter = adapter
        key = resolve_api_key(cfg.serve.api_key, flag=api_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        timeout = httpx.Timeout(cfg.eval.request_timeout_s, connect=CONNECT_TIMEOUT_S)
        self.client = httpx.Client(headers=headers, timeout=timeout)
        # httpx logs every request at INFO, which would interleave with the conversation.
        httpx_logger = logging.getLogger("httpx")
        if httpx_logger.level == logging.NOTSET:
            httpx_logger.setLevel(logging.WARNING)
        self.label = f"{adapter or 'the default model'} at {self.url}"
        self.context = cfg.eval.chat_context_tokens or cfg.serve.max_prompt_tokens
        self.max_messages = cfg.serve.max_messages
        self.max_message_chars = cfg.serve.max_question_chars

    def close(self) -> None:
        self.client.close()

    # ----- HTTP plumbing -----
    def _unreachable(self, url: str, e: Exception) -> EndpointError:
        import httpx

        if isinstance(e, httpx.TimeoutException):
            return EndpointError(
                f"endpoint {url} did not answer in time ({type(e).__name__}); is it overloaded? "
                "try again, or raise eval.request_timeout_s"
            )
        return EndpointError(
            f"endpoint {url} does not answer ({str(e) or type(e).__name__}); start it with "
            "`tinyqa serve`, or check --endpoint"
        )

    def _request(self, method: str, path: str, **kwargs: Any):
        import httpx

        url = self.url + path
        try:
            return self.client.request(method, url, **kwargs)
        except httpx.TransportError as e:
            raise self._unreachable(url, e) from e

    def _check(self, response, path: str) -> None:
        if response.status_code < 400:
            return
        message = _error_message(response)
        where = f"{self.url}{path} answered {response.status_code}: {message}"
        if response.status_code == 401:
            raise EndpointError(f"{where}; pass --api-key or set ${API_KEY_ENV}")
        if response.status_code == 413:
            raise ContextOverflow(where)
        raise EndpointError(where)

    def _json(self, response, path: str) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError as e:
            raise EndpointError(
                f"{self.url}{path} did not answer with JSON (is this a tinyqa Serve endpoint?)"
            ) from e
        if not isinstance(data, dict):
            raise EndpointError(f"{self.url}{path} answered {type(data).__name__}, not an object")
        return data

    # ----- API -----
    def check(self) -> None:
        """Fail early when the endpoint is down, rejects our key, or lacks the adapter."""
        path = "/v1/models"
        response = self._request("GET", path)
        if response.status_code == 404:  # no model listing here; the first turn will tell
            return
        self._check(response, path)
        if self.adapter is None:
            return
        listed = self._json(response, path).get("data", [])
        ids = [m.get("id") for m in listed if isinstance(m, dict)]
        if ids and self.adapter not in ids:
            raise EndpointError(
                f"{self.url} does not serve adapter {self.adapter!r}; it serves: "
                f"{', '.join(str(i) for i in ids)}"
            )

    def prompt_size(self, history: list[dict[str, str]]) -> int:
        if len(history) > self.max_messages:
            return self.context + 1  # over the server's message cap: drop turns
        return sum(len(m["content"]) + 8 for m in history) // CHARS_PER_TOKEN

    def ask(self, question: str, max_new_tokens: int | None) -> str:
        path = "/v1/ask"
        body: dict[str, Any] = {"question": question, "temperature": 0.0}
        if self.adapter:
            body["adapter"] = self.adapter
        if max_new_tokens:
            body["max_new_tokens"] = max_new_tokens
        response = self._request("POST", path, json=body)
        self._check(response, path)
        answer = self._json(response, path).get("answer")
        if not isinstance(answer, str):
            raise EndpointError(f"{self.url}{path} answered without an 'answer' string")
        return answer

    def stream(self, history: list[dict[str, str]], max_new_tokens: int | None) -> Iterator[str]:
        import httpx

        path = "/v1/chat/completions"
        body: dict[str, Any] = {"messages": history, "stream": True, "temperature": 0.0}
        if self.adapter:
            body["model"] = self.adapter
        if max_new_tokens:
            body["max_tokens"] = max_new_tokens
        url = self.url + path
        try:
            with self.client.stream("POST", url, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response, path)
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    # A server that ignored stream=true: one JSON completion.
                    response.read()
                    yield _completion_text(self._json(response, path), url)
                    return
                for payload in iter_sse(response.iter_lines()):
                    if payload.strip() == "[DONE]":
                        return
                    yield _chunk_text(payload, url)
        except httpx.TransportError as e:
            raise self._unreachable(url, e) from e


def _error_message(response) -> str:
    """The ``error.message`` of a contract error body, else the start of the body."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(data.get("detail"), str):
            return data["detail"]
    text = response.text.strip()
    return text[:200] if text else response.reason_phrase


def iter_sse(lines: Iterator[str]) -> Iterator[str]:
    """The ``data`` payloads of a server-sent event stream, one per event (multi-line joined)."""
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):  # comment / keep-alive
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _chunk_text(payload: str, url: str) -> str:
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError as e:
        raise EndpointError(f"{url} sent a stream event that is not JSON: {payload[:80]!r}") from e
    if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
        raise EndpointError(f"{url} failed mid-answer: {chunk['error'].get('message', chunk)}")
    try:
        choices = chunk["choices"]
        # A usage-only chunk (stream_options.include_usage) has no choices.
        return (choices[0].get("delta") or {}).get("content") or "" if choices else ""
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise EndpointError(f"{url} sent a chunk without choices[0].delta: {payload[:80]!r}") from e


def _completion_text(data: dict[str, Any], url: str) -> str:
    try:
        return data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as e:
        raise EndpointError(f"{url} answered without choices[0].message.content") from e


def _backend(
    cfg: TinyQAConfig, adapter: str | None, endpoint: str | None, api_key: str | None
) -> _Local | _Endpoint:
    if endpoint:
        return _Endpoint(cfg, endpoint, adapter, api_key)
    return _Local(cfg, adapter)


# ----------------------------------------------------------------------------------------------
# ask
# ----------------------------------------------------------------------------------------------
def ask(
    cfg: TinyQAConfig,
    question: str,
    adapter: str | None = None,
    endpoint: str | None = None,
    api_key: str | None = None,
    max_new_tokens: int | None = None,
) -> str:
    """Answer one question, locally or from a Serve endpoint; returns the answer text.

    ``adapter``: an id under ``cfg.adapters_dir`` or (locally) an adapter folder; default: the
    one ``best.json`` names, else the trained ``cfg.adapter_id``, else the base model (with an
    endpoint: the server's default). Raises :class:`~tinyqa.errors.TinyQAError` subclasses for an
    unknown adapter, an endpoint that does not answer (naming its URL) or answers with an error.
    """
    if not question.strip():
        raise TinyQAError("the question is empty; ask something, e.g. tinyqa ask 'What is json?'")
    backend = _backend(cfg, adapter, endpoint, api_key)
    try:
        if isinstance(backend, _Endpoint):
            return backend.ask(question, max_new_tokens)
        return backend.ask(question, max_new_tokens or cfg.serve.max_new_tokens)
    finally:
        backend.close()


# ----------------------------------------------------------------------------------------------
# chat
# ----------------------------------------------------------------------------------------------
@dataclass
class _Conversation:
    """Chat history, trimmed oldest turn first to fit ``backend.context`` minus ``reserve``."""

    backend: _Local | _Endpoint
    reserve: int  # tokens kept free for the answer
    history: list[dict[str, str]]

    def drop_oldest_turn(self) -> None:
        """Drop a user message and the assistant's answer to it (never the newest message)."""
        cut = 2 if len(self.history) > 2 and self.history[1]["role"] == "assistant" else 1
        del self.history[:cut]

    def fit(self) -> tuple[int, bool]:
        """Drop the oldest turns until the prompt fits; returns (turns dropped, it fits now)."""
        budget = self.backend.context - self.reserve
        dropped = 0
        while len(self.history) > 1 and self.backend.prompt_size(self.history) > budget:
            self.drop_oldest_turn()
            dropped += 1
        return dropped, self.backend.prompt_size(self.history) <= budget


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _read_line(stdin: TextIO, stdout: TextIO, prompt: str) -> str | None:
    """One line of input without its newline; None at end of input."""
    if stdin is sys.stdin and stdout is sys.stdout and _is_tty(stdin):
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        try:
            return input(prompt)
        except EOFError:
            return None
    if _is_tty(stdin):
        stdout.write(prompt)
        stdout.flush()
    line = stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def run_chat(
    cfg: TinyQAConfig,
    adapter: str | None = None,
    endpoint: str | None = None,
    api_key: str | None = None,
    max_new_tokens: int | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Interactive multi-turn chat on ``stdin`` / ``stdout`` (default: the process's); returns 0.

    ``/reset`` clears the history, ``/exit`` (or end of input, or Ctrl-C) ends the chat. Answers
    stream as they are generated. Raises :class:`~tinyqa.errors.TinyQAError` before the first
    turn for an unknown adapter or an endpoint that does not answer; an error during a turn is
    shown and the chat goes on.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    backend = _backend(cfg, adapter, endpoint, api_key)
    try:
        if isinstance(backend, _Endpoint):
            backend.check()
        local = isinstance(backend, _Local)
        # Locally the answer shares the model's context with the prompt and we pick its length;
        # an endpoint limits the prompt alone and has its own default answer length.
        answer_tokens = max_new_tokens or (cfg.serve.max_new_tokens if local else None)
        conv = _Conversation(backend, answer_tokens if local and answer_tokens else 0, [])
        return _loop(conv, answer_tokens, stdin, stdout)
    finally:
        backend.close()


def _loop(conv: _Conversation, answer_tokens: int | None, stdin: TextIO, stdout: TextIO) -> int:
    def say(text: str) -> None:
        stdout.write(text + "\n")
        stdout.flush()

    say(f"tinyqa chat with {conv.backend.label}. {HELP}")
    try:
        while True:
            line = _read_line(stdin, stdout, "you> ")
            if line is None:
                if _is_tty(stdin):
                    say("")
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                conv.history.clear()
                say("(history cleared)")
            elif text == "/help":
                say(HELP)
            elif text.startswith("/") and " " not in text:
                say(f"unknown command {text}; {HELP}")
            else:
                _turn(conv, text, answer_tokens, stdout, say)
    except KeyboardInterrupt:
        say("")
        return 0


def _turn(
    conv: _Conversation,
    text: str,
    max_new_tokens: int | None,
    stdout: TextIO,
    say: Callable[[str], None],
) -> None:
    """One question and its streamed answer; trims the history first."""
    limit = getattr(conv.backend, "max_message_chars", None)
    if limit is not None and len(text) > limit:
        say(f"(that message has {len(text)} characters; the endpoint takes at most {limit})")
        return
    conv.history.append({"role": "user", "content": text})
    dropped, fits = conv.fit()
    if dropped:
        say(
            f"(dropped the oldest {dropped} turn{'s' if dropped > 1 else ''} to stay within "
            f"the {conv.backend.context}-token context)"
        )
    if not fits:
        conv.history.pop()
        say(f"(that message is too long for the {conv.backend.context}-token context)")
        return
    earlier = conv.history[:-1]  # kept if this turn fails after dropping turns for a retry
    while True:
        pieces: list[str] = []
        try:
            for piece in conv.backend.stream(conv.history, max_new_tokens):
                if not pieces:
                    piece = piece.lstrip()  # the decoder's word-boundary space
                    if not piece:
                        continue
                    stdout.write(ANSWER_PREFIX)
                pieces.append(piece)
                stdout.write(piece)
                stdout.flush()
        except ContextOverflow as e:
            if not pieces and len(conv.history) > 1:
                # The server counts tokens; our estimate was too generous. Retry with less.
                conv.drop_oldest_turn()
                say("(the endpoint found the conversation too long: dropped the oldest turn)")
                continue
            _fail(conv, earlier, e, pieces, say)
            return
        except TinyQAError as e:
            _fail(conv, earlier, e, pieces, say)
            return
        say("" if pieces else ANSWER_PREFIX)
        conv.history.append({"role": "assistant", "content": "".join(pieces).strip()})
        return


def _fail(
    conv: _Conversation,
    earlier: list[dict[str, str]],
    e: Exception,
    pieces: list[str],
    say: Callable[[str], None],
) -> None:
    """Show a failed turn's error; the history is as before the question (the chat goes on)."""
    if pieces:
        say("")
    conv.history[:] = earlier
    say(f"error: {e}")
