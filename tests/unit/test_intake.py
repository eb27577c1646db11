"""Intake: a consumed message → its source record → a batch item. A record's own content never raises out of it."""

from __future__ import annotations

import dataclasses

import pytest

from processor.codec import EVENT_SCHEMA, AvroCodec
from processor.engines.extractive import RegexTokenizer
from processor.errors import UnreadableHeadersError
from processor.intake import Intake, source_of
from processor.prompt import PromptBuilder
from tests.fakes.kafka import FakeMessage
from tests.helpers import make_event

CODEC = AvroCodec()
NOT_UTF8 = UnicodeDecodeError("utf-8", b"\xff\xfename", 0, 1, "invalid start byte")


def intake() -> Intake:
    return Intake(codec=CODEC, prompts=PromptBuilder(RegexTokenizer(), 6144, 1536), max_event_bytes=4 * 1024 * 1024)


def test_headers_that_cannot_be_read_leave_a_source_record_that_says_so_instead_of_raising():
    value = CODEC.encode(make_event(1), EVENT_SCHEMA)
    message = FakeMessage("in", 0, 9, b"key", value, [("ok", b"1")], _headers_error=NOT_UTF8)
    source = source_of(message, epoch=3)
    assert source.headers == () and source.unreadable_headers is not None
    assert source.unreadable_headers.startswith("UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff")
    assert (source.key, source.value, source.offset, source.epoch) == (b"key", value, 9, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.unreadable_headers = None  # type: ignore[misc]


def test_a_record_whose_headers_cannot_be_read_is_that_records_error_even_when_its_value_is_a_good_event():
    message = FakeMessage("in", 0, 9, b"key", CODEC.encode(make_event(1), EVENT_SCHEMA), None, _headers_error=NOT_UTF8)
    item = intake().prepare(source_of(message, epoch=1))
    assert item.prompt is None and isinstance(item.error, UnreadableHeadersError)
    assert item.error.source is item.source


def test_readable_headers_are_kept_and_the_event_goes_on_to_its_prompt():
    message = FakeMessage("in", 0, 1, b"key", CODEC.encode(make_event(1), EVENT_SCHEMA), [("trace", b"abc"), ("n", None)])
    source = source_of(message, epoch=1)
    assert source.headers == (("trace", b"abc"), ("n", None)) and source.unreadable_headers is None
    item = intake().prepare(source)
    assert item.error is None and item.prompt is not None


class RegistryDownAt:
    """The codec, with the Schema Registry unreachable for one value."""

    def __init__(self, down: bytes) -> None:
        self.down = down

    def deserialize(self, payload, ctx):
        from processor.errors import RegistryUnavailableError

        if payload == self.down:
            raise RegistryUnavailableError("registry timed out")
        return CODEC.deserialize(payload, ctx)


def sources(values):
    return [source_of(FakeMessage("in", 0, offset, b"k", value, None), epoch=1) for offset, value in enumerate(values)]


def test_a_chunk_prepares_in_order_and_a_bad_record_among_good_ones_is_its_own_error():
    from processor.prompt import PromptTooLongError

    good = [CODEC.encode(make_event(i), EVENT_SCHEMA) for i in range(4)]
    too_long = CODEC.encode(make_event(7) | {"query": "why " * 20_000}, EVENT_SCHEMA)
    values = [good[0], b"\x00not avro", good[1], too_long, good[2], good[3]]
    items, stopped = intake().prepare_many(sources(values))
    assert stopped is None and [item.source.offset for item in items] == list(range(6))
    assert [item.error is None for item in items] == [True, False, True, False, True, True]
    assert isinstance(items[3].error, PromptTooLongError) and items[3].error.source is items[3].source
    assert items[3].event_id == "evt-000007"  # decoded before its prompt failed: the id is kept
    single = [intake().prepare(source) for source in sources(values)]
    assert [item.prompt for item in items] == [item.prompt for item in single]


def test_the_registry_down_stops_the_chunk_at_that_record_with_the_ones_before_it_prepared():
    from processor.errors import RegistryUnavailableError

    values = [CODEC.encode(make_event(i), EVENT_SCHEMA) for i in range(4)]
    chunk = Intake(codec=RegistryDownAt(values[2]), prompts=PromptBuilder(RegexTokenizer(), 6144, 1536), max_event_bytes=1 << 22)
    items, stopped = chunk.prepare_many(sources(values))
    assert isinstance(stopped, RegistryUnavailableError)
    assert [item.source.offset for item in items] == [0, 1] and all(item.prompt is not None for item in items)
    with pytest.raises(RegistryUnavailableError):
        chunk.prepare(sources(values)[2])
