"""Intake: a consumed message → its source record → a batch item (a prompt for the engine, or this record's error).

Whether a failure is the record's or the infrastructure's is decided here, by the error's family: a RecordError
(undecodable, invalid, too long, too large) becomes the item's error and later its dead letter; an
InfrastructureError (the Schema Registry unreachable) propagates, so the worker holds and retries the record
instead of dead-lettering it. Past decoding, the work is pure computation on the record's own data, so anything
else that goes wrong there is this record's fault too (dead-lettered as UnexpectedError, never a crash).
"""

from __future__ import annotations

from typing import Sequence

from confluent_kafka import Message

from processor.source import BatchItem, SourceRecord
from processor.codec import EVENT_SCHEMA, Codec, SerializationContext
from processor.errors import InfrastructureError, RecordError, RecordTooLargeError, UnreadableHeadersError
from processor.engines.base import Prompt
from processor.events import SearchEvent, validate_event
from processor.prompt import PromptBuilder


def source_of(message: Message, epoch: int) -> SourceRecord:
    """The message as a source record. Never raises for the record's own content: headers that cannot be read
    (confluent-kafka raises UnicodeDecodeError for a header name that is not UTF-8) are left out and the reason
    kept, so that intake dead-letters the record instead of the worker crash-looping on it."""
    timestamp_type, timestamp = message.timestamp()
    unreadable: str | None = None
    try:
        headers = tuple(message.headers() or ())
    except Exception as exc:  # noqa: BLE001 - whatever the client raises for this record's headers is the record's fault
        headers, unreadable = (), f"{type(exc).__name__}: {exc}"[:500]
    return SourceRecord(
        message.topic(),
        message.partition(),
        message.offset(),
        message.key(),
        message.value(),
        timestamp if timestamp_type else None,
        headers,
        epoch,
        unreadable,
    )


class Intake:
    def __init__(self, *, codec: Codec, prompts: PromptBuilder, max_event_bytes: int) -> None:
        self.codec = codec
        self.prompts = prompts
        self.max_event_bytes = max_event_bytes

    def prepare(self, source: SourceRecord) -> BatchItem:
        """Everything between bytes and prompt. Raises only InfrastructureError."""
        items, stopped = self.prepare_many([source])
        if stopped is not None:
            raise stopped
        return items[0]

    def prepare_many(self, sources: Sequence[SourceRecord]) -> tuple[list[BatchItem], InfrastructureError | None]:
        """`prepare` for each source in order, the prompts built together (one tokenizer call for the chunk, outside
        the interpreter): the items of sources[:len(items)], and the InfrastructureError that stopped at the next
        source (None when every one was prepared). A record's own failure is its item's error, as in prepare."""
        staged: list[tuple[SourceRecord, str | None, SearchEvent | Exception]] = []
        stopped: InfrastructureError | None = None
        for source in sources:
            event_id: str | None = None
            try:
                if source.unreadable_headers is not None:
                    raise UnreadableHeadersError(f"the record's headers cannot be read: {source.unreadable_headers}")
                if source.value is not None and len(source.value) > self.max_event_bytes:
                    raise RecordTooLargeError(f"value is {len(source.value)} bytes, over MAX_EVENT_BYTES={self.max_event_bytes}")
                record = self.codec.deserialize(source.value, SerializationContext(source.topic, EVENT_SCHEMA))
                event_id = record.get("event_id") if isinstance(record.get("event_id"), str) else None
                staged.append((source, event_id, validate_event(record)))
            except InfrastructureError as exc:
                stopped = exc
                break
            except Exception as exc:  # noqa: BLE001 - this record's own failure (see _failed)
                staged.append((source, event_id, exc))
        prompts = iter(self.prompts.build_many([event for _, _, event in staged if not isinstance(event, Exception)]))
        items: list[BatchItem] = []
        for source, event_id, event in staged:
            outcome = event if isinstance(event, Exception) else next(prompts)
            if isinstance(outcome, InfrastructureError):
                return items, outcome
            items.append(BatchItem(source, prompt=outcome) if isinstance(outcome, Prompt) else _failed(source, event_id, outcome))
        return items, stopped


def _failed(source: SourceRecord, event_id: str | None, exc: Exception) -> BatchItem:
    """A RecordError (undecodable, invalid, too long, too large) is the record's, as is anything else past decoding:
    pure computation on this record's data (dead-lettered as UnexpectedError, never a crash)."""
    if isinstance(exc, RecordError):
        return BatchItem(source, error=exc.with_source(source), decoded_event_id=event_id)
    return BatchItem(source, error=exc, decoded_event_id=event_id)
