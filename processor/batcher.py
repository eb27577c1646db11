"""Micro-batcher: groups consumed records into batches for one engine call.

A batch closes at BATCH_MAX_RECORDS events, BATCH_MAX_WAIT_MS after its first record, or when the next event's
prompt would take it past BATCH_MAX_PROMPT_TOKENS — whichever comes first. Records that failed before the
engine (undecodable, invalid, too long) ride along in the batch so that their dead-letter record is published
and their offset committed together with the batch they were consumed in; they count towards no limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from processor.engines.base import Prompt
from processor.source import BatchItem, SourceRecord


@dataclass
class Batch:
    items: list[BatchItem] = field(default_factory=list)
    opened_at: float = 0.0
    prompt_tokens: int = 0
    events: int = 0

    def add(self, item: BatchItem) -> None:
        self.items.append(item)
        if item.prompt is not None:
            self.events += 1
            self.prompt_tokens += item.prompt_tokens

    @property
    def prompts(self) -> list[Prompt]:
        return [item.prompt for item in self.items if item.prompt is not None]

    def next_offsets(self) -> dict[tuple[str, int], int]:
        """Per partition, the offset to commit once this batch is done: last consumed offset + 1."""
        offsets: dict[tuple[str, int], int] = {}
        for item in self.items:
            key = (item.source.topic, item.source.partition)
            offsets[key] = max(offsets.get(key, -1), item.source.offset + 1)
        return offsets

    def without(self, keep: Callable[[SourceRecord], bool]) -> "Batch":
        kept = Batch(opened_at=self.opened_at)
        for item in self.items:
            if keep(item.source):
                kept.add(item)
        return kept

    def __len__(self) -> int:
        return len(self.items)


class MicroBatcher:
    def __init__(
        self,
        max_records: int,
        max_wait_s: float,
        max_prompt_tokens: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_records < 1 or max_prompt_tokens < 1 or max_wait_s < 0:
            raise ValueError("batch limits must be positive")
        self.max_records = max_records
        self.max_wait_s = max_wait_s
        self.max_prompt_tokens = max_prompt_tokens
        self._clock = clock
        self._open: Batch | None = None

    @property
    def pending(self) -> int:
        return len(self._open) if self._open else 0

    @property
    def room(self) -> int:
        """Events the open batch can still take before it closes by count."""
        return self.max_records - (self._open.events if self._open else 0)

    def add(self, item: BatchItem) -> list[Batch]:
        """Add one item; return the batches this closed (the open one, when the item would overflow it)."""
        closed: list[Batch] = []
        if (
            self._open is not None
            and item.prompt is not None
            and self._open.events > 0
            and self._open.prompt_tokens + item.prompt_tokens > self.max_prompt_tokens
        ):
            closed.append(self._close())
        if self._open is None:
            self._open = Batch(opened_at=self._clock())
        self._open.add(item)
        # Failed records count towards no limit, but a flood of them must not grow one batch without bound.
        if self._open.events >= self.max_records or len(self._open) >= 8 * self.max_records:
            closed.append(self._close())
        return closed

    def due(self) -> Batch | None:
        """The open batch, closed, if BATCH_MAX_WAIT_MS has passed since its first record."""
        if self._open is not None and self._clock() - self._open.opened_at >= self.max_wait_s:
            return self._close()
        return None

    def seconds_until_due(self) -> float | None:
        if self._open is None:
            return None
        return max(0.0, self._open.opened_at + self.max_wait_s - self._clock())

    def drop(self, keep: Callable[[SourceRecord], bool]) -> int:
        """Forget open items whose source no longer passes `keep` (their partition was revoked)."""
        if self._open is None:
            return 0
        before = len(self._open)
        self._open = self._open.without(keep)
        dropped = before - len(self._open)
        if not self._open.items:
            self._open = None
        return dropped

    def _close(self) -> Batch:
        batch, self._open = self._open, None
        assert batch is not None
        return batch
