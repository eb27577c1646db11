"""The loop end to end on a real broker: N in → N out, lineage, commits, DLQ, restart, long generate()."""

from __future__ import annotations

import time

import pytest

from processor.codec import EVENT_SCHEMA, AvroCodec
from processor.engines.extractive import ExtractiveEngine
from processor.loop import Worker
from processor.prompt import PROMPT_VERSION
from tests.helpers import (
    FAST_GROUP,
    RebalanceLog,
    WorkerThread,
    committed_offsets,
    create_topics,
    end_offsets,
    make_event,
    produce,
    read_all,
    real_consumer,
    run_until,
    settings_for,
)
from confluent_kafka import Producer

pytestmark = pytest.mark.broker


def test_n_events_in_n_summaries_out_with_lineage_and_commits(broker, topics):
    create_topics(broker, topics, partitions=3)
    events = [make_event(i, language="ko" if i % 2 else "en") for i in range(40)]
    placements = produce(broker, topics["input"], events)
    settings = settings_for(broker, topics, batch_max_records=8)
    worker = Worker(settings, ExtractiveEngine(), consumer_overrides=FAST_GROUP)
    assert run_until(worker, lambda: worker.records_committed >= 40) == 0

    summaries = read_all(broker, topics["output"])
    assert sorted(s["event_id"] for s in summaries) == sorted(e["event_id"] for e in events)
    by_id = {e["event_id"]: (p, o) for e, (p, o) in zip(events, placements)}
    for summary in summaries:
        assert (summary["source_partition"], summary["source_offset"]) == by_id[summary["event_id"]]
        assert summary["source_topic"] == topics["input"]
        assert summary["prompt_version"] == PROMPT_VERSION and summary["model"] == "extractive-v1"
        assert summary["summary"] and summary["results_used"] == 3
        assert summary["language"] == ("ko" if int(summary["event_id"][-2:]) % 2 else "en")
    assert committed_offsets(broker, topics["group"], topics["input"], 3) == end_offsets(placements)
    assert read_all(broker, topics["dlq"], dead_letters=True, idle=0.5) == []


def test_output_key_is_the_input_key(broker, topics):
    create_topics(broker, topics, partitions=1)
    codec = AvroCodec()
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(topics["input"], codec.encode(make_event(1), EVENT_SCHEMA), b"customer-42")
    producer.produce(topics["input"], codec.encode(make_event(2), EVENT_SCHEMA), None)
    producer.flush(10)
    worker = Worker(settings_for(broker, topics), ExtractiveEngine(), consumer_overrides=FAST_GROUP)
    run_until(worker, lambda: worker.records_committed >= 2)
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "key-check"})
    consumer.assign([TopicPartition(topics["output"], 0, OFFSET_BEGINNING)])
    keys = []
    deadline = time.monotonic() + 15
    while len(keys) < 2 and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and not message.error():
            keys.append(message.key())
    consumer.close()
    assert keys == [b"customer-42", b"evt-000002"]


def test_poison_goes_to_the_dlq_and_the_stream_continues(broker, topics):
    create_topics(broker, topics, partitions=1)
    codec = AvroCodec()
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    good = [make_event(i) for i in range(6)]
    producer.produce(topics["input"], codec.encode(good[0], EVENT_SCHEMA), b"k0")
    producer.produce(topics["input"], b"not avro at all", b"bad-1", headers=[("trace", b"abc")])
    producer.produce(topics["input"], codec.encode(good[1], EVENT_SCHEMA), b"k1")
    producer.produce(topics["input"], codec.encode(make_event(99) | {"query": "  "}, EVENT_SCHEMA), b"bad-2")
    for i, event in enumerate(good[2:], start=2):
        producer.produce(topics["input"], codec.encode(event, EVENT_SCHEMA), f"k{i}".encode())
    producer.flush(10)

    worker = Worker(settings_for(broker, topics), ExtractiveEngine(), consumer_overrides=FAST_GROUP)
    run_until(worker, lambda: worker.records_committed >= 8)
    summaries = read_all(broker, topics["output"])
    dead = read_all(broker, topics["dlq"], dead_letters=True)
    assert sorted(s["event_id"] for s in summaries) == [e["event_id"] for e in good]
    assert [(d["error_class"], d["source_offset"], d["original_key"]) for d in sorted(dead, key=lambda d: d["source_offset"])] == [
        ("BadMagicError", 1, "YmFkLTE="),  # base64 of the original key
        ("InvalidEventError", 3, "YmFkLTI="),
    ]
    first = min(dead, key=lambda d: d["source_offset"])
    assert first["source_topic"] == topics["input"] and first["processor_version"]
    assert "c301" in first["error_message"]
    import base64

    assert base64.b64decode(first["original_value"]) == b"not avro at all"
    assert committed_offsets(broker, topics["group"], topics["input"], 1) == {0: 8}


