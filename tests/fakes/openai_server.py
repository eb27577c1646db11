"""An in-process OpenAI-compatible server for tests: what `vllm serve` answers, scripted per request.

It serves `GET /v1/models` (with vLLM's `max_model_len`), `POST /v1/chat/completions` and vLLM's `POST /tokenize` on
127.0.0.1, one thread per connection. A test scripts the replies — `respond(body) -> Reply` for every chat request,
or `queue` for the next few — with answers, delays, errors (429 with Retry-After, 500, 400 context errors, 401) and
hangs (a request accepted and never answered until the test releases it or the server closes). It counts the chat
requests it holds at once (`max_concurrent`) and when each arrived and finished, so tests can check the client's
in-flight limit, out-of-order completion and retry spacing. Every wait is bounded: nothing outlives close().
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
HANG_LIMIT_S = 30.0  # a hanging request answers nothing and ends by itself after this long at most


def count_tokens(text: str) -> int:
    """The double's tokenizer: words and punctuation."""
    return len(_TOKEN.findall(text))


def chat_tokens(messages: list[dict[str, Any]]) -> int:
    """What the double's 'chat template' costs: each message's tokens + 4, + 2 for the assistant turn."""
    return sum(count_tokens(str(m.get("content", ""))) + 4 for m in messages) + 2


@dataclass
class Reply:
    status: int = 200
    text: str | None = None  # None: a summary made from the request (its user message's query)
    finish_reason: str = "stop"
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""  # the error body's message (status >= 400)
    hang: bool = False  # accept and never answer (until release() or close(), HANG_LIMIT_S at most)
    usage: bool = True  # False: a server that reports no usage
    prompt_tokens: int | None = None  # usage.prompt_tokens to report (None: the double's own count)


@dataclass
class Seen:
    """One chat request as the server saw it."""

    body: dict[str, Any]
    arrived: float
    finished: float | None = None
    status: int | None = None


def query_of(body: dict[str, Any]) -> str:
    user = next((str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == "user"), "")
    found = re.search(r"<query>(.*?)</query>", user, re.S)
    return found.group(1) if found else user[:40]


class FakeOpenAIServer:
    def __init__(
        self,
        *,
        model: str = "fake/model",
        max_model_len: int | None = 8192,
        api_key: str | None = None,
        tokenize: bool = True,
        respond: Callable[[dict[str, Any]], Reply] | None = None,
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.tokenize = tokenize
        self.respond: Callable[[dict[str, Any]], Reply] = respond or (lambda _body: Reply())
        self.queue: deque[Reply] = deque()  # one-shot replies, used before `respond`
        self.seen: list[Seen] = []
        self.authorizations: list[str | None] = []
        self.current = 0
        self.max_concurrent = 0
        self.models_requests = 0
        self.tokenize_requests = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._closed = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if not self._authorized():
                    return
                if self.path.rstrip("/") == "/v1/models":
                    with server._lock:
                        server.models_requests += 1
                    entry: dict[str, Any] = {"id": server.model, "object": "model", "owned_by": "test"}
                    if server.max_model_len is not None:
                        entry["max_model_len"] = server.max_model_len
                    self._json(200, {"object": "list", "data": [entry]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self._authorized():
                    return
                if self.path == "/tokenize" and server.tokenize:
                    with server._lock:
                        server.tokenize_requests += 1
                    if "messages" in body:
                        count = chat_tokens(body["messages"])
                    else:
                        count = count_tokens(str(body.get("prompt", "")))
                    self._json(200, {"count": count, "max_model_len": server.max_model_len, "tokens": list(range(count))})
                elif self.path == "/v1/chat/completions":
                    server._chat(self, body)
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def _authorized(self) -> bool:
                given = self.headers.get("Authorization")
                with server._lock:
                    server.authorizations.append(given)
                if server.api_key is not None and given != f"Bearer {server.api_key}":
                    self._json(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
                    return False
                return True

            def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up on this request (its deadline)
                    pass

            def log_message(self, *_args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def chat_requests(self) -> int:
        with self._lock:
            return len(self.seen)

    def release(self) -> None:
        """Let every hanging request end (without an answer)."""
        self._release.set()

    def close(self) -> None:
        self._closed.set()
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def _chat(self, handler: Any, body: dict[str, Any]) -> None:
        seen = Seen(body, time.monotonic())
        with self._lock:
            self.seen.append(seen)
            reply = self.queue.popleft() if self.queue else None
            self.current += 1
            self.max_concurrent = max(self.max_concurrent, self.current)
        answered = False

        def answer() -> None:
            # A request stops counting as held once its answer is about to go out: the client may send the next
            # request the moment it has read it, before this handler's thread has returned.
            nonlocal answered
            if not answered:
                answered = True
                with self._lock:
                    self.current -= 1
                    seen.finished = time.monotonic()

        try:
            reply = reply or self.respond(body)
            if reply.delay_s:
                self._closed.wait(reply.delay_s)
            if reply.hang:
                self._release.wait(HANG_LIMIT_S)
                handler.close_connection = True
                return
            seen.status = reply.status
            if reply.status >= 400:
                answer()
                handler._json(reply.status, {"object": "error", "message": reply.error or f"status {reply.status}",
                                             "type": "BadRequestError", "code": reply.status}, reply.headers)
                return
            text = reply.text if reply.text is not None else f"Summary of {query_of(body)} [1]."
            payload: dict[str, Any] = {
                "id": f"chatcmpl-{len(self.seen)}",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reply.finish_reason}],
            }
            if reply.usage:
                counted = chat_tokens(body.get("messages", [])) if reply.prompt_tokens is None else reply.prompt_tokens
                payload["usage"] = {"prompt_tokens": counted,
                                    "completion_tokens": count_tokens(text), "total_tokens": 0}
            answer()
            handler._json(200, payload, reply.headers)
        finally:
            answer()
