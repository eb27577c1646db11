"""Operator tools around the stream: produce JSON lines as Avro events, and read summaries or dead letters back."""

from __future__ import annotations

import base64
import logging
import json
import time
from datetime import datetime
from typing import IO, Any, Iterable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from processor.codec import EVENT_SCHEMA, SUMMARY_SCHEMA, AvroCodec, RegistryCodec
from processor.events import SearchEvent, validate_event
from processor.records import parse_dead_letter

_LIBRDKAFKA_LOG = logging.getLogger("librdkafka")


def produce_events(
    producer_conf: dict[str, Any], topic: str, events: Iterable[dict[str, Any] | SearchEvent], codec: AvroCodec | RegistryCodec | None = None
) -> list[tuple[int, int]]:
    """Validate and encode each event, produce it keyed by event_id; return (partition, offset) of each, in order."""
    codec = codec or AvroCodec()
    producer = Producer({"logger": _LIBRDKAFKA_LOG, **producer_conf, "enable.idempotence": True, "linger.ms": 5})
    delivered: dict[int, tuple[int, int]] = {}
    errors: list[str] = []
    count = 0
    for count, raw in enumerate(events, start=1):
        event = raw if isinstance(raw, SearchEvent) else validate_event(raw)
        record = event.model_dump()
        record["results"] = [dict(r) for r in record["results"]]

        def report(err: KafkaError | None, msg: Any, index: int = count) -> None:
            if err is not None:
                errors.append(err.str())
            else:
                delivered[index] = (msg.partition(), msg.offset())

        while True:
            try:
                producer.produce(topic, codec.encode(record, EVENT_SCHEMA, topic), event.event_id.encode(), on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(60)
    if errors or remaining:
        raise RuntimeError(f"{len(errors) + remaining} event(s) not delivered: {errors[:3]}")
    return [delivered[i] for i in range(1, count + 1)]


def read_json_lines(stream: IO[str]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(stream, start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number}: not JSON ({exc.msg})") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
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
    codec: AvroCodec | RegistryCodec | None = None,
) -> Iterator[dict[str, Any]]:
    """Records from the beginning until `max_records` or `idle_timeout_s` without a record; no group, no commit.

    Stopping on idleness rather than on end offsets keeps this correct on brokers whose watermarks lag (Tansu).
    """
    codec = codec or AvroCodec()
    consumer = Consumer({"logger": _LIBRDKAFKA_LOG, **consumer_conf, "group.id": "ai-worker-reader", "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        if metadata.error is not None:
            raise RuntimeError(f"topic {topic}: {metadata.error.str()}")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
        seen = 0
        last = time.monotonic()
        while time.monotonic() - last < idle_timeout_s and (max_records is None or seen < max_records):
            message = consumer.poll(0.2)
            if message is None or message.error():
                continue
            seen += 1
            last = time.monotonic()
            if dead_letters:
                record = decode_dead_letter(message.key(), message.value(), message.headers())
            else:
                record = codec.decode(message.value(), SUMMARY_SCHEMA, topic)
            yield {k: _jsonable(v) for k, v in record.items()}
    finally:
        consumer.close()
