"""The engine protocol: what the loop needs from any summariser (extractive, Transformers, vLLM).

The loop sees only `Engine`; it never knows which one it runs. Prompts arrive already rendered to the engine's
own token ids, so the count the batcher used is exactly what the model sees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

from processor.errors import RecordError, StartupError

if TYPE_CHECKING:
    from processor.capacity import CapacityPlan
    from processor.events import SearchEvent


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str


class Encoded:
    """A text's token ids and, only when asked, where each token starts in the text.

    Offsets cost about as much again as the ids (one Python tuple a token), and the prompt builder needs them only
    when a prompt is over budget, so they are computed on first use.
    """

    __slots__ = ("ids", "_starts", "_make_starts")

    def __init__(self, ids: Sequence[int], starts: Callable[[], Sequence[int]]) -> None:
        self.ids = ids
        self._make_starts = starts
        self._starts: Sequence[int] | None = None

    @property
    def starts(self) -> Sequence[int]:
        """Character offset in the text where each token starts, non-decreasing (exact or a close estimate)."""
        if self._starts is None:
            self._starts = self._make_starts()
        return self._starts


class Tokenizer(Protocol):
    """The engine's tokenizer as the prompt builder and the token-aware batcher use it.

    `chat_token_ids(m)` must equal `encode(render_chat(m)).ids`: the builder renders once and tokenises once.
    """

    def chat_token_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of the chat, rendered with the model's chat template and the assistant turn opened."""
        ...

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The chat as text, rendered with the model's chat template and the assistant turn opened."""
        ...

    def encode(self, text: str) -> Encoded:
        """Token ids of rendered text, control-token strings recognised exactly as in `chat_token_ids`."""
        ...

    @property
    def control_tokens(self) -> frozenset[str]:
        """Strings this tokenizer turns into control tokens (role markers, end of turn, …): untrusted text must never
        contain them, or it could open a turn of its own."""
        ...

    @property
    def control_token_ids(self) -> frozenset[int]:
        """The ids of `control_tokens`."""
        ...

    def count(self, text: str) -> int:
        """Tokens in a piece of plain text (no special tokens)."""
        ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of `text` that is at most `max_tokens` tokens."""
        ...


class BatchTokenizer(Tokenizer, Protocol):
    """A tokenizer that encodes many texts in one call, outside the interpreter (a Rust tokenizer releases the GIL
    for the batch): the prompt builder's path for a whole intake chunk. Optional: see encode_batch()."""

    def encode_batch(self, texts: Sequence[str]) -> list[Encoded]:
        """`[encode(text) for text in texts]`, the same ids and starts, in one call."""
        ...


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list[Encoded]:
    """The texts' encodings: in one call where the tokenizer has encode_batch, else one encode() each."""
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is None:
        return [tokenizer.encode(text) for text in texts]
    return list(batch(texts)) if texts else []


@dataclass(frozen=True)
class Prompt:
    """One event, its results packed to fit the context, rendered for the engine."""

    event: "SearchEvent"  # results as packed into the prompt (cut where the budget required)
    messages: tuple[ChatMessage, ...]
    token_ids: tuple[int, ...]
    language: str
    results_used: int
    results_truncated: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int


class EventGenerationError(RecordError):
    """The engine produced nothing usable for one event (e.g. vLLM's empty "length" answer to an over-long prompt)."""


class EmptySummaryError(EventGenerationError):
    """The engine returned an empty or whitespace-only summary."""


class EngineStartupError(StartupError):
    """The engine cannot start with this configuration; the message names the settings to change."""


