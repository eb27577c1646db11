"""The engine protocol: what the loop needs from any summariser (extractive, Transformers, vLLM).

The loop sees only `Engine`; it never knows which one it runs. Prompts arrive already rendered to the engine's
own token ids, so the count the batcher used is exactly what the model sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from processor.capacity import CapacityPlan
    from processor.events import SearchEvent


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str


class Tokenizer(Protocol):
    """The engine's tokenizer as the prompt builder and the token-aware batcher use it."""

    def chat_token_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of the chat, rendered with the model's chat template and the assistant turn opened."""
        ...

    def count(self, text: str) -> int:
        """Tokens in a piece of plain text (no special tokens)."""
        ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of `text` that is at most `max_tokens` tokens."""
        ...


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


class EngineError(Exception):
    """The engine failed; the message says whether it is this event's fault or the engine's."""


class EventGenerationError(EngineError):
    """The engine produced nothing usable for one event (e.g. vLLM's empty "length" answer to an over-long prompt)."""


class EmptySummaryError(EventGenerationError):
    """The engine returned an empty or whitespace-only summary."""


class EngineStartupError(EngineError):
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
