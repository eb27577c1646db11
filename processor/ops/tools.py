"""Operator tools around the stream: produce JSON lines as Avro events (or raw bytes, to try the dead-letter path),
and read summaries or dead letters back."""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, Iterable, Iterator, Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from processor.codec import EVENT_SCHEMA, SUMMARY_SCHEMA, AvroCodec, Codec, DecodeError, SerializationContext
from processor.errors import OutputUnavailableError
from processor.events import InvalidEventError, SearchEvent, validate_event
from processor.failures import CommandError
from processor.ops.reachability import cluster_metadata, require_broker, require_topic, translate
from processor.records import parse_dead_letter

_LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
# A produce the broker does not acknowledge within this fails (librdkafka's default, 5 minutes, is for services).
PRODUCE_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class InputLine:
    number: int  # 1-based line number in the input
    event: SearchEvent | None
    error: str | None


def parse_event_lines(stream: IO[str]) -> list[InputLine]:
    """Every non-blank line as a validated event or as the reason it is not one (blank lines are skipped)."""
    parsed = []
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            parsed.append(InputLine(number, validate_event(json.loads(line)), None))
        except json.JSONDecodeError as exc:
            # json counts lines within this one line (always 1): the input's line number is the one to name.
            parsed.append(InputLine(number, None, f"not JSON ({exc.msg} at line {number}, column {exc.colno})"))
        except InvalidEventError as exc:
            parsed.append(InputLine(number, None, f"not an event ({exc})"))
        except (TypeError, AttributeError):
            parsed.append(InputLine(number, None, "not an event (a JSON object with event_id, query, results, collected_at)"))
    return parsed


def _event_record(event: SearchEvent) -> dict[str, Any]:
    record = event.model_dump()
    record["results"] = [dict(r) for r in record["results"]]
    return record


def produce_events(
    producer_conf: dict[str, Any], topic: str, events: Iterable[dict[str, Any] | SearchEvent], codec: Codec | None = None
) -> list[tuple[int, int]]:
    """Validate and encode every event first (an invalid one raises InvalidEventError naming its position, and
    nothing is sent), then produce them keyed by event_id; return (partition, offset) of each, in order."""
    codec = codec or AvroCodec()
    validated = []
    for index, raw in enumerate(events, start=1):
        try:
            validated.append(raw if isinstance(raw, SearchEvent) else validate_event(raw))
        except InvalidEventError as exc:
            raise InvalidEventError(f"event {index}: {exc}; nothing was sent") from None
    messages = [(event.event_id.encode(), codec.serialize(_event_record(event), SerializationContext(topic, EVENT_SCHEMA))) for event in validated]
    return produce_values(producer_conf, topic, messages)


def produce_values(producer_conf: dict[str, Any], topic: str, messages: Sequence[tuple[bytes | None, bytes]]) -> list[tuple[int, int]]:
    """Produce (key, value) pairs as they are; return (partition, offset) of each, in order. Fails fast (one line)
    when no broker answers or the topic does not exist, and names what was not delivered otherwise."""
    bootstrap = str(producer_conf.get("bootstrap.servers"))
    require_broker(producer_conf)  # quietly: with no broker, the one-line error and no librdkafka log before it
    producer = Producer(
        {"logger": _LIBRDKAFKA_LOG, "message.timeout.ms": PRODUCE_TIMEOUT_MS, **producer_conf, "enable.idempotence": True, "linger.ms": 5}
    )
    require_topic(cluster_metadata(producer, bootstrap), topic, "--topic or KAFKA_INPUT_TOPIC", bootstrap)
    delivered: dict[int, tuple[int, int]] = {}
    errors: list[str] = []
    for index, (key, value) in enumerate(messages):

        def report(err: KafkaError | None, msg: Any, index: int = index) -> None:
            if err is not None:
                errors.append(err.str())
            else:
                delivered[index] = (msg.partition(), msg.offset())

        while True:
            try:
                producer.produce(topic, value, key, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(PRODUCE_TIMEOUT_MS / 1000 + 5)
    if errors or remaining:
        missing = len(messages) - len(delivered)
        reason = errors[0] if errors else "no acknowledgement in time"
        raise OutputUnavailableError(
            f"{missing} of {len(messages)} record(s) not delivered to {topic} on {bootstrap} ({reason}); "
            f"the other {len(delivered)} were"
        )
    return [delivered[i] for i in range(len(messages))]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def decode_dead_letter(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None) -> dict[str, Any]:
    return parse_dead_letter(key, value, headers)


def read_topic(
    consumer_conf: dict[str, Any],
    topic: str,
    *,
    dead_letters: bool = False,
    max_records: int | None = None,
    idle_timeout_s: float = 3.0,
    codec: Codec | None = None,
) -> Iterator[dict[str, Any]]:
    """Records from the beginning until `max_records` or `idle_timeout_s` without a record; no group, no commit.

    Stopping on idleness rather than on end offsets keeps this correct on brokers whose watermarks lag (Tansu).
    """
    codec = codec or AvroCodec()
    bootstrap = str(consumer_conf.get("bootstrap.servers"))
    consumer = Consumer({"logger": _LIBRDKAFKA_LOG, **consumer_conf, "group.id": "ai-worker-reader", "enable.auto.commit": False})
    try:
        setting = "--topic or KAFKA_DLQ_TOPIC" if dead_letters else "--topic or KAFKA_OUTPUT_TOPIC"
        partitions = require_topic(cluster_metadata(consumer, bootstrap), topic, setting, bootstrap)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        seen = 0
        last = time.monotonic()
        while time.monotonic() - last < idle_timeout_s and (max_records is None or seen < max_records):
            try:
                message = consumer.poll(0.2)
            except KafkaException as exc:
                raise translate(exc, bootstrap) from None
            if message is None or message.error():
                continue
            seen += 1
            last = time.monotonic()
            if dead_letters:
                record = decode_dead_letter(message.key(), message.value(), message.headers())
            else:
                try:
                    record = codec.deserialize(message.value(), SerializationContext(topic, SUMMARY_SCHEMA))
                except DecodeError as exc:
                    raise CommandError(
                        f"{topic}[{message.partition()}]@{message.offset()} is not a summary this tool can read ({exc}): "
                        "is it the summary topic, written with the same framing (SCHEMA_REGISTRY_URL)? "
                        "Dead letters are read with --dlq"
                    ) from None
            yield {k: _jsonable(v) for k, v in record.items()}
    finally:
        consumer.close()
