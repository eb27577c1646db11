"""Output records: a summary per generated event, a dead letter per failed record, and the parser of a dead letter
as it arrives on the topic (`consume --dlq`). The worker itself never parses its own headers back: the reason,
event id and message travel on the OutgoingRecord.

A dead letter keeps the input's key and value untouched (an operator can re-publish them) and says why in
`dlq.*` headers. Only the worker writes that namespace: an input header named `dlq.…` is carried as
`input.dlq.…`, never parsed, so a record cannot spoof its own reason. The reason is the error's class when it is a
known record error, else `UnexpectedError`: a bounded set, safe as a metric label.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from processor import __version__
from processor.source import BatchItem, SourceRecord
from processor.engines.base import Generation
from processor.errors import OutputTooLargeError, RecordError
from processor.guards import guard_summary
from processor.quality import Quality, assess

DLQ_HEADER_PREFIX = "dlq."
RENAMED_INPUT_PREFIX = "input."
UNEXPECTED_REASON = "UnexpectedError"
MAX_ERROR_MESSAGE_CHARS = 2000
# The producer's message.max.bytes (Kafka's broker default too). Every output is sized as a whole against it before
# it is produced, the way librdkafka sizes it, and shrunk (flagged) when it would not fit: the producer refuses a
# record over it at produce(), and refusing the same record again on every restart would be a crash loop.
DEFAULT_MAX_RECORD_BYTES = 1_000_000
# librdkafka's framing of one record besides key, value and headers (RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD): length,
# attributes, timestamp and offset deltas, key and value lengths, header count, each at its widest varint.
RECORD_FRAMING_BYTES = 36
# A dead letter carries the input's own headers (trace ids) up to this many bytes; the rest are left out, flagged.
INPUT_HEADER_ALLOWANCE = 64 * 1024
SUMMARY_QUERY_TRUNCATED_HEADER = "query_truncated"


def _varint_bytes(n: int) -> int:
    """Bytes of Kafka's zigzag varint for n (header name and value lengths; -1 for a null value)."""
    n = (n << 1) ^ (n >> 63)
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def headers_bytes(headers: Iterable[tuple[str, bytes | None]]) -> int:
    total = 0
    for name, value in headers:
        name_bytes = len(name.encode("utf-8", "replace"))
        total += _varint_bytes(name_bytes) + name_bytes + (_varint_bytes(len(value)) + len(value) if value is not None else 1)
    return total


def record_bytes(key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes | None]]) -> int:
    """A record's size as librdkafka checks it against message.max.bytes: framing + key + value + headers."""
    return RECORD_FRAMING_BYTES + len(key or b"") + len(value or b"") + headers_bytes(headers)


def _flagged(headers: list[tuple[str, bytes | None]], name: str, text: str) -> list[tuple[str, bytes | None]]:
    return [(k, v) for k, v in headers if k != name] + [(name, text.encode())]


@dataclass(frozen=True)
class OutgoingRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    source: SourceRecord
    reason: str | None = None  # set on dead letters: the bounded error class
    event_id: str | None = None  # the event's id where it was decoded that far
    # What was cut or left out so that the record fits message.max.bytes ("query", "value", "key", "input_headers"),
    # in the order it happened; each is flagged in a header too, for the consumers of the topic.
    shrunk: tuple[str, ...] = ()
    error_message: str | None = None  # set on dead letters: what went wrong, as its dlq.error_message header says
    quality: "Quality | None" = None  # a summary's quality signals, for the metrics once it is acknowledged

    @property
    def is_dead_letter(self) -> bool:
        return self.reason is not None

    @property
    def size(self) -> int:
        return record_bytes(self.key, self.value, self.headers)

    def without_value(self) -> "OutgoingRecord":
        """The same dead letter with its value left out, flagged, for a value the broker will not take."""
        headers = _flagged(self.headers, f"{DLQ_HEADER_PREFIX}value_omitted", f"too large: {len(self.value or b'')} bytes")
        return replace(self, value=None, headers=headers, shrunk=self.shrunk + ("value",))

    def without_key(self) -> "OutgoingRecord":
        """The same dead letter with its key left out, flagged (a key over the size limit can be carried by nothing)."""
        headers = _flagged(self.headers, f"{DLQ_HEADER_PREFIX}key_omitted", f"too large: {len(self.key or b'')} bytes")
        return replace(self, key=None, headers=headers, shrunk=self.shrunk + ("key",))

    def without_input_headers(self) -> "OutgoingRecord":
        """The same dead letter without the input's own headers (everything but the worker's dlq.* ones), flagged."""
        ours = [(k, v) for k, v in self.headers if k.startswith(DLQ_HEADER_PREFIX)]
        theirs = [(k, v) for k, v in self.headers if not k.startswith(DLQ_HEADER_PREFIX)]
        headers = _flagged(ours, f"{DLQ_HEADER_PREFIX}input_headers_omitted",
                           f"{len(theirs)} input header(s), {headers_bytes(theirs)} bytes: too large")
        return replace(self, headers=headers, shrunk=self.shrunk + ("input_headers",))

    def smaller(self) -> "OutgoingRecord | None":
        """This dead letter with its largest part left out (value, key or the input's headers); None for a summary or
        when only the worker's own headers are left."""
        if not self.is_dead_letter:
            return None
        theirs = [(k, v) for k, v in self.headers if not k.startswith(DLQ_HEADER_PREFIX)]
        parts = [(len(self.value), self.without_value) if self.value is not None else None,
                 (len(self.key), self.without_key) if self.key is not None else None,
                 (headers_bytes(theirs), self.without_input_headers) if theirs else None]
        candidates = [part for part in parts if part is not None]
        if not candidates:
            return None
        return max(candidates, key=lambda part: part[0])[1]()

    def fitted(self, max_bytes: int) -> "OutgoingRecord":
        """This dead letter shrunk, largest part first, until it fits `max_bytes` (or nothing is left to drop)."""
        record = self
        while record.size > max_bytes:
            smaller = record.smaller()
            if smaller is None:
                break
            record = smaller
        return record


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
    shrunk: tuple[str, ...] = ()
    if source.unreadable_headers is not None:
        headers.append((f"{DLQ_HEADER_PREFIX}input_headers_omitted", f"unreadable: {source.unreadable_headers}".encode()))
        shrunk = ("input_headers",)
    kept, left_out = _within_allowance(_safe_input_headers(source.headers), INPUT_HEADER_ALLOWANCE)
    if left_out:
        headers.append((f"{DLQ_HEADER_PREFIX}input_headers_omitted",
                        f"{len(left_out)} input header(s), {headers_bytes(left_out)} bytes: over the "
                        f"{INPUT_HEADER_ALLOWANCE}-byte allowance".encode()))
        shrunk = ("input_headers",)
    headers += kept  # the producer's own headers (trace ids) after ours
    record = OutgoingRecord(dlq_topic, source.key, source.value, headers, source, reason, event_id, shrunk,
                            error_message=fields["error_message"])
    return record.fitted(max_record_bytes)


