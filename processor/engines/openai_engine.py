"""ENGINE=openai: summaries from any OpenAI-compatible server (vllm serve, Ollama, llama.cpp, TGI, NIM, LiteLLM).

The server does the batching; this engine keeps it full. Requests go out through `POST {OPENAI_BASE_URL}/chat/
completions` (the server applies its own chat template to the messages the prompt builder made, injection hardening
included) on one background asyncio loop with httpx, at most OPENAI_MAX_IN_FLIGHT at once:
* micro_batch: generate() sends a batch's requests concurrently and returns when all are back, in input order;
* continuous: add_request() sends one at once and step() returns those finished since, in any order, waiting at
  most STEP_WAIT_S for the first (the feed's thread calls it in a loop).

One error taxonomy, the in-process engines' own:
* connection refused or reset, a request past OPENAI_TIMEOUT_S (a server that accepts and never answers), 5xx, 429,
  401/403/404 after start-up → ServerUnavailableError, an EngineUnavailableError: generate() or step() raises, so
  the known-good probe, the backoff and exit 5 after INFRASTRUCTURE_RETRY_TIMEOUT_S apply (generation.py). No request
  is retried here (the client never retries on its own): a Retry-After on a 429 or 503 holds every request sent
  after it until then (RETRY_AFTER_MAX_S at most), the probe's and the retried batch's included;
* 400, 413, 422 (a prompt over the server's context, a content-filter refusal) and a content_filter finish →
  PromptRejectedError, that event's EventGenerationError: its dead letter (the probe still runs when every event of
  a batch fails, so a server that refuses everything is not mistaken for bad records);
* at start-up, a 401/403 (OPENAI_API_KEY), a model the server does not list (OPENAI_MODEL), or a server context
  below VLLM_MAX_MODEL_LEN → EngineStartupError (exit 2, one line naming the setting); a server that cannot be
  reached is waited for, INFRASTRUCTURE_RETRY_TIMEOUT_S at most (a `vllm serve` loading its model), then exit 5.

Prompts that fit: the context is the server's where it says (vLLM's `max_model_len` in /v1/models), else
VLLM_MAX_MODEL_LEN. Tokens are counted by OPENAI_TOKENIZER (a local Hugging Face tokenizer, exact), else the server's
/tokenize (vLLM) with the chat template's overhead measured once, else an estimate (EstimateTokenizer): all three in
openai_tokenizers.py. The summary's token counts come from the response's `usage`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Iterable, Sequence, TypeVar

import httpx

from processor.engines.base import (
    EngineStartupError,
    EventGenerationError,
    Finished,
    Generation,
    InFlightBudget,
    Prompt,
    Tokenizer,
)
from processor.engines.openai_tokenizers import ServerTokenizer, api_root, make_tokenizer
from processor.errors import EngineUnavailableError
from processor.retry import Backoff
from processor.settings import Settings

if TYPE_CHECKING:
    from processor.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

# step() waits this long at most for a request to finish: short, so the feed refills and aborts promptly, long
# enough that an idle wait is not a busy loop.
STEP_WAIT_S = 0.05
# A Retry-After is honoured up to this long: a server asking for more is retried sooner, by the backoff's own clock.
RETRY_AFTER_MAX_S = 60.0
# How much of an error body a log line or dead letter quotes.
ERROR_QUOTE_CHARS = 300
class ServerUnavailableError(EngineUnavailableError):
    """The server did not answer usably (refused, timed out, 5xx, 429, …): infrastructure, never the record's fault.
    `cause` is the bounded label of the retries metric."""

    def __init__(self, message: str, cause: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.retry_after_s = retry_after_s


class PromptRejectedError(EventGenerationError):
    """The server refused this prompt (400: over its context, a content filter): the record's dead letter."""


