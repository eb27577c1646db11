"""Output records: a summary per generated event, a dead letter per failed record, and the one parser of a dead
letter that the loop's logging, the metrics and `consume --dlq` share.

A dead letter keeps the input's key and value untouched (an operator can re-publish them) and says why in
`dlq.*` headers. Only the worker writes that namespace: an input header named `dlq.…` is carried as
`input.dlq.…`, never parsed, so a record cannot spoof its own reason. The reason is the error's class when it is a
known record error, else `UnexpectedError`: a bounded set, safe as a metric label.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from processor import __version__
from processor.batcher import BatchItem, SourceRecord
from processor.engines.base import Generation
from processor.errors import RecordError

DLQ_HEADER_PREFIX = "dlq."
RENAMED_INPUT_PREFIX = "input."
UNEXPECTED_REASON = "UnexpectedError"
MAX_ERROR_MESSAGE_CHARS = 2000
# The producer's message.max.bytes (Kafka's broker default too); a dead letter whose value would pass it is
# published without the value.
DEFAULT_MAX_RECORD_BYTES = 1_000_000
_HEADER_ALLOWANCE = 16_384  # our dlq.* headers plus the input's own, generously


@dataclass(frozen=True)
class OutgoingRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    source: SourceRecord
    reason: str | None = None  # set on dead letters: the bounded error class

    @property
    def is_dead_letter(self) -> bool:
        return self.reason is not None

    def without_value(self) -> "OutgoingRecord":
        """The same dead letter with its value left out, flagged, for a value the broker will not take."""
        size = len(self.value or b"")
        headers = [(k, v) for k, v in self.headers if k not in (f"{DLQ_HEADER_PREFIX}value_omitted",)]
        headers.append((f"{DLQ_HEADER_PREFIX}value_omitted", f"too large: {size} bytes".encode()))
        return OutgoingRecord(self.topic, self.key, None, headers, self.source, self.reason)


def reason_of(error: BaseException) -> str:
    """The bounded label of a failure: a RecordError's class name, else UnexpectedError."""
    return type(error).__name__ if isinstance(error, RecordError) else UNEXPECTED_REASON


def _safe_input_headers(headers: Iterable[tuple[str, bytes | None]]) -> list[tuple[str, bytes | None]]:
    kept = []
    for name, value in headers:
        if name.lower().startswith(DLQ_HEADER_PREFIX):
            name = RENAMED_INPUT_PREFIX + name
        kept.append((name, value))
    return kept


def dead_letter(
    source: SourceRecord,
    error: BaseException,
    dlq_topic: str,
    *,
    event_id: str | None = None,
    now: datetime | None = None,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> OutgoingRecord:
    reason = reason_of(error)
    message = str(error) or reason
    if reason == UNEXPECTED_REASON:
        message = f"{type(error).__name__}: {message}"
    fields: dict[str, Any] = {
        "error_class": reason,
        "error_message": message[:MAX_ERROR_MESSAGE_CHARS],
        "source_topic": source.topic,
        "source_partition": source.partition,
        "source_offset": source.offset,
        "source_timestamp_ms": source.timestamp_ms,
        "event_id": event_id,
        "processor_version": __version__,
        "failed_at": (now or datetime.now(timezone.utc)).isoformat(timespec="milliseconds"),
    }
    headers: list[tuple[str, bytes | None]] = [
        (DLQ_HEADER_PREFIX + name, str(value).encode()) for name, value in fields.items() if value is not None
    ]
    headers += _safe_input_headers(source.headers)  # the producer's own headers (trace ids) after ours
    record = OutgoingRecord(dlq_topic, source.key, source.value, headers, source, reason)
    if len(source.value or b"") + len(source.key or b"") + _HEADER_ALLOWANCE > max_record_bytes:
        return record.without_value()
    return record


def parse_dead_letter(key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, Any]:
    """A dead letter as a dict: the worker's dlq.* fields (ints where numeric), the original key and value."""
    fields: dict[str, Any] = {}
    for name, raw in headers or ():
        if name.startswith(DLQ_HEADER_PREFIX) and raw is not None and name[len(DLQ_HEADER_PREFIX):] not in fields:
            fields[name[len(DLQ_HEADER_PREFIX):]] = raw.decode("utf-8", errors="replace")
    for numeric in ("source_partition", "source_offset", "source_timestamp_ms"):
        if numeric in fields:
            try:
                fields[numeric] = int(fields[numeric])
            except ValueError:
                pass
    fields["original_key"] = key
    fields["original_value"] = value
    return fields


class RecordBuilder:
    """Summaries and dead letters for finished work, with the lineage every downstream consumer needs."""

    def __init__(
        self,
        *,
        encode_summary: Callable[[dict[str, Any]], bytes],
        output_topic: str,
        dlq_topic: str,
        engine_kind: str,
        model: str,
        prompt_version: str,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        citations: Callable[[Any, str], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.encode_summary = encode_summary
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic
        self.engine_kind = engine_kind
        self.model = model
        self.prompt_version = prompt_version
        self.max_record_bytes = max_record_bytes
        self.citations = citations

    def for_item(self, item: BatchItem, outcome: Generation | BaseException | None, now: datetime | None = None) -> OutgoingRecord:
        """The record for one finished item: its summary, or its dead letter (item.error, or a failed outcome)."""
        now = now or datetime.now(timezone.utc)
        failure = item.error if item.error is not None else outcome
        if isinstance(failure, Generation):
            return self.summary(item, failure, now)
        if failure is None:
            raise ValueError("an item without an error needs an outcome")
        return dead_letter(item.source, failure, self.dlq_topic, event_id=item.event_id, now=now, max_record_bytes=self.max_record_bytes)

    def summary(self, item: BatchItem, generation: Generation, now: datetime) -> OutgoingRecord:
        assert item.prompt is not None
        event = item.prompt.event
        source = item.source
        text = generation.text.strip()
        record: dict[str, Any] = {
            "event_id": event.event_id,
            "query": event.query,
            "summary": text,
            "language": item.prompt.language,
            "engine": self.engine_kind,
            "model": self.model,
            "prompt_version": self.prompt_version,
            "finish_reason": generation.finish_reason,
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "results_used": item.prompt.results_used,
            "results_truncated": item.prompt.results_truncated,
            "source_topic": source.topic,
            "source_partition": source.partition,
            "source_offset": source.offset,
            "collected_at": event.collected_at,
            "processed_at": now,
            "processor_version": __version__,
        }
        if self.citations is not None:
            record["citations"] = self.citations(event, text)
        # Same key as the input, so per-key order and partitioning hold downstream.
        key = source.key if source.key is not None else event.event_id.encode()
        return OutgoingRecord(self.output_topic, key, self.encode_summary(record), [("event_id", event.event_id.encode())], source)
