"""The Worker under exactly-once with injected fake clients, in both generation modes: librdkafka's transactional
error paths (rd_kafka_commit_transaction's documentation, confluent-kafka's transactional examples) end where they
should: a retriable commit is finished by commit_transaction() alone, an abortable error aborts, rewinds and retries
within PRODUCE_MAX_ATTEMPTS, a fenced producer exits 7; and nothing is committed before its outputs are acknowledged."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError

from processor.engines.extractive import ExtractiveEngine
from processor.errors import EXIT_OUTPUT_FAILED, EXIT_TRANSACTION_FATAL
from processor.loop import Worker
from tests.fakes.kafka import FakeGroupConsumer, FakeProducer
from tests.unit.test_worker import mode, run, settings, feed, visible_summaries  # noqa: F401 - `mode`: both generation modes

EXACTLY_ONCE = {"processing_guarantee": "exactly_once", "transactional_id_suffix": "w0", "broker_unavailable_timeout_s": 5}


def worker_for(count: int, **overrides: Any) -> tuple[Worker, FakeGroupConsumer, FakeProducer]:
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, count)
    worker = Worker(settings(**{**EXACTLY_ONCE, **overrides}), ExtractiveEngine(), consumer=consumer, producer=producer)
    return worker, consumer, producer


def events_of(producer: FakeProducer) -> list[str]:
    return [event[0] for event in producer.events]


def assert_each_transaction_commits_after_its_outputs_are_acknowledged(producer: FakeProducer) -> None:
    produced: list[Any] = []
    acked: list[Any] = []
    for event in producer.events:
        if event[0] == "begin":
            produced, acked = [], []
        elif event[0] == "produce":
            produced.append(event[1:])
        elif event[0] == "ack":
            acked.append(event[1:])
        elif event[0] == "commit":
            assert sorted(produced, key=repr) == sorted(acked, key=repr), "a transaction committed before its outputs were acknowledged"


def test_transactions_commit_only_acknowledged_outputs_and_every_event_once():
    worker, consumer, producer = worker_for(10)
    assert run(worker, lambda: worker.records_committed >= 10) == 0
    assert sorted(visible_summaries(producer)) == [f"evt-{n:06d}" for n in range(10)]
    assert events_of(producer).count("commit") >= 1 and consumer.committed_offsets == {0: 10}
    assert_each_transaction_commits_after_its_outputs_are_acknowledged(producer)


def test_a_transaction_aborted_before_the_partitions_first_commit_is_read_again_from_its_first_record():
    worker, consumer, producer = worker_for(15)
    producer.txn_errors["commit_transaction"] = [KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True)]
    assert run(worker, lambda: worker.records_committed >= 15, timeout_s=10) == 0
    assert events_of(producer).count("abort") == 1
    assert sorted(visible_summaries(producer)) == [f"evt-{n:06d}" for n in range(15)], "the aborted records, read again"


def test_a_commit_that_times_out_is_finished_by_commit_transaction_alone():
    worker, consumer, producer = worker_for(6)
    producer.txn_errors["commit_transaction"] = [KafkaError(KafkaError._TIMED_OUT, "commit timed out", retriable=True)]
    assert run(worker, lambda: worker.records_committed >= 6, timeout_s=10) == 0
    kinds = events_of(producer)
    failed = kinds.index("commit_transaction_failed")
    assert kinds[failed + 1] == "commit", "the retry is commit_transaction() alone: no send_offsets, no abort"
    assert "abort" not in kinds and sorted(visible_summaries(producer)) == [f"evt-{n:06d}" for n in range(6)]


def test_a_failed_delivery_aborts_rewinds_and_retries_the_batch():
    worker, consumer, producer = worker_for(6)
    producer.failures = [KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out")]
    assert run(worker, lambda: worker.records_committed >= 6, timeout_s=10) == 0
    assert events_of(producer).count("abort") == 1
    assert sorted(visible_summaries(producer)) == [f"evt-{n:06d}" for n in range(6)]
    assert_each_transaction_commits_after_its_outputs_are_acknowledged(producer)


def test_outputs_that_fail_produce_max_attempts_times_end_the_worker_with_exit_4_and_nothing_committed():
    worker, consumer, producer = worker_for(4, produce_max_attempts=3)
    producer.failures = [KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out") for _ in range(1000)]
    assert run(worker, lambda: False, timeout_s=10) == EXIT_OUTPUT_FAILED
    assert events_of(producer).count("abort") == 3 and "commit" not in events_of(producer)
    assert producer.visible() == [] and consumer.committed_offsets == {} and worker.records_committed == 0


def test_a_fenced_producer_ends_the_worker_with_exit_7():
    worker, consumer, producer = worker_for(4)
    producer.txn_errors["commit_transaction"] = [KafkaError(KafkaError._FENCED, "fenced by a newer producer", fatal=True)]
    assert run(worker, lambda: False, timeout_s=10) == EXIT_TRANSACTION_FATAL
    assert producer.visible() == [] and consumer.committed_offsets == {}
