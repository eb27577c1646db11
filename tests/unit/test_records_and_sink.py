"""Records (summaries, dead letters, the one dead-letter parser) and the sink (delivery only)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from datetime import datetime, timezone

from processor.source import BatchItem, SourceRecord
from processor.codec import SUMMARY_SCHEMA, AvroCodec, BadMagicError
from processor.engines.base import Generation
from processor.engines.extractive import RegexTokenizer
from processor.errors import OutputUnavailableError, UnreadableHeadersError
from processor.events import validate_event
from processor.prompt import PromptBuilder
from processor.records import INPUT_HEADER_ALLOWANCE, OutgoingRecord, RecordBuilder, dead_letter, parse_dead_letter, reason_of, record_bytes
from processor.sink import Sink
from tests.fakes.kafka import FakeProducer, librdkafka_size
from tests.helpers import make_event


def src(offset: int = 7, headers: tuple = (), value: bytes | None = b"\x00bad", key: bytes | None = b"k") -> SourceRecord:
    return SourceRecord("in", 2, offset, key, value, 1_700_000_000_000, headers, 1)


def test_input_headers_in_the_dlq_namespace_cannot_spoof_or_crash_the_dead_letter():
    hostile = (("dlq.error_class", b"Everything is fine"), ("DLQ.error_message", None), ("dlq.source_offset", b"\xff\xfe"),
               ("dlq.x", b"\xc3\x28"), ("trace", b"abc"), ("empty", None))
    record = dead_letter(src(headers=hostile), BadMagicError("not avro"), "dlq")
    parsed = parse_dead_letter(record.key, record.value, record.headers)
    assert parsed["error_class"] == "BadMagicError" and parsed["error_message"] == "not avro"
    assert parsed["source_offset"] == 7 and parsed["source_partition"] == 2
    ours = [name for name, _ in record.headers if name.lower().startswith("dlq.")]
    assert len(ours) == len(set(ours)), "only the worker's own dlq.* headers, once each"
    assert ("input.dlq.error_class", b"Everything is fine") in record.headers, "renamed, not dropped"
    assert ("input.DLQ.error_message", None) in record.headers and ("trace", b"abc") in record.headers and ("empty", None) in record.headers
    assert record.value == b"\x00bad" and record.key == b"k", "original bytes untouched"


def test_reasons_are_bounded_by_the_error_class():
    assert reason_of(BadMagicError("x")) == "BadMagicError"
    assert reason_of(KeyError("attacker-chosen text")) == "UnexpectedError"
    record = dead_letter(src(), KeyError("boom"), "dlq")
    assert parse_dead_letter(None, None, record.headers)["error_message"].startswith("KeyError")


def test_a_dead_letter_too_large_for_the_producer_goes_out_without_its_value():
    record = dead_letter(src(value=b"x" * 2_000_000), BadMagicError("x"), "dlq", max_record_bytes=1_000_000)
    assert record.value is None
    assert parse_dead_letter(record.key, record.value, record.headers)["value_omitted"] == "too large: 2000000 bytes"
    # the broker's own refusal (compressed size looked fine locally) ends the same way, with no crash loop
    producer = FakeProducer()
    acked: list[OutgoingRecord] = []
    sink = Sink(producer=producer, max_attempts=3, on_acknowledged=acked.append)
    big = dead_letter(src(value=b"y" * 500_000), BadMagicError("x"), "dlq")
    producer.failures.append(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"))
    sink.add([big])
    assert sink.flush(1.0)
    assert acked and acked[0].value is None and "dlq.value_omitted" in dict(acked[0].headers)
    # and refused locally at produce()
    producer = FakeProducer(max_bytes=1000)
    acked.clear()
    sink = Sink(producer=producer, max_attempts=3, on_acknowledged=acked.append)
    sink.add([dead_letter(src(value=b"z" * 5000), BadMagicError("x"), "dlq")])
    assert sink.flush(1.0) and acked[0].value is None


def out(offset: int, key: bytes) -> OutgoingRecord:
    return OutgoingRecord("out", key, f"v{offset}".encode(), [], src(offset, key=key))


def test_resends_keep_per_key_order_and_nothing_new_is_taken_meanwhile():
    producer = FakeProducer()
    sink = Sink(producer=producer, max_attempts=3)
    producer.failures.append(KafkaError(KafkaError._MSG_TIMED_OUT, "timed out", retriable=True))
    sink.add([out(0, b"a"), out(1, b"a")])
    producer.hold = True
    sink.poll()
    producer.hold = False
    producer.poll()  # offset 0 fails, offset 1 is delivered
    assert not sink.accepting, "a failed record waits for its re-send: new records would overtake it"
    sink.poll()
    assert sink.flush(1.0)
    assert [p.value for p in producer.produced] == [b"v0", b"v1", b"v0"]


def test_the_first_permanent_delivery_failure_is_latched_and_raised():
    producer = FakeProducer()
    sink = Sink(producer=producer, max_attempts=2)
    for _ in range(2):
        producer.failures.append(KafkaError(KafkaError._MSG_TIMED_OUT, "timed out", retriable=True))
    sink.add([out(0, b"a")])
    assert not sink.flush(1.0)
    with pytest.raises(OutputUnavailableError, match="after 2 attempt"):
        sink.raise_for_error()


def test_several_failed_deliveries_are_re_sent_in_their_original_order():
    producer = FakeProducer()
    sink = Sink(producer=producer, max_attempts=3)
    timed_out = KafkaError(KafkaError._MSG_TIMED_OUT, "timed out", retriable=True)
    producer.failures.extend([timed_out, timed_out, None, timed_out])  # offsets 0, 1 and 3 fail; 2 is delivered
    sink.add([out(n, b"a") for n in range(4)])
    assert sink.flush(1.0)
    assert [p.value for p in producer.produced] == [b"v0", b"v1", b"v2", b"v3", b"v0", b"v1", b"v3"]



# ------------------------------------------------------------------------------------ outputs sized as a whole
LIMIT = 1_000_000
CODEC = AvroCodec()
NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)


def builder(max_record_bytes: int = LIMIT) -> RecordBuilder:
    return RecordBuilder(encode_summary=lambda r: CODEC.encode(r, SUMMARY_SCHEMA), output_topic="out", dlq_topic="dlq",
                         engine_kind="extractive", model="m", prompt_version="p", max_record_bytes=max_record_bytes)


def item(key: bytes | None = b"k", **event: object) -> BatchItem:
    raw = make_event(1) | event
    source = SourceRecord("in", 0, 5, key, b"\xc3\x01event", 1_700_000_000_000, (("trace", b"t"),), 1)
    return BatchItem(source, prompt=PromptBuilder(RegexTokenizer(), 6144, 1536).build(validate_event(raw)))


GENERATION = Generation("A summary [1].", "stop", 100, 10)


def test_records_are_sized_as_librdkafka_sizes_them():
    from confluent_kafka import KafkaException, Producer

    producer = Producer({"bootstrap.servers": "localhost:1", "message.max.bytes": 10_000, "log_level": 0})
    cases = [(None, []), (b"k" * 100, [("a" * 64, b"x" * 127)]), (b"", [("n" * 63, None), ("", b""), ("h" * 8192, b"y" * 128)])]
    for key, headers in cases:
        room = 10_000 - record_bytes(key, b"", headers)
        for value, fits in ((b"v" * room, True), (b"v" * (room + 1), False)):
            assert record_bytes(key, value, headers) == librdkafka_size(key, value, headers)
            try:
                producer.produce("t", value, key, headers=headers)
                accepted = True
            except KafkaException:
                accepted = False
            assert accepted is fits, (key, headers, len(value))
    producer.purge()


def test_a_summary_whose_query_is_padded_past_the_limit_carries_a_cut_query_and_says_so():
    padded = "why does kafka lag grow" + "\u200b" * 400_000  # ~1.2 MB of zero-width spaces
    record = builder().summary(item(query=padded), GENERATION, NOW)
    assert not record.is_dead_letter and record.shrunk == ("query",)
    assert LIMIT - 16 <= record.size <= LIMIT
    decoded = CODEC.decode(record.value, SUMMARY_SCHEMA)
    assert padded.startswith(decoded["query"]) and decoded["query"].startswith("why does kafka lag grow")
    assert dict(record.headers)["query_truncated"] == f"from {len(padded.encode())} bytes".encode()
    assert record.key == b"k", "still keyed like its input"
    small = builder().summary(item(), GENERATION, NOW)
    assert small.shrunk == () and "query_truncated" not in dict(small.headers)


def test_a_summary_with_an_input_key_over_the_limit_is_dead_lettered_without_the_key():
    record = builder().summary(item(key=b"K" * 1_200_000), GENERATION, NOW)
    assert record.is_dead_letter and record.reason == "OutputTooLargeError" and record.topic == "dlq"
    assert record.key is None and record.value == b"\xc3\x01event" and record.shrunk == ("key",)
    fields = parse_dead_letter(record.key, record.value, record.headers)
    assert fields["key_omitted"] == "too large: 1200000 bytes" and fields["event_id"] == "evt-000001"
    assert record.size <= LIMIT


def test_a_dead_letter_is_sized_as_a_whole_key_and_input_headers_included():
    huge_key = dead_letter(src(key=b"K" * 1_500_000, value=b"small"), BadMagicError("x"), "dlq")
    assert huge_key.key is None and huge_key.value == b"small" and huge_key.shrunk == ("key",)
    # value and key each under the limit, together over it: the larger part goes, the smaller stays
    both = dead_letter(src(key=b"K" * 400_000, value=b"V" * 700_000), BadMagicError("x"), "dlq")
    assert both.value is None and both.key == b"K" * 400_000 and both.shrunk == ("value",) and both.size <= LIMIT
    headers = tuple((f"h{n}", b"x" * 10_000) for n in range(120))  # 1.2 MB of headers on a poison record
    crowded = dead_letter(src(headers=headers), BadMagicError("x"), "dlq")
    kept = [name for name, _ in crowded.headers if not name.startswith("dlq.")]
    assert kept == [f"h{n}" for n in range(len(kept))] and 0 < len(kept) < 120
    assert sum(10_000 + len(name) + 3 for name in kept) <= INPUT_HEADER_ALLOWANCE
    assert crowded.shrunk == ("input_headers",) and crowded.value == b"\x00bad" and crowded.size <= LIMIT
    flag = parse_dead_letter(None, None, crowded.headers)["input_headers_omitted"]
    assert flag.startswith(f"{120 - len(kept)} input header(s)")


def test_a_dead_letter_of_a_record_whose_headers_could_not_be_read_says_so():
    source = SourceRecord("in", 0, 3, b"k", b"v", None, (), 1, "UnicodeDecodeError: invalid start byte")
    record = dead_letter(source, UnreadableHeadersError("headers"), "dlq")
    fields = parse_dead_letter(record.key, record.value, record.headers)
    assert fields["error_class"] == "UnreadableHeadersError"
    assert fields["input_headers_omitted"] == "unreadable: UnicodeDecodeError: invalid start byte"
    assert (record.key, record.value) == (b"k", b"v") and record.shrunk == ("input_headers",)


def test_a_summary_the_output_topic_refuses_as_too_large_becomes_its_dead_letter_not_a_crash_loop():
    producer = FakeProducer(broker_max_bytes=2_000)  # the output topic's own max.message.bytes, below the producer's
    records = builder()
    acked: list[OutgoingRecord] = []
    sink = Sink(producer=producer, max_attempts=3, on_acknowledged=acked.append, shrink=records.smaller)
    summary = records.summary(item(query="q" * 5_000), GENERATION, NOW)
    sink.add([summary])
    assert sink.flush(1.0)
    sink.raise_for_error()
    [record] = acked
    assert record.is_dead_letter and record.reason == "OutputTooLargeError" and record.source == summary.source
    assert [p.topic for p in producer.produced] == ["out", "dlq"]
