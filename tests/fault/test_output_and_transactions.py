"""Output failures (nothing committed, retried, a persistent failure stops the worker) and exactly-once."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from processor.checkpoint import TransactionalCheckpoint
from processor.engines.extractive import ExtractiveEngine
from processor.errors import EXIT_OUTPUT_FAILED
from processor.loop import Worker
from tests.fault.test_crash_and_stop import worker_env
from tests.helpers import FAST_GROUP, real_producer, committed_offsets, create_topics, end_offsets, make_event, produce, read_all, run_until, settings_for

pytestmark = pytest.mark.broker


class FailingProducer:
    """The real producer, except that deliveries to `topic` fail (as a timed-out produce does) `failures` times;
    `max_per_record`: no record fails more often than that, so its retries succeed whatever the timing (in
    continuous mode a handful of records may be all that is in flight when the failures hit)."""

    def __init__(self, real: Producer, topic: str, failures: float, max_per_record: int | None = None) -> None:
        self.real, self.topic, self.failures = real, topic, failures
        self.max_per_record = max_per_record
        self.failures_of: Counter[tuple[Any, Any]] = Counter()
        self.pending: list[Any] = []
        self.failed = 0

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
        record = (key, value)
        may_fail = self.max_per_record is None or self.failures_of[record] < self.max_per_record
        if topic == self.topic and self.failures > 0 and may_fail:
            self.failures -= 1
            self.failures_of[record] += 1
            self.failed += 1
            self.pending.append(on_delivery)
            return
        self.real.produce(topic, value, key, headers=headers, on_delivery=on_delivery)

    def poll(self, timeout=0):
        while self.pending:
            self.pending.pop(0)(KafkaError(KafkaError._MSG_TIMED_OUT, "injected: Local: Message timed out"), None)
        return self.real.poll(timeout)

    def flush(self, timeout=None):
        self.poll(0)
        return self.real.flush(timeout) if timeout is not None else self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


def worker_with_failing_output(broker, topics, failures, max_per_record=None, **overrides):
    settings = settings_for(broker, topics, **overrides)
    failing = FailingProducer(real_producer(settings), topics["output"], failures, max_per_record)
    worker = Worker(settings, ExtractiveEngine(), consumer_overrides=FAST_GROUP, producer=failing)
    return worker, failing


def test_failed_deliveries_are_resent_and_committed_only_once_acknowledged(broker, topics, figures):
    create_topics(broker, topics, partitions=1)
    placements = produce(broker, topics["input"], [make_event(i) for i in range(30)])
    # Each record fails at most twice of its three attempts: a resend may fail again and still get through.
    worker, failing = worker_with_failing_output(broker, topics, failures=5, max_per_record=2, batch_max_records=10,
                                                 produce_max_attempts=3)
    assert run_until(worker, lambda: worker.records_committed >= 30) == 0
    assert failing.failed == 5
    counts = Counter(s["event_id"] for s in read_all(broker, topics["output"]))
    assert len(counts) == 30 and set(counts.values()) == {1}
    assert committed_offsets(broker, topics["group"], topics["input"], 1) == end_offsets(placements)
    figures["output_failures"] = {"injected_delivery_failures": 5, "lost": 0, "resent": 5}


def test_a_persistent_output_failure_stops_the_worker_and_commits_nothing(broker, topics):
    create_topics(broker, topics, partitions=1)
    placements = produce(broker, topics["input"], [make_event(i) for i in range(10)])
    worker, _ = worker_with_failing_output(broker, topics, failures=float("inf"), produce_max_attempts=2)
    assert run_until(worker, lambda: False, timeout_s=60) == EXIT_OUTPUT_FAILED
    assert committed_offsets(broker, topics["group"], topics["input"], 1) == {}, "nothing of the failed batch committed"
    # A healthy restart then does all of it: nothing was skipped.
    healthy = Worker(settings_for(broker, topics), ExtractiveEngine(), consumer_overrides=FAST_GROUP)
    run_until(healthy, lambda: healthy.records_committed >= 10)
    assert committed_offsets(broker, topics["group"], topics["input"], 1) == end_offsets(placements)


def test_exactly_once_commits_offsets_inside_the_transaction(broker, topics):
    create_topics(broker, topics, partitions=2)
    placements = produce(broker, topics["input"], [make_event(i) for i in range(60)])
    settings = settings_for(broker, topics, processing_guarantee="exactly_once", batch_max_records=10, transactional_id_suffix=uuid.uuid4().hex[:6])
    worker = Worker(settings, ExtractiveEngine(), consumer_overrides=FAST_GROUP)
    assert isinstance(worker.checkpoint, TransactionalCheckpoint)
    assert run_until(worker, lambda: worker.records_committed >= 60) == 0
    assert committed_offsets(broker, topics["group"], topics["input"], 2) == end_offsets(placements)
    assert sorted(s["event_id"] for s in read_all(broker, topics["output"])) == [f"evt-{i:06d}" for i in range(60)]


def broker_honours_read_committed(bootstrap: str) -> bool:
    topic = f"txn-probe-{uuid.uuid4().hex[:8]}"
    from processor.ops.broker import ensure_topics

    ensure_topics(bootstrap, {topic: 1})
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"probe-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, b"aborted")
    producer.flush(10)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, b"committed")
    producer.commit_transaction(30)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe", "isolation.level": "read_committed"})
    consumer.assign([TopicPartition(topic, 0, 0)])
    seen: list[bytes] = []
    deadline = time.monotonic() + 10
    while b"committed" not in seen and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and not message.error():
            seen.append(message.value())
    consumer.close()
    return b"aborted" not in seen


@pytest.mark.slow
def test_read_committed_consumers_see_each_summary_once_across_crashes(broker, topics, workers):
    if not broker_honours_read_committed(broker.bootstrap):
        pytest.skip(
            f"the {broker.kind} broker shows aborted transactions to read_committed consumers (Tansu does): "
            "exactly-once isolation can only be verified on Apache Kafka (set KAFKA_BOOTSTRAP_SERVERS or run Docker)"
        )
    create_topics(broker, topics, partitions=2)
    placements = produce(broker, topics["input"], [make_event(i) for i in range(2000)])
    env = worker_env(broker, topics, PROCESSING_GUARANTEE="exactly_once", TRANSACTIONAL_ID_SUFFIX="eos-0", FAULT_DELAY_S=0.05, BATCH_MAX_RECORDS=25)
    for _ in range(3):
        process = workers.start(env, name="eos")
        time.sleep(8)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    final = workers.start(env, name="eos-final")
    deadline = time.monotonic() + 180
    while committed_offsets(broker, topics["group"], topics["input"], 2) != end_offsets(placements) and time.monotonic() < deadline:
        time.sleep(1)
    final.send_signal(signal.SIGTERM)
    assert final.wait(60) == 0
    counts = Counter(s["event_id"] for s in read_all(broker, topics["output"], idle=3.0))
    assert len(counts) == 2000 and set(counts.values()) == {1}
