import io
import json
from datetime import datetime, timezone

import pytest
from fastavro import schemaless_writer

from processor.codec import (
    EVENT_SCHEMA,
    SUMMARY_SCHEMA,
    AvroCodec,
    BadMagicError,
    CorruptBodyError,
    RegistryCodec,
    SchemaStore,
    TooManyResultsError,
    UnknownSchemaError,
)
from processor.errors import RecordTooLargeError
from tests.helpers import make_event

# --- an independent CRC-64-AVRO, written from the Avro specification ("Schema Fingerprints") ---------------
EMPTY = 0xC15D213AA4D7A795


def _table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp)
    return table


FP_TABLE = _table()


def spec_crc64(data: bytes) -> int:
    fp = EMPTY
    for byte in data:
        fp = (fp >> 8) ^ FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


def test_reference_crc_matches_the_spec_vector():
    # Known value from the Avro test suite: the fingerprint of the canonical form "null".
    assert spec_crc64(b'"null"') == 0x63DD24E7CC258F8A


# Pinned: a silent change of a schema's canonical form (and so of every record's header) must fail here.
PINNED = {
    ("ai_worker.SearchResultEvent", 1): "40698d47d39c8b77",
    ("ai_worker.SearchResultEvent", 2): "138129c7dda5a390",
    ("ai_worker.SearchSummary", 1): "db806a53add4021e",
    ("ai_worker.SearchSummary", 2): "c56098b7506cbbc2",
    ("ai_worker.SearchSummary", 3): "d290e7174fff5309",
    ("ai_worker.DeadLetter", 1): "f640fc745b8ed282",
}


def test_header_is_c301_then_little_endian_crc64_of_parsing_canonical_form():
    codec = AvroCodec()
    latest = codec.store.latest(EVENT_SCHEMA)
    payload = codec.encode(make_event(1), EVENT_SCHEMA)
    assert payload[:2] == bytes([0xC3, 0x01])
    canonical = _canonical(latest.path)
    assert payload[2:10] == spec_crc64(canonical.encode()).to_bytes(8, "little")


def _canonical(path) -> str:
    """Parsing Canonical Form by the spec's rules, independent of fastavro: keep only name/type/fields/items/
    values/symbols/size, full names, no logicalType/doc/default, primitives as bare strings."""
    schema = json.loads(path.read_text())

    def canon(node, namespace):
        if isinstance(node, str):
            return json.dumps(node if node in PRIMITIVES or "." in node else f"{namespace}.{node}")
        if isinstance(node, list):
            return "[" + ",".join(canon(n, namespace) for n in node) + "]"
        kind = node["type"]
        if kind in PRIMITIVES:
            return json.dumps(kind)
        if kind == "array":
            return '{"type":"array","items":' + canon(node["items"], namespace) + "}"
        if kind == "record":
            ns = node.get("namespace", namespace)
            name = node["name"] if "." in node["name"] else f"{ns}.{node['name']}"
            fields = ",".join('{"name":' + json.dumps(f["name"]) + ',"type":' + canon(f["type"], ns) + "}" for f in node["fields"])
            return '{"name":' + json.dumps(name) + ',"type":"record","fields":[' + fields + "]}"
        raise AssertionError(kind)

    return canon(schema, schema.get("namespace", ""))


PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


@pytest.mark.parametrize("version", SchemaStore().versions(EVENT_SCHEMA) + SchemaStore().versions(SUMMARY_SCHEMA), ids=lambda v: v.path.name)
def test_every_schema_fingerprint_follows_the_spec(version):
    assert version.fingerprint == spec_crc64(_canonical(version.path).encode()).to_bytes(8, "little")


def test_pinned_fingerprints():
    store = SchemaStore()
    for (name, number), hexdigest in PINNED.items():
        assert [v for v in store.versions(name) if v.version == number][0].fingerprint.hex() == hexdigest


def test_round_trip_of_the_latest_event():
    codec = AvroCodec()
    event = make_event(7, language="ko")
    decoded = codec.decode(codec.encode(event, EVENT_SCHEMA), EVENT_SCHEMA)
    assert decoded["event_id"] == "evt-000007"
    assert decoded["language"] == "ko"
    assert decoded["collected_at"] == datetime(2026, 11, 1, tzinfo=timezone.utc)


