"""The poison catalogue: each kind is a record the worker cannot summarise. Each must become one dead letter with
headers saying why, the stream must go on (the good records around it are summarised), and its offset committed.
One worker run over a stream holding every kind; one test per kind."""

from __future__ import annotations

import io
import json
from typing import Any, Callable

import pytest
from confluent_kafka import Producer
from fastavro import parse_schema, schemaless_writer

from processor.codec import EVENT_SCHEMA, SUMMARY_SCHEMA, AvroCodec, SINGLE_OBJECT_MAGIC
from processor.engines.isolation import generate_isolated  # noqa: F401 - the layer under test, via the loop
from processor.loop import Worker
from tests.fault.worker_main import FaultEngine
from tests.helpers import FAST_GROUP, committed_offsets, create_topics, make_event, read_all, run_until, settings_for

pytestmark = pytest.mark.broker
CODEC = AvroCodec()
LATEST = CODEC.store.latest(EVENT_SCHEMA)


def encode(event: dict[str, Any]) -> bytes:
    return CODEC.encode(event, EVENT_SCHEMA)


def with_writer_schema(mutate: Callable[[dict[str, Any]], None], record: dict[str, Any]) -> bytes:
    """Body written with a schema the producer got wrong, under the header of the real latest schema."""
    schema = json.loads(LATEST.path.read_text())
    mutate(schema)
    buffer = io.BytesIO()
    buffer.write(LATEST.header)
    schemaless_writer(buffer, parse_schema(schema, named_schemas={}), record)
    return buffer.getvalue()


def _drop_query(schema: dict[str, Any]) -> None:
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "query"]


def _rank_as_string(schema: dict[str, Any]) -> None:
    schema["fields"][2]["type"]["items"]["fields"][0]["type"] = "string"


def _invalid_utf8() -> bytes:
    good = encode(make_event(0) | {"event_id": "poison-utf8"})
    at = good.index(b"kafka consumer")
    return good[:at] + b"\xc3\x28\xff" + good[at + 3 :]


big = make_event(0) | {"event_id": "poison-10mb"}
big["results"][0]["content"] = "x" * (10 * 1024 * 1024)
no_query = {k: v for k, v in make_event(0).items() if k != "query"} | {"event_id": "poison-missing"}
rank_text = make_event(0) | {"event_id": "poison-type"}
rank_text["results"] = [dict(r, rank=str(r["rank"])) for r in rank_text["results"]]

# kind → (value bytes, expected dead-letter error class)
CATALOGUE: dict[str, tuple[bytes | None, str]] = {
    "wrong_magic_bytes": (b"\x00\x00" + encode(make_event(0))[2:], "BadMagicError"),
    "plain_json_value": (json.dumps({"event_id": "x"}).encode(), "BadMagicError"),
    "null_value_tombstone": (None, "BadMagicError"),
    "unknown_schema_fingerprint": (SINGLE_OBJECT_MAGIC + b"\x01" * 8 + encode(make_event(0))[10:], "UnknownSchemaError"),
    "a_summary_instead_of_an_event": (CODEC.store.latest(SUMMARY_SCHEMA).header + b"\x02x", "UnknownSchemaError"),
    "truncated_avro_body": (encode(make_event(0))[:-40], "CorruptBodyError"),
    "missing_required_field": (with_writer_schema(_drop_query, no_query), "CorruptBodyError"),
    "wrongly_typed_field": (with_writer_schema(_rank_as_string, rank_text), "CorruptBodyError"),
    "invalid_utf8": (_invalid_utf8(), "CorruptBodyError"),
    "empty_query": (encode(make_event(0) | {"event_id": "poison-empty-query", "query": "   "}), "InvalidEventError"),
    "zero_results": (encode(make_event(0) | {"event_id": "poison-zero-results", "results": []}), "InvalidEventError"),
    "rank_zero": (encode(make_event(0, results=1) | {"event_id": "poison-rank"} | {"results": [dict(make_event(0)["results"][0], rank=0)]}), "InvalidEventError"),
    "ten_mb_content": (encode(big), "RecordTooLargeError"),
    "prompt_cannot_fit": (encode(make_event(0) | {"event_id": "poison-long-query", "query": "long query words " * 4000}), "PromptTooLongError"),
    "engine_raises_for_this_event": (encode(make_event(0) | {"event_id": "poison-engine-raise"}), "EngineCallError"),
    "engine_returns_empty_summary": (encode(make_event(0) | {"event_id": "poison-engine-empty"}), "EmptySummaryError"),
}


