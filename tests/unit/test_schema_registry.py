"""Confluent Schema Registry framing through confluent_kafka.schema_registry, against its mock:// registry."""

import uuid

import pytest

from processor.codec import EVENT_SCHEMA, SUMMARY_SCHEMA, BadMagicError, CorruptBodyError, RegistryCodec, UnknownSchemaError
from tests.helpers import make_event


@pytest.fixture()
def codec():
    return RegistryCodec(f"mock://{uuid.uuid4().hex}")


def test_framing_is_zero_then_big_endian_schema_id_then_avro(codec):
    payload = codec.encode(make_event(1), EVENT_SCHEMA, "search-results")
    assert payload[0] == 0
    schema_id = int.from_bytes(payload[1:5], "big")
    registered = codec.client.get_latest_version("search-results-value")
    assert registered.schema_id == schema_id
    assert "SearchResultEvent" in registered.schema.schema_str
    assert codec.decode(payload, EVENT_SCHEMA, "search-results")["event_id"] == "evt-000001"


def test_output_registers_its_own_subject(codec):
    import datetime

    record = {
        "event_id": "e", "query": "q", "summary": "s", "language": "en", "engine": "extractive", "model": "m",
        "prompt_version": "p", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1, "results_used": 1,
        "results_truncated": 0, "source_topic": "t", "source_partition": 0, "source_offset": 1,
        "collected_at": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
        "processed_at": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc), "processor_version": "0",
    }
    payload = codec.encode(record, SUMMARY_SCHEMA, "search-summaries")
    assert codec.client.get_latest_version("search-summaries-value").schema_id == int.from_bytes(payload[1:5], "big")
    assert codec.decode(payload, SUMMARY_SCHEMA, "search-summaries")["summary"] == "s"


def test_bad_framing_and_unknown_ids_are_decode_errors(codec):
    good = codec.encode(make_event(1), EVENT_SCHEMA, "search-results")
    with pytest.raises(BadMagicError, match="Schema Registry"):
        codec.decode(b"\xc3\x01" + good[1:], EVENT_SCHEMA, "search-results")
    with pytest.raises((UnknownSchemaError, CorruptBodyError)):
        codec.decode(b"\x00\x00\x00\x7f\xff" + good[5:], EVENT_SCHEMA, "search-results")
    with pytest.raises(CorruptBodyError):
        codec.decode(good[:-30], EVENT_SCHEMA, "search-results")


def test_both_codecs_serialize_with_a_context_as_the_codec_protocol_says(codec):
    from processor.codec import AvroCodec, Codec, SerializationContext

    ctx = SerializationContext("search-results", EVENT_SCHEMA)
    for each in (codec, AvroCodec()):
        typed: Codec = each  # both satisfy the protocol the runtime is typed against
        assert typed.deserialize(typed.serialize(make_event(3), ctx), ctx)["event_id"] == "evt-000003"
        assert typed.store.latest(EVENT_SCHEMA).name == EVENT_SCHEMA