def test_every_older_event_version_is_still_read():
    codec = AvroCodec()
    versions = codec.store.versions(EVENT_SCHEMA)
    assert len(versions) >= 2, "keep old versions in schemas/"
    for version in versions[:-1]:
        event = make_event(3)
        # Write with the old schema only the fields it knows, exactly as an old producer would.
        known = {f["name"] for f in version.parsed["fields"]}
        buffer = io.BytesIO()
        buffer.write(version.header)
        schemaless_writer(buffer, version.parsed, {k: v for k, v in event.items() if k in known})
        decoded = codec.decode(buffer.getvalue(), EVENT_SCHEMA)
        assert decoded["event_id"] == "evt-000003"
        assert decoded["language"] is None  # default of the newer field


def summary_record(**extra):
    now = datetime(2026, 11, 20, tzinfo=timezone.utc)
    return {
        "event_id": "evt-1", "query": "q", "summary": "Lag grows [2].", "language": "en", "engine": "extractive",
        "model": "m", "prompt_version": "p", "finish_reason": "stop", "prompt_tokens": 10, "completion_tokens": 5,
        "results_used": 2, "results_truncated": 0, "source_topic": "in", "source_partition": 0, "source_offset": 7,
        "collected_at": now, "processed_at": now, "processor_version": "0.1.0", **extra,
    }


def test_every_older_summary_version_is_still_read():
    """Summaries written before citations (v1) or quality signals (v2) existed read as the newest version, with no
    citations and no quality (null: not measured, which is not the same as "no problem")."""
    codec = AvroCodec()
    versions = codec.store.versions(SUMMARY_SCHEMA)
    assert [v.version for v in versions] == [1, 2, 3]
    for version in versions[:-1]:
        known = {f["name"] for f in version.parsed["fields"]}
        buffer = io.BytesIO()
        buffer.write(version.header)
        schemaless_writer(buffer, version.parsed, {k: v for k, v in summary_record().items() if k in known})
        decoded = codec.decode(buffer.getvalue(), SUMMARY_SCHEMA)
        assert decoded["source_offset"] == 7 and decoded["citations"] == [] and decoded["quality"] is None


QUALITY = {"cut_off": True, "loop_trimmed": True, "trimmed_chars": 120, "citations": 1, "citations_out_of_range": 2,
           "grounded_share": 0.5, "language_mismatch": False, "prompt_echo": True}


def test_a_summary_carries_its_quality_signals():
    codec = AvroCodec()
    decoded = codec.decode(codec.encode(summary_record(quality=QUALITY), SUMMARY_SCHEMA), SUMMARY_SCHEMA)
    assert decoded["quality"] == QUALITY
    assert codec.decode(codec.encode(summary_record(), SUMMARY_SCHEMA), SUMMARY_SCHEMA)["quality"] is None


def test_a_summary_carries_its_citations():
    codec = AvroCodec()
    citations = [{"rank": 2, "url": "https://example.com/2", "title": "Two"}]
    assert codec.decode(codec.encode(summary_record(citations=citations), SUMMARY_SCHEMA), SUMMARY_SCHEMA)["citations"] == citations
    # A writer that does not know about citations yet (the record without the field) still encodes: default [].
    assert codec.decode(codec.encode(summary_record(), SUMMARY_SCHEMA), SUMMARY_SCHEMA)["citations"] == []


def test_bad_magic_unknown_fingerprint_truncated_and_trailing_bytes():
    codec = AvroCodec()
    good = codec.encode(make_event(1), EVENT_SCHEMA)
    with pytest.raises(BadMagicError, match="c301"):
        codec.decode(b"\x00\x01" + good[2:], EVENT_SCHEMA)
    with pytest.raises(BadMagicError):
        codec.decode(b"", EVENT_SCHEMA)
    with pytest.raises(UnknownSchemaError, match="fingerprint"):
        codec.decode(good[:2] + b"\x00" * 8 + good[10:], EVENT_SCHEMA)
    with pytest.raises(CorruptBodyError):
        codec.decode(good[:-5], EVENT_SCHEMA)
    with pytest.raises(CorruptBodyError, match="left over"):
        codec.decode(good + b"\x00", EVENT_SCHEMA)


def test_a_summary_is_not_read_as_an_event():
    codec = AvroCodec()
    summary = codec.store.latest(SUMMARY_SCHEMA)
    with pytest.raises(UnknownSchemaError, match="SearchSummary"):
        codec.decode(summary.header + b"\x00" * 20, EVENT_SCHEMA)


def test_invalid_utf8_is_a_corrupt_body():
    codec = AvroCodec()
    good = codec.encode(make_event(1), EVENT_SCHEMA)
    index = good.index(b"kafka")
    with pytest.raises(CorruptBodyError, match="UTF-8"):
        codec.decode(good[:index] + b"\xff\xfe" + good[index + 2 :], EVENT_SCHEMA)