@runtime_checkable
class Engine(Protocol):
    kind: str  # extractive | transformers | vllm
    model: str  # what the summary's `model` field records
    tokenizer: Tokenizer

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation | EventGenerationError]:
        """One call for the whole micro-batch; one entry per prompt, in input order.

        A per-event failure is returned in that event's place; an exception raised means the batch as a whole
        failed (the isolation layer then finds the event that caused it).
        """
        ...

    def capacity(self) -> "CapacityPlan | None":
        """How much fits at once on this engine's device, or None where memory does not bound batching."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class InFlightBudget:
    """How much work an engine can hold at once without preempting: sequences, and KV-cache tokens (prompt +
    max new tokens of every request in flight). From what the engine really allocated, once it has started.

    `block_size`: the engine allocates KV cache in blocks of this many tokens per sequence (vLLM: 16), so a
    request really holds its token count rounded up to a whole block; `request_tokens` does that rounding.
    """

    max_sequences: int
    kv_tokens: int
    block_size: int = 1

    def admits(self, sequences: int, tokens: int) -> bool:
        return sequences <= self.max_sequences and tokens <= self.kv_tokens

    def request_tokens(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """KV tokens one request can come to hold: its prompt and every token it may generate, in whole blocks."""
        tokens = prompt_tokens + max_new_tokens
        return -(-tokens // self.block_size) * self.block_size


@dataclass(frozen=True)
class Finished:
    """One request that finished in a step(): its id and its outcome (a summary, or this event's failure)."""

    request_id: str
    outcome: "Generation | EventGenerationError"


@runtime_checkable
class StreamingEngine(Engine, Protocol):
    """An engine that takes requests one at a time and finishes them out of order (vLLM's add_request/step).

    GENERATION_MODE=continuous needs it; engines without it run in micro_batch mode only. The engine is not
    thread-safe: one thread (processor.continuous.ContinuousFeed) makes every call, and generate() must not run
    while requests added here are unfinished (vLLM's generate() would step, and return, them too).

    Failures, by scope:
    * one request: add_request() raises EventGenerationError (the engine refused this prompt before running
      it, e.g. current vLLM's ValueError for a prompt longer than max_model_len → PromptIgnoredError; the
      request is then not in flight), or step() returns its Finished with an EventGenerationError outcome
      (vLLM 0.6.3's empty "length" answer to an over-long prompt, an aborted or errored request);
    * the engine: any other exception from add_request() or step(); every request in flight is then
      unaccounted for and the caller must treat the engine as suspect (probe it before trusting it again).
    """

    def add_request(self, request_id: str, prompt: Prompt) -> None:
        """Queue one prompt under a caller-chosen id (unique among unfinished requests); it runs beside whatever
        is already in flight. Raises EventGenerationError if the engine refuses this one prompt."""
        ...

    def step(self) -> list[Finished]:
        """One engine iteration. Returns the requests that finished in it, in any order, each exactly once.
        Raising means the engine failed as a whole (every request in flight is then unaccounted for)."""
        ...

    def abort(self, request_ids: Iterable[str]) -> None:
        """Drop requests (their partition was revoked); unknown or finished ids are ignored. No Finished is
        returned for an aborted request afterwards."""
        ...

    def has_unfinished(self) -> bool:
        """Whether any request added is still unfinished (stepping is needed to finish it)."""
        ...

    def in_flight_budget(self) -> InFlightBudget | None:
        """Sequences and KV tokens the engine holds at once without preempting, from what it really allocated,
        or None where memory does not bound it."""
        ...


@runtime_checkable
class ShortGeneration(Protocol):
    """An engine that can generate a few tokens only: the warm-up needs the engine's kernels and batch shape, not a
    summary, and a warm-up at SAMPLING_MAX_TOKENS on a CPU would take minutes."""

    def generate_short(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[Generation | EventGenerationError]:
        """generate(), each prompt stopping after at most max_new_tokens."""
        ...


def supports_streaming(engine: Engine) -> bool:
    return isinstance(engine, StreamingEngine)


class CallClock:
    """When the engine call running now started: a hung call (ENGINE_CALL_TIMEOUT_S) is told from a busy engine
    by how long one call has not returned, not by how long the work in hand takes in all (a bisection is many
    calls). Written by the engine's one thread, read by any."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: float | None = None

    def running_for(self) -> float:
        """Seconds the call running now has not returned; 0.0 between calls."""
        since = self._since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        outermost = self._since is None  # an engine calling itself (step() → generate()) is one call
        if outermost:
            self._since = self._clock()
        try:
            return fn(*args)
        finally:
            if outermost:
                self._since = None


class TimedEngine:
    """An engine whose calls are timed on a CallClock; everything else is the engine's own."""

    _TIMED = frozenset({"generate", "generate_short", "add_request", "step", "abort"})

    def __init__(self, engine: Engine, clock: CallClock) -> None:
        self.engine = engine
        self.clock = clock

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.engine, name)
        if name not in self._TIMED:
            return attribute
        return lambda *args: self.clock.call(attribute, *args)