def _within_allowance(headers: list[tuple[str, bytes | None]], allowance: int) -> tuple[list[tuple[str, bytes | None]], list[tuple[str, bytes | None]]]:
    """The headers that fit `allowance` bytes, in order, and those left out (from the first that does not fit on)."""
    used = 0
    for index, header in enumerate(headers):
        used += headers_bytes([header])
        if used > allowance:
            return headers[:index], headers[index:]
    return headers, []


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
        # Loops trimmed and a cut-off end tidied here, where both generation modes and every engine meet; the
        # signals say what was done (schema v3's quality: a writer schema without the field ignores it).
        guarded = guard_summary(generation.text, generation.finish_reason)
        text = guarded.text
        quality = assess(item.prompt, text, generation.finish_reason, guarded)
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
            "quality": quality.as_record(),
        }
        if self.citations is not None:
            record["citations"] = self.citations(event, text)
        # Same key as the input, so per-key order and partitioning hold downstream.
        key = source.key if source.key is not None else event.event_id.encode()
        headers: list[tuple[str, bytes | None]] = [("event_id", event.event_id.encode())]
        summary = OutgoingRecord(self.output_topic, key, self.encode_summary(record), headers, source, event_id=event.event_id,
                                 quality=quality)
        if summary.size <= self.max_record_bytes:
            return summary
        # Too large as a whole. The query is the one unbounded text a summary carries (the summary's own length is
        # bounded by SAMPLING_MAX_TOKENS, citations by the results it cites): cut it to what fits, and say so.
        query = event.query.encode("utf-8", "replace")
        headers = headers + [(SUMMARY_QUERY_TRUNCATED_HEADER, f"from {len(query)} bytes".encode())]
        without_query = record_bytes(key, self.encode_summary({**record, "query": ""}), headers)
        room = self.max_record_bytes - without_query - 8  # the query's length varint grows with it: at most 5 bytes
        if room > 0:
            record["query"] = query[:room].decode("utf-8", "ignore")
            cut = OutgoingRecord(self.output_topic, key, self.encode_summary(record), headers, source,
                                 event_id=event.event_id, shrunk=("query",), quality=quality)
            if cut.size <= self.max_record_bytes:
                return cut
        # Even with no query the summary does not fit: its key (the input's, over the limit) is what is too large.
        # Keyed by something else it would lose per-key order downstream without a word, so the event is
        # dead-lettered instead, saying why (and the dead letter, shrunk in turn, leaves the key out).
        error = OutputTooLargeError(f"the summary is {summary.size} bytes with a {len(key)}-byte key, over "
                                    f"message.max.bytes={self.max_record_bytes} even with its query cut")
        return dead_letter(source, error, self.dlq_topic, event_id=event.event_id, now=now, max_record_bytes=self.max_record_bytes)

    def smaller(self, record: OutgoingRecord) -> OutgoingRecord | None:
        """A record the producer or the broker refused as too large, made smaller (the sink's fallback): a dead
        letter loses its largest part; a summary becomes its event's dead letter (OutputTooLargeError)."""
        if record.is_dead_letter:
            return record.smaller()
        error = OutputTooLargeError(f"{record.topic} refused the summary ({record.size} bytes) as too large")
        return dead_letter(record.source, error, self.dlq_topic, event_id=record.event_id, max_record_bytes=self.max_record_bytes)