# ---------------------------------------------------------------------------------------------- the engine
def retry_after_s(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


def _quote(response: httpx.Response) -> str:
    try:
        payload = response.json()
        error = payload.get("error") if isinstance(payload, dict) else None
        message = (error.get("message") if isinstance(error, dict) else None) or (payload.get("message") if isinstance(payload, dict) else None)
        text = str(message) if message else response.text
    except ValueError:
        text = response.text
    return " ".join(text.split())[:ERROR_QUOTE_CHARS]


def _headers(settings: Settings) -> dict[str, str]:
    if settings.openai_api_key is None:
        return {}
    return {"Authorization": f"Bearer {settings.openai_api_key.get_secret_value()}"}


class OpenAIEngine:
    kind = "openai"

    def __init__(
        self,
        *,
        settings: Settings,
        tokenizer: Tokenizer,
        context_length: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.model = settings.model_for_openai
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_in_flight = settings.openai_max_in_flight
        self.timeout_s = settings.openai_timeout_s
        self._url = api_root(settings.openai_base_url) + "/chat/completions"
        # Extra request fields (a benchmark's fixed output lengths: vLLM's ignore_eos and min_tokens); empty in the
        # product, where every request samples with the settings' parameters.
        self.extra_body: dict[str, Any] = {}
        self._metrics: "Metrics | None" = None
        self._reachable = True
        self._not_before = 0.0  # monotonic: no request is sent before this (a Retry-After); the loop's thread only
        self._cond = threading.Condition()
        self._pending: dict[str, concurrent.futures.Future[Generation | EventGenerationError]] = {}
        self._done: list[tuple[str, concurrent.futures.Future[Generation | EventGenerationError]]] = []
        self._failure: BaseException | None = None  # from a finished request; step() raises it next
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-client", daemon=True)
        self._thread.start()

        async def start() -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
            limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
            client = httpx.AsyncClient(headers=_headers(settings), timeout=httpx.Timeout(self.timeout_s), limits=limits,
                                       transport=transport)
            return client, asyncio.Semaphore(self.max_in_flight)

        self._client, self._slots = self._run(start())

    @classmethod
    def from_settings(cls, settings: Settings, *, transport: httpx.BaseTransport | None = None) -> "OpenAIEngine":
        """Reach the server (waiting while it starts), check the key and the model, read its context, pick a tokenizer."""
        client = httpx.Client(headers=_headers(settings), timeout=httpx.Timeout(min(settings.openai_timeout_s, 30.0)),
                              transport=transport)
        try:
            entry = _served_model(client, settings)
            context = entry.get("max_model_len")
            explicit = "max_model_len" in settings.model_fields_set  # VLLM_MAX_MODEL_LEN set: honoured, and checked
            if isinstance(context, int) and explicit and context < settings.max_model_len:
                raise EngineStartupError(
                    f"the server holds {context} tokens of context for {settings.model_for_openai} and "
                    f"VLLM_MAX_MODEL_LEN={settings.max_model_len} asks for more: set VLLM_MAX_MODEL_LEN={context} (or less)"
                )
            tokenizer = make_tokenizer(client, settings)
        except BaseException:
            client.close()
            raise
        if not isinstance(tokenizer, ServerTokenizer):
            client.close()
        # The server's own context where it reports one (vLLM's max_model_len), unless VLLM_MAX_MODEL_LEN says less.
        context_length = context if isinstance(context, int) and not explicit else settings.max_model_len
        log.info("ENGINE=openai: %s at %s, context %d (%s), tokens counted by %s, up to %d requests in flight",
                 settings.model_for_openai, settings.openai_base_url, context_length,
                 "the server's max_model_len" if isinstance(context, int) and not explicit else "VLLM_MAX_MODEL_LEN",
                 type(tokenizer).__name__, settings.openai_max_in_flight)
        return cls(settings=settings, tokenizer=tokenizer, context_length=context_length)

    # ------------------------------------------------------------------------------------------ health
    def attach_metrics(self, metrics: "Metrics") -> None:
        """Report request latency, requests in flight and retries by cause there; /readyz asks reachable()."""
        self._metrics = metrics
        metrics.watch_server(self.reachable)

    def reachable(self) -> bool:
        """False from a failure to reach the server (or an answer saying it cannot serve) until the next answer."""
        return self._reachable

    # ------------------------------------------------------------------------------------- micro-batch
    def generate(self, prompts: Sequence[Prompt]) -> list[Generation | EventGenerationError]:
        futures = [self._send(prompt) for prompt in prompts]
        concurrent.futures.wait(futures)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
        return [future.result() for future in futures]

    def capacity(self) -> None:
        return None  # the server's memory is the server's business: OPENAI_MAX_IN_FLIGHT bounds what it is sent

    # -------------------------------------------------------------------------------------- continuous
    def add_request(self, request_id: str, prompt: Prompt) -> None:
        with self._cond:
            if request_id in self._pending:
                raise ValueError(f"request {request_id!r} is already in flight")
            future = self._send(prompt)
            self._pending[request_id] = future
        future.add_done_callback(lambda f: self._finished(request_id, f))

    def step(self) -> list[Finished]:
        with self._cond:
            if self._failure is None and not self._done and self._pending:
                self._cond.wait_for(lambda: bool(self._done), STEP_WAIT_S)
            done, self._done = self._done, []
            for request_id, _ in done:
                self._pending.pop(request_id, None)
            finished: list[Finished] = []
            for request_id, future in done:
                error = future.exception()
                if error is None:
                    finished.append(Finished(request_id, future.result()))
                elif self._failure is None:
                    self._failure = error
            if self._failure is not None and not finished:
                failure, self._failure = self._failure, None
                raise failure  # after the summaries that finished beside it were returned
            return finished

    def abort(self, request_ids: Iterable[str]) -> None:
        with self._cond:
            ids = set(request_ids)
            for request_id in ids:
                future = self._pending.pop(request_id, None)
                if future is not None:
                    future.cancel()  # cancels the request's task on the loop: the connection is dropped
            self._done = [(request_id, future) for request_id, future in self._done if request_id not in ids]

    def has_unfinished(self) -> bool:
        with self._cond:
            return bool(self._pending) or self._failure is not None

    def in_flight_budget(self) -> InFlightBudget:
        """OPENAI_MAX_IN_FLIGHT requests, each up to the whole context: the server's KV cache is its own business."""
        return InFlightBudget(max_sequences=self.max_in_flight, kv_tokens=self.max_in_flight * self.context_length)

    def close(self) -> None:
        self.abort(list(self._pending))
        if not self._loop.is_closed() and self._thread.is_alive():
            try:
                self._run(self._client.aclose(), timeout=5.0)
            except Exception:  # noqa: BLE001 - closing: nothing left to protect
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)

    # ------------------------------------------------------------------------------------------ requests
    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _send(self, prompt: Prompt) -> concurrent.futures.Future[Generation | EventGenerationError]:
        return asyncio.run_coroutine_threadsafe(self._request(prompt), self._loop)

    def _finished(self, request_id: str, future: concurrent.futures.Future[Any]) -> None:
        with self._cond:
            if self._pending.get(request_id) is future and not future.cancelled():
                self._done.append((request_id, future))
                self._cond.notify_all()

    def _body(self, prompt: Prompt) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in prompt.messages],
            "temperature": self.settings.sampling_temperature,
            "top_p": self.settings.sampling_top_p,
            "max_tokens": self.settings.sampling_max_tokens,
            "seed": self.settings.seed,
            "stream": False,
            **self.extra_body,
        }

    async def _request(self, prompt: Prompt) -> Generation | EventGenerationError:
        async with self._slots:
            hold = self._not_before - time.monotonic()
            if hold > 0:
                await asyncio.sleep(hold)
            started = time.monotonic()
            metrics = self._metrics
            if metrics is not None:
                metrics.server_in_flight.inc()
            try:
                response = await asyncio.wait_for(self._client.post(self._url, json=self._body(prompt)), self.timeout_s)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                raise self._unavailable("timeout", f"the server did not answer within OPENAI_TIMEOUT_S={self.timeout_s:g} s") from None
            except httpx.TransportError as exc:
                raise self._unavailable("connection", f"cannot reach the server at {self.settings.openai_base_url}: {type(exc).__name__}: {exc}") from None
            finally:
                if metrics is not None:
                    metrics.server_in_flight.dec()
                    metrics.server_request_latency.observe(time.monotonic() - started)
            return self._outcome(response, prompt)

    def _outcome(self, response: httpx.Response, prompt: Prompt) -> Generation | EventGenerationError:
        status = response.status_code
        if status == 429 or status >= 500:
            wait = retry_after_s(response.headers.get("Retry-After"))
            if wait is not None:
                self._not_before = max(self._not_before, time.monotonic() + min(wait, RETRY_AFTER_MAX_S))
            cause = "rate_limited" if status == 429 else "server_error"
            raise self._unavailable(cause, f"the server answered {status}: {_quote(response)}", wait)
        if status in (400, 413, 422):
            self._reachable = True
            return PromptRejectedError(f"the server refused the prompt ({prompt.prompt_tokens} tokens counted here), "
                                       f"{status}: {_quote(response)}")
        if status != 200:  # 401/403 (a key revoked), 404 (the model unloaded): nothing a record did
            raise self._unavailable(f"http_{status}" if status in (401, 403, 404) else "http_other",
                                    f"the server answered {status}: {_quote(response)}")
        self._reachable = True
        try:
            payload = response.json()
            choice = payload["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason") or "stop"
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return EventGenerationError(f"the server's answer is not a chat completion: {response.text[:ERROR_QUOTE_CHARS]!r}")
        if finish == "content_filter":
            return PromptRejectedError("the server's content filter refused the answer")
        usage = payload.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")
        return Generation(
            str(text),
            "length" if finish == "length" else "stop",
            int(prompt_tokens) if isinstance(prompt_tokens, int) else prompt.prompt_tokens,
            int(completion_tokens) if isinstance(completion_tokens, int) else self.tokenizer.count(str(text)),
        )

    def _unavailable(self, cause: str, message: str, retry_after: float | None = None) -> ServerUnavailableError:
        self._reachable = False
        if self._metrics is not None:
            self._metrics.server_retries.labels(cause).inc()
        log.warning("ENGINE=openai: %s (%s)", message, cause)
        return ServerUnavailableError(message, cause, retry_after)


