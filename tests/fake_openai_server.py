"""A scriptable OpenAI-compatible HTTP server for tests (no network, no API key, no model).

Why a real server rather than a mocked transport: the faults that matter for a teacher that costs
money (timeouts, resets, half-written bodies, rate limits) live in the socket and HTTP layers, so the
client is tested against real sockets on 127.0.0.1.

Usage::

    with FakeOpenAIServer() as srv:
        srv.push(Status(429, retry_after="0"), Good())   # the next two requests, in arrival order
        ... OpenAIGenerator(cfg with base_url=srv.base_url) ...
        assert srv.received[0].headers["authorization"] == "Bearer ..."

Each request takes the next scripted action from the queue; when the queue is empty it asks
``responder(received)`` (if given), else answers with :class:`Good`. Good answers echo the last
message (chat) or the prompt (completions) followed by ``|`` and a server-wide choice counter, so every
choice is distinct and traceable to its prompt.

``FakeOpenAIServer(api_root="/v1")`` answers 404 with FastAPI's ``{"detail": "Not Found"}`` (what vLLM
and SGLang send) to a POST outside ``/v1/chat/completions`` and ``/v1/completions``, as a real server
does to a ``base_url`` without ``/v1``. :func:`refusing` scripts an API that rejects ``n > 1`` or a
token-limit field with the 400 bodies real APIs send (:data:`N_REFUSALS`, :data:`MAX_TOKENS_REFUSAL`).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


# ---------------------------------------------------------------------------------------------
# actions


@dataclass
class Good:
    """A well-formed answer with ``count`` choices (default: the request's ``n``).

    ``texts`` fixes the choice texts; ``usage`` adds ``usage.completion_tokens`` =
    ``tokens_per_choice * count`` and ``usage.prompt_tokens`` = ``prompt_tokens``; ``finish_reason`` is
    set on every choice; ``content_none`` sends a chat choice whose ``content`` is null.

    A reasoning server: ``reasoning`` gives each choice's reasoning, sent in the message field
    ``reasoning_field`` (``reasoning_content``: older vLLM, DeepSeek, SGLang; ``reasoning``: newer vLLM,
    OpenRouter), or on the completions endpoint on the choice; ``reasoning_tokens_per_choice``
    adds ``usage.completion_tokens_details.reasoning_tokens`` as OpenAI reports it.
    """

    count: int | None = None
    texts: list[str] | None = None
    usage: bool = True
    tokens_per_choice: int = 5
    finish_reason: str = "stop"
    content_none: bool = False
    reasoning: list[str] | None = None
    reasoning_field: str = "reasoning_content"
    reasoning_tokens_per_choice: int | None = None
    prompt_tokens: int = 3


@dataclass
class Status:
    """An HTTP error status with an optional ``Retry-After`` header value."""

    code: int
    retry_after: str | None = None
    body: str = '{"error": {"message": "scripted failure"}}'


@dataclass
class Slow:
    """Wait ``seconds`` before answering (set it past the client timeout), then answer ``then``."""

    seconds: float
    then: Any = field(default_factory=Good)


@dataclass
class Malformed:
    """Status 200 with a body that is not the expected JSON."""

    body: str = '{"choices": [ {"message": '


@dataclass
class EmptyChoices:
    """Status 200 with ``"choices": []``."""


@dataclass
class Drop:
    """Close the connection without any reply; ``reset=True`` sends a TCP RST instead of a FIN."""

    reset: bool = True


@dataclass
class Truncated:
    """Status 200 announcing a full body (Content-Length) but closing the connection after ``keep`` bytes
    of it, as a server or proxy dying mid-reply does."""

    keep: int = 40


Action = Good | Status | Slow | Malformed | EmptyChoices | Drop | Truncated


# 400 bodies of APIs that refuse n > 1, each as its server words it
N_REFUSALS = {
    # OpenAI's wording for a value a model does not take (its reasoning models refuse what is not the default)
    "openai": json.dumps({"error": {
        "message": "Unsupported value: 'n' does not support 4 with this model. Only the default (1) value is supported.",
        "type": "invalid_request_error", "param": "n", "code": "unsupported_value"}}),
    # a gateway that refuses n > 1 with a param but a message that does not quote it
    "gateway": json.dumps({"error": {"message": "Multiple choices are not supported; send parallel requests instead.",
                                     "type": "invalid_request_error", "param": "n", "code": "unsupported_parameter"}}),
    # a server with no structured param, only a message naming n
    "message-only": json.dumps({"error": {"message": "n must equal 1 (multi-choice is not supported)"}}),
    # vLLM's older flat error object
    "flat": json.dumps({"object": "error", "message": "'n' is not supported", "type": "BadRequestError",
                        "param": None, "code": 400}),
}
# OpenAI's, word for word, for its reasoning models (o1, o3, gpt-5)
MAX_TOKENS_REFUSAL = json.dumps({"error": {
    "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
    "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}})
# vLLM's 400 for a limit past the context: names max_tokens, but does not refuse the field
MAX_TOKENS_TOO_LARGE = json.dumps({"error": {
    "message": "'max_tokens' or 'max_completion_tokens' is too large: 4000. This model's maximum context length is "
               "2048 tokens and your request has 30 input tokens (4000 > 2048 - 30).",
    "type": "BadRequestError", "param": None, "code": 400}})


def refusing(n_body: str | None = None, max_tokens_body: str | None = None,
             then: Callable[["Received"], Action] | None = None) -> Callable[["Received"], Action]:
    """A responder for an API that answers 400 with ``n_body`` to ``n > 1`` and with ``max_tokens_body`` to a
    request carrying ``max_tokens``; any other request gets ``then(received)`` (default :class:`Good`)."""

    def respond(rec: "Received") -> Action:
        body = rec.body or {}
        if n_body is not None and int(body.get("n", 1)) > 1:
            return Status(400, body=n_body)
        if max_tokens_body is not None and "max_tokens" in body:
            return Status(400, body=max_tokens_body)
        return then(rec) if then else Good()

    return respond


@dataclass
class Received:
    """What the server received for one request."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: dict[str, Any] | None
    action: Any = None

    @property
    def prompt(self) -> str:
        """The last chat message or the completions prompt."""
        if not self.body:
            return ""
        if "messages" in self.body:
            return str(self.body["messages"][-1]["content"])
        return str(self.body.get("prompt", ""))


# ---------------------------------------------------------------------------------------------
# server


class FakeOpenAIServer:
    """Threaded HTTP server on 127.0.0.1, port chosen by the OS. Use as a context manager."""

    def __init__(self, responder: Callable[[Received], Action] | None = None, api_root: str | None = None) -> None:
        self.responder = responder
        self.api_root = api_root  # None: every path is served; "/v1": others get 404, as a real server does
        self.received: list[Received] = []
        self._queue: deque[Action] = deque()
        self._lock = threading.Lock()
        self._counter = 0
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        # a short poll interval so that close() returns at once (the default waits up to 0.5 s)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    # -- lifecycle
    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()  # wakes Slow actions
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting
    def push(self, *actions: Action) -> None:
        """Queue actions for the next requests, in arrival order."""
        with self._lock:
            self._queue.extend(actions)

    def _next_action(self, rec: Received) -> Action:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        return self.responder(rec) if self.responder else Good()

    def _take_ids(self, count: int) -> list[int]:
        with self._lock:
            start = self._counter
            self._counter += count
        return list(range(start, start + count))

    def _record(self, rec: Received) -> None:
        with self._lock:
            self.received.append(rec)

    def good_body(self, rec: Received, action: Good) -> dict[str, Any]:
        body = rec.body or {}
        count = action.count if action.count is not None else int(body.get("n", 1))
        if action.texts is not None:
            texts = list(action.texts)[:count]
        else:
            texts = [f"{rec.prompt}|{i}" for i in self._take_ids(count)]
        chat = rec.path.endswith("/chat/completions")
        choices = []
        for i, text in enumerate(texts):
            choice: dict[str, Any] = {"index": i, "finish_reason": action.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": None if action.content_none else text}
            else:
                choice["text"] = text
            if action.reasoning is not None:
                (choice["message"] if chat else choice)[action.reasoning_field] = action.reasoning[i % len(action.reasoning)]
            choices.append(choice)
        out: dict[str, Any] = {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
                               "model": body.get("model"), "choices": choices}
        if action.usage:
            out["usage"] = {"prompt_tokens": action.prompt_tokens,
                            "completion_tokens": action.tokens_per_choice * len(choices)}
            if action.reasoning_tokens_per_choice is not None:
                out["usage"]["completion_tokens_details"] = {
                    "reasoning_tokens": action.reasoning_tokens_per_choice * len(choices)}
        return out


def free_port() -> int:
    """A port that nobody listens on (bound, then released), for 'dead server' tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:
            self._send(200, json.dumps({"object": "list", "data": []}))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                body = None
            rec = Received("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            root = server.api_root
            if root is not None and self.path not in (f"{root}/chat/completions", f"{root}/completions"):
                rec.action = Status(404, body='{"detail":"Not Found"}')
                server._record(rec)
                self._perform(rec, rec.action)
                return
            action = server._next_action(rec)
            rec.action = action
            server._record(rec)
            self._perform(rec, action)

        def _perform(self, rec: Received, action: Action) -> None:
            if isinstance(action, Slow):
                if server._stop.wait(action.seconds):
                    return
                self._perform(rec, action.then)
            elif isinstance(action, Good):
                self._send(200, json.dumps(server.good_body(rec, action)))
            elif isinstance(action, Status):
                extra = {"Retry-After": action.retry_after} if action.retry_after is not None else {}
                self._send(action.code, action.body, extra)
            elif isinstance(action, Malformed):
                self._send(200, action.body)
            elif isinstance(action, EmptyChoices):
                self._send(200, json.dumps({"id": "cmpl-fake", "choices": []}))
            elif isinstance(action, Truncated):
                data = json.dumps(server.good_body(rec, Good())).encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: action.keep])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif isinstance(action, Drop):
                if action.reset:  # SO_LINGER 0: close() sends RST
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
            else:
                raise TypeError(f"unknown action {action!r}")

        def _send(self, code: int, text: str, headers: dict[str, str] | None = None) -> None:
            data = text.encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                self.close_connection = True

    return Handler
