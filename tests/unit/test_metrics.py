from processor.metrics import Metrics
from processor.records import OutgoingRecord, dead_letter
from processor.source import SourceRecord

SOURCE = SourceRecord("in", 0, 7, b"k", b"v", None)


def test_a_dead_letter_is_counted_under_the_reason_it_carries_not_one_read_back_from_headers():
    metrics = Metrics()
    # Headers that say otherwise (or nothing): the object's reason is the truth, never re-parsed.
    record = OutgoingRecord("dlq", b"k", b"v", [("dlq.error_class", b"Spoofed")], SOURCE, reason="BadMagicError")
    metrics.acknowledged(record)
    assert metrics.dead_letters.labels("BadMagicError")._value.get() == 1  # noqa: SLF001 - prometheus child value
    assert metrics.dead_letters.labels("Spoofed")._value.get() == 0  # noqa: SLF001


def test_a_dead_letter_carries_its_error_message_on_the_object():
    record = dead_letter(SOURCE, ValueError("boom"), "dlq")
    assert record.reason == "UnexpectedError" and record.error_message == "ValueError: boom"