# ----------------------------------------------------------------------------------------------- start-up
def _served_model(client: httpx.Client, settings: Settings) -> dict[str, Any]:
    """The server's /models entry for OPENAI_MODEL, once the server answers (INFRASTRUCTURE_RETRY_TIMEOUT_S at most)."""
    url = api_root(settings.openai_base_url) + "/models"
    backoff = Backoff(give_up_after_s=settings.infrastructure_retry_timeout_s)
    while True:
        try:
            response = client.get(url)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code < 500 and response.status_code != 429:
                break
            problem = f"{response.status_code}: {_quote(response)}"
        if not backoff.failed():
            raise EngineUnavailableError(
                f"the server at OPENAI_BASE_URL={settings.openai_base_url} did not answer for "
                f"{backoff.failing_for():.0f} s ({problem})"
            )
        log.warning("waiting for the server at OPENAI_BASE_URL=%s (%s)", settings.openai_base_url, problem)
        time.sleep(max(0.0, backoff.next_at - time.monotonic()))
    if response.status_code in (401, 403):
        raise EngineStartupError(
            f"the server at OPENAI_BASE_URL={settings.openai_base_url} refused the key ({response.status_code}): "
            f"set OPENAI_API_KEY to a key it accepts"
        )
    if response.status_code != 200:
        raise EngineStartupError(
            f"OPENAI_BASE_URL={settings.openai_base_url} answered {response.status_code} for /models: it must be the "
            "API root of an OpenAI-compatible server, ending in /v1"
        )
    try:
        models = [entry for entry in response.json()["data"] if isinstance(entry, dict)]
    except (ValueError, KeyError, TypeError):
        raise EngineStartupError(f"OPENAI_BASE_URL={settings.openai_base_url}: /models is not an OpenAI model list") from None
    wanted = settings.model_for_openai
    for entry in models:
        if entry.get("id") == wanted:
            return entry
    served = ", ".join(str(entry.get("id")) for entry in models[:5]) or "nothing"
    raise EngineStartupError(f"OPENAI_MODEL={wanted} is not served at {settings.openai_base_url} (it serves: {served})")