@pytest.fixture(scope="module")
def poisoned_run(broker, tmp_path_factory):
    import uuid

    suffix = uuid.uuid4().hex[:8]
    topics = {"input": f"pin-{suffix}", "output": f"pout-{suffix}", "dlq": f"pdlq-{suffix}", "group": f"pg-{suffix}"}
    create_topics(broker, topics, partitions=1)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "message.max.bytes": 64 * 1024 * 1024})
    good_ids, kinds_at = [], {}
    offset = 0
    for n, (kind, (value, _expected)) in enumerate(CATALOGUE.items()):
        good = make_event(n)
        producer.produce(topics["input"], encode(good), good["event_id"].encode())
        good_ids.append(good["event_id"])
        producer.produce(topics["input"], value, f"key-{kind}".encode(), headers=[("poison-kind", kind.encode())])
        kinds_at[kind] = offset + 1
        offset += 2
    last = make_event(999)
    producer.produce(topics["input"], encode(last), b"last")
    good_ids.append(last["event_id"])
    assert producer.flush(30) == 0
    total = offset + 1

    # Batches of 4 events: the engine-raise poison shares its batch with good events, which must still publish.
    settings = settings_for(broker, topics, batch_max_records=4, batch_max_wait_ms=300)
    worker = Worker(settings, FaultEngine(0.0), consumer_overrides=FAST_GROUP)
    assert run_until(worker, lambda: worker.records_committed >= total, timeout_s=120) == 0
    summaries = read_all(broker, topics["output"])
    dead = read_all(broker, topics["dlq"], dead_letters=True)
    return {
        "summaries": summaries,
        "dead": {d["source_offset"]: d for d in dead},
        "good_ids": good_ids,
        "kinds_at": kinds_at,
        "committed": committed_offsets(broker, topics["group"], topics["input"], 1),
        "total": total,
        "topics": topics,
    }


def test_the_stream_continues_past_every_kind(poisoned_run, figures):
    assert sorted(s["event_id"] for s in poisoned_run["summaries"]) == sorted(poisoned_run["good_ids"])
    assert poisoned_run["committed"] == {0: poisoned_run["total"]}
    assert len(poisoned_run["dead"]) == len(CATALOGUE)
    counts: dict[str, int] = {}
    for record in poisoned_run["dead"].values():
        counts[record["error_class"]] = counts.get(record["error_class"], 0) + 1
    figures["poison_dlq_by_error_class"] = counts
    figures["poison_kinds"] = len(CATALOGUE)


@pytest.mark.parametrize("kind", list(CATALOGUE))
def test_poison_kind_becomes_one_dead_letter_saying_why(poisoned_run, kind):
    value, expected = CATALOGUE[kind]
    record = poisoned_run["dead"][poisoned_run["kinds_at"][kind]]
    assert record["error_class"] == expected
    assert record["error_message"] and len(record["error_message"]) < 5000
    assert record["source_topic"] == poisoned_run["topics"]["input"] and record["source_partition"] == 0
    assert record["processor_version"]
    import base64

    assert base64.b64decode(record["original_key"]) == f"key-{kind}".encode()
    if value is not None and len(value) > 900_000:
        # Too large for the broker even compressed: published with its headers, the value omitted and flagged.
        assert record["original_value"] is None and record["value_omitted"] == f"too large: {len(value)} bytes"
    else:
        assert (base64.b64decode(record["original_value"]) if record["original_value"] else None) == value
