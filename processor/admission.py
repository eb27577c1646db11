"""The continuous feed's admission bookkeeping (continuous.py runs the thread): what is queued and what is in flight,
each request's cost in KV tokens, and whether the next one fits the engine's budget (InFlightBudget, from the KV cache
vLLM really allocated). A request costs its prompt tokens + max_new_tokens (rounded up to whole KV blocks) and one
sequence, and is admitted while both fit, in submission order; one request is always admitted when nothing is in
flight, so a request larger than the whole budget still runs (alone). Not thread-safe: the feed calls it holding its
condition's lock."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from processor.engines.base import InFlightBudget, Prompt

# Requests queued beyond what fills the budget: enough to refill the engine from the feed's own thread while the
# caller is busy elsewhere (polling, publishing), small enough that abort-on-revoke has little to withdraw.
LOOKAHEAD_MIN = 4
LOOKAHEAD_SHARE = 0.25


class Admission:
    def __init__(self, budget: InFlightBudget | None, *, max_new_tokens: int, max_sequences_default: int = 256,
                 refill_min: int = 1) -> None:
        self.max_new_tokens = max_new_tokens
        self.max_sequences = budget.max_sequences if budget is not None else max_sequences_default
        self.kv_tokens: int | None = budget.kv_tokens if budget is not None else None
        self.block_size = budget.block_size if budget is not None else 1
        # Refill once at least this many sequence slots are free (1: as soon as anything finishes). Larger values
        # let new prompts enter the engine together: on vLLM V1 every step that holds a prefill runs outside the
        # decode CUDA graphs, so one refill per finished request costs a slow step each (bench/vllm_modes.py).
        self.refill_min = max(1, min(refill_min, self.max_sequences))
        self.queue: OrderedDict[str, tuple[Prompt, int]] = OrderedDict()  # submitted, not admitted: id → (prompt, cost)
        self.in_flight: OrderedDict[str, int] = OrderedDict()  # admitted to the engine: id → KV tokens reserved
        self.tokens_in_flight = 0
        self.aborting: set[str] = set()  # in flight, withdrawn by the caller, not yet aborted in the engine
        self.mean_cost = float(2 * max_new_tokens)  # running estimate of a request's cost, for wanted()

    def cost(self, prompt: Prompt) -> int:
        tokens = prompt.prompt_tokens + self.max_new_tokens
        return -(-tokens // self.block_size) * self.block_size

    def enqueue(self, request_id: str, prompt: Prompt, cost: int) -> None:
        if request_id in self.queue or (request_id in self.in_flight and request_id not in self.aborting):
            raise ValueError(f"request {request_id!r} is already submitted and unfinished")
        self.queue[request_id] = (prompt, cost)
        self.mean_cost += (cost - self.mean_cost) * 0.05

    def withdraw(self, request_ids: Iterable[str]) -> None:
        """Queued ones go at once; in-flight ones are marked for the engine's abort."""
        for request_id in request_ids:
            if self.queue.pop(request_id, None) is None and request_id in self.in_flight:
                self.aborting.add(request_id)

    @property
    def live(self) -> int:
        """In flight and not withdrawn."""
        return len(self.in_flight) - len(self.aborting)

    def capacity(self) -> int:
        if self.kv_tokens is None:
            return self.max_sequences
        return min(self.max_sequences, max(1, int(self.kv_tokens // max(1.0, self.mean_cost))))

    def wanted(self) -> int:
        capacity = self.capacity()
        lookahead = max(LOOKAHEAD_MIN, int(capacity * LOOKAHEAD_SHARE))
        return max(0, capacity + lookahead - self.live - len(self.queue))

    def admissible(self) -> bool:
        """Whether the first queued request fits the budget now."""
        if not self.queue:
            return False
        request_id, (_, cost) = next(iter(self.queue.items()))
        if request_id in self.in_flight:
            return False  # the same id is still being aborted: after that
        live = len(self.in_flight)
        if live == 0:
            return True  # always one: a request larger than the whole budget still runs, alone
        if live + 1 > self.max_sequences:
            return False
        return self.kv_tokens is None or self.tokens_in_flight + cost <= self.kv_tokens

    def waits_to_refill(self) -> bool:
        live = len(self.in_flight)
        return bool(live) and self.max_sequences - live < self.refill_min

    def admit_next(self) -> tuple[str, Prompt]:
        request_id, (prompt, cost) = self.queue.popitem(last=False)
        self.in_flight[request_id] = cost
        self.tokens_in_flight += cost
        return request_id, prompt

    def release(self, request_id: str) -> None:
        self.tokens_in_flight -= self.in_flight.pop(request_id, 0)
        self.aborting.discard(request_id)
