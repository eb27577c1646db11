"""The types every stage carries: where a consumed record came from (`SourceRecord`) and what intake made of it
(`BatchItem`: a prompt for the engine, or the record's own error). A leaf: nothing in processor/ is imported at run
time, so every stage can import it without closing a cycle.

An item with an error is the pipeline's one "skip" marker (arroyo's FilteredPayload): it passes every stage in its
place — micro-batches carry it, the continuous scheduler hands it straight back — so it is dead-lettered and its
offset committed in order, without ever reaching the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from processor.engines.base import Prompt

TP = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True)
class SourceRecord:
    """Where a consumed record came from, and its original bytes (kept for the DLQ and lineage)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None
    headers: tuple[tuple[str, bytes], ...] = ()
    epoch: int = 0  # the partition's assignment epoch when consumed; stale after a revoke
    # Why the headers could not be read (a header name that is not UTF-8, say), else None; `headers` is then empty.
    unreadable_headers: str | None = None

    @property
    def tp(self) -> TP:
        return (self.topic, self.partition)


@dataclass(frozen=True)
class BatchItem:
    source: SourceRecord
    prompt: "Prompt | None" = None
    error: Exception | None = None  # set when the record failed before the engine: the skip marker
    decoded_event_id: str | None = None  # known for records that decoded but failed later

    @property
    def skips_engine(self) -> bool:
        """Failed before the engine: its dead letter is built in its place in the order, without generation."""
        return self.prompt is None

    @property
    def event_id(self) -> str | None:
        return self.prompt.event.event_id if self.prompt else self.decoded_event_id

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.prompt_tokens if self.prompt else 0
