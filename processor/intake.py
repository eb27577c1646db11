"""Intake: a consumed message → its source record → a batch item (a prompt for the engine, or this record's error).

Whether a failure is the record's or the infrastructure's is decided here, by the error's family: a RecordError
(undecodable, invalid, too long, too large) becomes the item's error and later its dead letter; an
InfrastructureError (the Schema Registry unreachable) propagates, so the worker holds and retries the record
instead of dead-lettering it. Past decoding, the work is pure computation on the record's own data, so anything
else that goes wrong there is this record's fault too (dead-lettered as UnexpectedError, never a crash).
"""

from __future__ import annotations

from confluent_kafka import Message

from processor.source import BatchItem, SourceRecord
from processor.codec import EVENT_SCHEMA, Codec, SerializationContext
from processor.errors import InfrastructureError, RecordError, RecordTooLargeError, UnreadableHeadersError
from processor.events import validate_event
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
        event_id: str | None = None
        try:
            if source.unreadable_headers is not None:
                raise UnreadableHeadersError(f"the record's headers cannot be read: {source.unreadable_headers}")
            if source.value is not None and len(source.value) > self.max_event_bytes:
                raise RecordTooLargeError(f"value is {len(source.value)} bytes, over MAX_EVENT_BYTES={self.max_event_bytes}")
            record = self.codec.deserialize(source.value, SerializationContext(source.topic, EVENT_SCHEMA))
            event_id = record.get("event_id") if isinstance(record.get("event_id"), str) else None
            prompt = self.prompts.build(validate_event(record))
            return BatchItem(source, prompt=prompt)
        except InfrastructureError:
            raise
        except RecordError as exc:
            return BatchItem(source, error=exc.with_source(source), decoded_event_id=event_id)
        except Exception as exc:  # noqa: BLE001 - pure computation on this record's data: its failure is the record's
            return BatchItem(source, error=exc, decoded_event_id=event_id)

