"""Hostile records through the whole Worker (injected fake clients), in both generation modes: each ends as a dead
letter or a summary and a commit past it, the stream goes on and the worker stops with 0 — never a crash loop.

The fake producer refuses, at produce(), any record whose key + value + headers pass the producer's message.max.bytes
(sized as librdkafka sizes it), as the real one does."""

from __future__ import annotations

import time
from typing import Any

import pytest

from processor.codec import EVENT_SCHEMA, SUMMARY_SCHEMA, AvroCodec
from processor.engines.extractive import ExtractiveEngine
from processor.loop import Worker
from processor.records import DEFAULT_MAX_RECORD_BYTES, parse_dead_letter
from processor.settings import load_settings
from tests.fakes.kafka import FakeGroupConsumer, FakeProducer, librdkafka_size
from tests.helpers import make_event

CODEC = AvroCodec()
MODE = {"mode": "micro_batch"}


@pytest.fixture(autouse=True, params=["micro_batch", "continuous"])
def mode(request: pytest.FixtureRequest) -> str:
    MODE["mode"] = request.param
    return request.param


def run_all(*hostile: tuple[bytes | None, bytes | None, list | None, Exception | None],
            broker_max_bytes: int | None = None) -> tuple[Worker, FakeProducer, FakeGroupConsumer, int]:
    """A good event, then each hostile record followed by a good event; run until every record is committed."""
    consumer = FakeGroupConsumer("in")
    producer = FakeProducer(DEFAULT_MAX_RECORD_BYTES, whole_record=True, broker_max_bytes=broker_max_bytes)
    consumer.add(0, b"good-0", CODEC.encode(make_event(0), EVENT_SCHEMA))
    for n, (key, value, headers, headers_error) in enumerate(hostile, start=1):
        consumer.add(0, key, value, headers, headers_error=headers_error)
        consumer.add(0, f"good-{n}".encode(), CODEC.encode(make_event(100 + n), EVENT_SCHEMA))
    total = 1 + 2 * len(hostile)
    settings = load_settings(generation_mode=MODE["mode"], kafka_input_topic="in", kafka_output_topic="out", kafka_dlq_topic="dlq",
                             batch_max_wait_ms=0, batch_max_records=2, shutdown_timeout_s=5, infrastructure_retry_timeout_s=1.0)
    worker = Worker(settings, ExtractiveEngine(), consumer=consumer, producer=producer)
    deadline = time.monotonic() + 20
    code = worker.run(until=lambda: worker.records_committed >= total or time.monotonic() > deadline)
    assert code == 0
    assert worker.records_committed == total and consumer.commits[-1] == {("in", 0): total}, "committed past every record"
    good = sorted(CODEC.decode(p.value, SUMMARY_SCHEMA)["event_id"] for p in producer.delivered if p.topic == "out" and p.key.startswith(b"good"))
    assert good == sorted(["evt-000000"] + [f"evt-{100 + n:06d}" for n in range(1, len(hostile) + 1)]), "the stream went on"
    assert all(librdkafka_size(p.key, p.value, p.headers) <= DEFAULT_MAX_RECORD_BYTES for p in producer.produced)
    return worker, producer, consumer, code


def dead_letters(producer: FakeProducer) -> list[dict[str, Any]]:
    return [parse_dead_letter(p.key, p.value, p.headers) for p in producer.delivered if p.topic == "dlq"]


def test_a_record_whose_header_names_are_not_utf8_is_dead_lettered_and_committed():
    value = CODEC.encode(make_event(1), EVENT_SCHEMA)
    not_utf8 = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    _worker, producer, _consumer, _code = run_all((b"k1", value, None, not_utf8))
    [dead] = dead_letters(producer)
    assert dead["error_class"] == "UnreadableHeadersError" and dead["input_headers_omitted"].startswith("unreadable: UnicodeDecodeError")
    assert (dead["original_key"], dead["original_value"]) == (b"k1", value), "key and value preserved"


def test_a_summary_over_the_size_limit_is_published_with_its_query_cut_and_flagged():
    padded = "kafka lag" + "\u2063" * 400_000  # ~1.2 MB of invisible separators: the summary carries the raw query
    _worker, producer, _consumer, _code = run_all((b"padded", CODEC.encode(make_event(1, query=padded), EVENT_SCHEMA), None, None))
    [summary] = [p for p in producer.delivered if p.key == b"padded"]
    assert summary.topic == "out" and dict(summary.headers)["query_truncated"] == f"from {len(padded.encode())} bytes".encode()
    assert padded.startswith(CODEC.decode(summary.value, SUMMARY_SCHEMA)["query"])
    assert dead_letters(producer) == []


def test_an_input_key_over_the_size_limit_ends_as_a_dead_letter_without_the_key():
    value = CODEC.encode(make_event(1), EVENT_SCHEMA)
    _worker, producer, _consumer, _code = run_all((b"K" * 1_100_000, value, [("trace", b"t")], None))
    [dead] = dead_letters(producer)
    assert dead["error_class"] == "OutputTooLargeError" and dead["key_omitted"] == "too large: 1100000 bytes"
    assert dead["original_key"] is None and dead["original_value"] == value and dead["event_id"] == "evt-000001"


def test_a_poison_record_with_over_a_megabyte_of_headers_is_dead_lettered_with_its_headers_cut():
    headers = [(f"h{n}", b"x" * 20_000) for n in range(60)]
    _worker, producer, _consumer, _code = run_all((b"poison", b"not avro", headers, None))
    [record] = [p for p in producer.delivered if p.topic == "dlq"]
    dead = parse_dead_letter(record.key, record.value, record.headers)
    assert dead["error_class"] == "BadMagicError" and "input header(s)" in dead["input_headers_omitted"]
    assert (record.key, record.value) == (b"poison", b"not avro")
    assert 0 < len([name for name, _ in record.headers if name.startswith("h")]) < 60


def test_an_event_with_hundreds_of_thousands_of_empty_results_is_dead_lettered_before_it_is_decoded():
    flood = make_event(1)
    flood["results"] = [{"rank": 1, "title": "", "url": "", "snippet": "", "content": None}] * 600_000
    value = CODEC.encode(flood, EVENT_SCHEMA)
    assert len(value) > 2_000_000
    _worker, producer, _consumer, _code = run_all((b"flood", value, None, None))
    [dead] = dead_letters(producer)
    assert dead["error_class"] == "TooManyResultsError" and dead["value_omitted"] == f"too large: {len(value)} bytes"


def test_a_summary_the_output_topic_refuses_as_too_large_is_dead_lettered_and_the_partition_moves_on():
    # The topics' max.message.bytes below the producer's: the broker refuses the long-query summary alone, then its
    # dead letter (which carries the whole event), which goes out a third time without its value.
    value = CODEC.encode(make_event(1, query="why " * 2_000), EVENT_SCHEMA)
    _worker, producer, _consumer, _code = run_all((b"long", value, None, None), broker_max_bytes=6_000)
    assert [p.topic for p in producer.produced if p.key == b"long"] == ["out", "dlq", "dlq"]
    [dead] = dead_letters(producer)
    assert dead["error_class"] == "OutputTooLargeError" and dead["value_omitted"] == f"too large: {len(value)} bytes"
