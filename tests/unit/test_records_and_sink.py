"""Records (summaries, dead letters, the one dead-letter parser) and the sink (delivery only)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from processor.batcher import SourceRecord
from processor.codec import BadMagicError
from processor.errors import OutputUnavailableError
from processor.records import OutgoingRecord, dead_letter, parse_dead_letter, reason_of
from processor.sink import Sink
from tests.fakes.kafka import FakeProducer


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