# ----------------------------------------------------------------------------------- the result cap, while decoding
def _long(n: int) -> bytes:
    """An Avro long: zigzag varint."""
    n, out = (n << 1) ^ (n >> 63), bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _string(text: str) -> bytes:
    return _long(len(text.encode())) + text.encode()


EMPTY_RESULT = _long(1) + _string("") + _string("") + _string("") + _long(0)  # rank 1, "", "", "", content null


def _event_head(codec: AvroCodec) -> bytes:
    """Header, event_id and query of the newest event version: what precedes the results array."""
    return codec.store.latest(EVENT_SCHEMA).header + _string("evt-1") + _string("q")


def test_an_event_past_the_result_cap_is_refused_and_one_at_the_cap_is_read():
    codec = AvroCodec(max_results=5)
    many = make_event(1, results=6)
    with pytest.raises(TooManyResultsError, match="more than 5"):
        codec.decode(codec.encode(many, EVENT_SCHEMA), EVENT_SCHEMA)
    assert len(codec.decode(codec.encode(make_event(1, results=5), EVENT_SCHEMA), EVENT_SCHEMA)["results"]) == 5
    assert issubclass(TooManyResultsError, RecordTooLargeError), "a record error: dead-lettered, never a crash"


def test_the_cap_is_decided_from_the_block_count_without_decoding_the_results():
    # A block that claims 700,000 results, followed by garbage a full decode would fail on: the cap decides first.
    payload = _event_head(AvroCodec()) + _long(700_000) + b"\xff" * 64
    with pytest.raises(TooManyResultsError, match="a block of 700000"):
        AvroCodec().decode(payload, EVENT_SCHEMA)
    # Blocks of one result each (a writer may block as it likes): only results up to the cap are walked; what lies
    # past the cap is garbage that decoding would trip over.
    blocks = (_long(1) + EMPTY_RESULT) * 11 + b"\xff" * 64
    with pytest.raises(TooManyResultsError):
        AvroCodec(max_results=10).decode(_event_head(AvroCodec()) + blocks, EVENT_SCHEMA)
    # Blocks with their byte size (negative count) are jumped over without walking their items.
    sized = (_long(-4) + _long(len(EMPTY_RESULT * 4)) + EMPTY_RESULT * 4) * 3 + b"\xff" * 64
    with pytest.raises(TooManyResultsError, match="a block of 4 after 8"):
        AvroCodec(max_results=10).decode(_event_head(AvroCodec()) + sized, EVENT_SCHEMA)


def test_an_older_event_version_is_capped_too_and_the_cap_leaves_other_records_alone():
    codec = AvroCodec(max_results=2)
    old = codec.store.versions(EVENT_SCHEMA)[0]
    event = make_event(3, results=3)
    buffer = io.BytesIO()
    buffer.write(old.header)
    schemaless_writer(buffer, old.parsed, {k: v for k, v in event.items() if k in {f["name"] for f in old.parsed["fields"]}})
    with pytest.raises(TooManyResultsError):
        codec.decode(buffer.getvalue(), EVENT_SCHEMA)
    summary = summary_record(citations=[{"rank": r, "url": "u", "title": "t"} for r in range(1, 5)])
    assert len(codec.decode(codec.encode(summary, SUMMARY_SCHEMA), SUMMARY_SCHEMA)["citations"]) == 4


def test_a_truncated_body_is_still_a_corrupt_body_not_a_cap_error():
    with pytest.raises(CorruptBodyError):
        AvroCodec(max_results=10).decode(_event_head(AvroCodec()) + _long(3) + EMPTY_RESULT, EVENT_SCHEMA)


def test_the_registry_codec_applies_the_cap_from_the_registered_writer_schema():
    import uuid

    codec = RegistryCodec(f"mock://{uuid.uuid4().hex}", max_results=5)
    framed = codec.encode(make_event(1, results=6), EVENT_SCHEMA, "search-results")
    with pytest.raises(TooManyResultsError):
        codec.decode(framed, EVENT_SCHEMA, "search-results")
    garbage_tail = framed[:5] + _string("evt-1") + _string("q") + _long(700_000) + b"\xff" * 64
    with pytest.raises(TooManyResultsError):
        codec.decode(garbage_tail, EVENT_SCHEMA, "search-results")
    assert codec.decode(codec.encode(make_event(1, results=5), EVENT_SCHEMA, "search-results"), EVENT_SCHEMA, "search-results")