def test_a_restarted_worker_resumes_from_committed_offsets_without_reprocessing(broker, topics):
    create_topics(broker, topics, partitions=2)
    produce(broker, topics["input"], [make_event(i) for i in range(20)])
    settings = settings_for(broker, topics, batch_max_records=5)
    first = Worker(settings, ExtractiveEngine(), consumer_overrides=FAST_GROUP)
    run_until(first, lambda: first.records_committed >= 20)
    produce(broker, topics["input"], [make_event(i) for i in range(20, 30)])
    second = Worker(settings, ExtractiveEngine(), consumer_overrides=FAST_GROUP)
    run_until(second, lambda: second.records_committed >= 10)
    time.sleep(1.0)
    ids = [s["event_id"] for s in read_all(broker, topics["output"])]
    assert len(ids) == 30 and len(set(ids)) == 30, "no event summarised twice"
    assert second.records_committed == 10


class SlowEngine(ExtractiveEngine):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.calls = 0

    def generate(self, prompts):
        self.calls += 1
        time.sleep(self.seconds)
        return super().generate(prompts)


def test_generate_longer_than_max_poll_interval_causes_no_rebalance_and_no_duplicate(broker, topics):
    create_topics(broker, topics, partitions=2)
    produce(broker, topics["input"], [make_event(i) for i in range(12)])
    settings = settings_for(broker, topics, batch_max_records=6, batch_max_wait_ms=50, kafka_max_poll_interval_ms=10_000)
    engine = SlowEngine(12.0)  # each generate() outlasts max.poll.interval.ms
    holder: dict[str, Worker] = {}
    rebalances = RebalanceLog(real_consumer(settings), on_revoke=lambda _n: holder["worker"].records_committed)
    running = WorkerThread(settings, engine, consumer=rebalances)
    worker = holder["worker"] = running.worker
    with running:
        assert running.wait_for(lambda: worker.records_committed >= 12, timeout_s=90)
    assert running.exit_code == 0
    assert rebalances.assigned == [2] and rebalances.lost == []
    assert all(committed == 12 for _, committed in rebalances.revoked), "no rebalance while generate() ran, only at the final close"
    if settings.generation_mode.value == "micro_batch":
        assert engine.calls == 1 + 2, "the start-up warm-up, then two batches"
    ids = [s["event_id"] for s in read_all(broker, topics["output"])]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 12


def test_the_demo_prints_summaries():
    import io

    from processor.ops.demo import run_demo

    out = io.StringIO()
    assert run_demo(out) == 0
    text = out.getvalue()
    assert "demo-ko-001" in text and "demo-en-001" in text
    assert "6 summaries, 0 dead letters" in text
    assert "배터리" in text


def test_an_engine_that_cannot_generate_fails_at_start_up_before_joining(broker, topics):
    from processor.engines.base import EngineStartupError

    class Broken(ExtractiveEngine):
        def generate(self, prompts):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    create_topics(broker, topics, partitions=1)
    worker = Worker(settings_for(broker, topics), Broken(), consumer_overrides=FAST_GROUP)
    with pytest.raises(EngineStartupError, match="warm-up"):
        worker.run()
    assert worker.assigned == []
