"""Checkpoint: commit order with out-of-order completion, ownership, holding after a failed commit, transactions."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from processor.source import SourceRecord
from processor.checkpoint import AtLeastOnceCheckpoint, CommitPolicy, Ownership, TransactionalCheckpoint
from processor.errors import CommitFailedError, OutputUnavailableError, TransactionFatalError
from processor.records import OutgoingRecord
from processor.sink import Sink
from tests.fakes.kafka import FakeConsumer, FakeProducer

TOPIC = "in"


def source(partition: int, offset: int, epoch: int = 1, key: bytes | None = None) -> SourceRecord:
    return SourceRecord(TOPIC, partition, offset, key, b"v", None, (), epoch)


def output(src: SourceRecord) -> OutgoingRecord:
    return OutgoingRecord("out", src.key, b"summary", [], src)


def owned(*partitions: int) -> Ownership:
    ownership = Ownership()
    ownership.assign((TOPIC, p) for p in partitions)  # epochs 1, 2, ...
    return ownership


def test_commits_only_the_contiguous_acked_prefix_when_work_finishes_out_of_order():
    ownership = owned(0)
    consumer = FakeConsumer()
    checkpoint = AtLeastOnceCheckpoint(consumer=consumer, ownership=ownership, policy=CommitPolicy())
    sources = [source(0, offset) for offset in range(5)]
    for src in sources:
        checkpoint.tracker.track(src)
    for index in (3, 1, 4):  # finished and acknowledged out of order
        checkpoint.tracker.finish(sources[index], output(sources[index]))
    released = checkpoint.release()
    assert sorted(r.source.offset for r in released) == [1, 3, 4]
    for record in released:
        checkpoint.tracker.acked(record.source)
    checkpoint.commit()
    assert consumer.commits == []  # offset 0 is not done: nothing may be committed
    checkpoint.tracker.finish(sources[0], output(sources[0]))
    [first] = checkpoint.release()
    checkpoint.commit()
    assert consumer.commits == [], "released is not acknowledged: still nothing"
    checkpoint.tracker.acked(first.source)
    checkpoint.commit()
    assert consumer.commits == [{(TOPIC, 0): 2}]  # 0 and 1; 2 is still generating
    checkpoint.tracker.finish(sources[2], output(sources[2]))
    for record in checkpoint.release():
        checkpoint.tracker.acked(record.source)
    checkpoint.commit()
    assert consumer.commits[-1] == {(TOPIC, 0): 5}
    assert checkpoint.records_committed == 5


def test_an_output_waits_for_an_earlier_record_with_the_same_key():
    ownership = owned(0)
    checkpoint = AtLeastOnceCheckpoint(consumer=FakeConsumer(), ownership=ownership, policy=CommitPolicy())
    first, second, other = source(0, 0, key=b"k"), source(0, 1, key=b"k"), source(0, 2, key=b"x")
    for src in (first, second, other):
        checkpoint.tracker.track(src)
    checkpoint.tracker.finish(second, output(second))
    checkpoint.tracker.finish(other, output(other))
    assert [r.source.offset for r in checkpoint.release()] == [2], "same key as a pending earlier record: held"
    checkpoint.tracker.finish(first, output(first))
    assert [r.source.offset for r in checkpoint.release()] == [0, 1]


def test_revoked_work_is_neither_released_nor_committed():
    ownership = owned(0, 1)
    consumer = FakeConsumer()
    checkpoint = AtLeastOnceCheckpoint(consumer=consumer, ownership=ownership, policy=CommitPolicy())
    a, b = source(0, 0, epoch=1), source(1, 0, epoch=2)
    for src in (a, b):
        checkpoint.tracker.track(src)
    ownership.revoke([(TOPIC, 1)])
    assert checkpoint.tracker.finish(b, output(b)) is False
    ownership.assign([(TOPIC, 1)])  # back, under a new epoch: the old record is still not ours
    assert checkpoint.tracker.finish(b, output(b)) is False
    checkpoint.tracker.finish(a, output(a))
    assert [r.source.partition for r in checkpoint.release()] == [0]


def test_one_batch_at_a_time_holds_release_until_the_commit():
    consumer = FakeConsumer()
    checkpoint = AtLeastOnceCheckpoint(consumer=consumer, ownership=owned(0), policy=CommitPolicy(one_release_at_a_time=True))
    sources = [source(0, offset) for offset in range(4)]
    for src in sources:
        checkpoint.tracker.track(src)
    for src in sources[:2]:
        checkpoint.tracker.finish(src, output(src))
    batch1 = checkpoint.release()
    for src in sources[2:]:
        checkpoint.tracker.finish(src, output(src))
    assert checkpoint.release() == [], "a second batch waits while the first is published but not committed"
    for record in batch1:
        checkpoint.tracker.acked(record.source)
    checkpoint.commit()
    assert len(checkpoint.release()) == 2


def test_a_failed_commit_holds_the_pipeline_until_a_retry_succeeds():
    consumer = FakeConsumer()
    checkpoint = AtLeastOnceCheckpoint(consumer=consumer, ownership=owned(0), policy=CommitPolicy())
    a, b = source(0, 0), source(0, 1)
    for src in (a, b):
        checkpoint.tracker.track(src)
    checkpoint.tracker.finish(a, output(a))
    checkpoint.tracker.acked(checkpoint.release()[0].source)
    consumer.commit_failures.append(KafkaError(KafkaError.REQUEST_TIMED_OUT, "timed out", retriable=True))
    with pytest.raises(CommitFailedError):
        checkpoint.commit()
    checkpoint.tracker.finish(b, output(b))
    assert checkpoint.release() == [], "holding: nothing new goes out while the commit is failing"
    checkpoint.commit()
    assert consumer.commits == [{(TOPIC, 0): 1}]
    assert [r.source.offset for r in checkpoint.release()] == [1]


def transactional(producer: FakeProducer, consumer: FakeConsumer, ownership: Ownership, max_attempts: int = 3,
                  keep_alive=lambda: None) -> TransactionalCheckpoint:
    producer.init_transactions(1)
    checkpoint: TransactionalCheckpoint

    def new_sink() -> Sink:
        return Sink(producer=producer, max_attempts=1, on_acknowledged=lambda record: checkpoint.tracker.acked(record.source))

    checkpoint = TransactionalCheckpoint(producer=producer, consumer=consumer, new_sink=new_sink, ownership=ownership, policy=CommitPolicy(),
                                         flush_timeout_s=1.0, keep_alive=keep_alive, max_attempts=max_attempts)
    return checkpoint


def finished(checkpoint: TransactionalCheckpoint, *sources: SourceRecord) -> None:
    for src in sources:
        checkpoint.tracker.track(src)
        checkpoint.tracker.finish(src, output(src))


def test_a_transaction_carries_only_the_finished_prefix_and_its_offsets():
    producer, consumer = FakeProducer(), FakeConsumer()
    checkpoint = transactional(producer, consumer, owned(0))
    sources = [source(0, offset) for offset in range(3)]
    for src in sources:
        checkpoint.tracker.track(src)
    for index in (0, 2):
        checkpoint.tracker.finish(sources[index], output(sources[index]))
    checkpoint.commit()
    assert producer.transactions == ["init", "begin", "offsets:0=1", "commit"]
    assert [p.value for p in producer.delivered] == [b"summary"], "offset 2's output waits: its offset is not committed"
    checkpoint.tracker.finish(sources[1], output(sources[1]))
    checkpoint.commit()
    assert producer.transactions[-2:] == ["offsets:0=3", "commit"] and len(producer.delivered) == 3


def test_a_transaction_commits_only_after_every_output_in_it_is_acknowledged():
    producer, consumer = FakeProducer(), FakeConsumer()
    checkpoint = transactional(producer, consumer, owned(0))
    finished(checkpoint, *(source(0, offset, key=f"k{offset}".encode()) for offset in range(3)))
    checkpoint.commit()
    kinds = [event[0] for event in producer.events]
    assert kinds == ["init", "begin", "produce", "produce", "produce", "ack", "ack", "ack", "send_offsets", "commit"]


def test_a_commit_that_timed_out_is_resumed_by_calling_commit_transaction_again_alone():
    producer, consumer = FakeProducer(), FakeConsumer()
    producer.txn_errors["commit_transaction"] = [KafkaError(KafkaError._TIMED_OUT, "commit timed out", retriable=True)]
    checkpoint = transactional(producer, consumer, owned(0))
    finished(checkpoint, source(0, 0))
    with pytest.raises(CommitFailedError):
        checkpoint.commit()
    assert checkpoint.holding and not checkpoint.needs_rewind and checkpoint.records_committed == 0
    checkpoint.commit()
    assert [e[0] for e in producer.events[-3:]] == ["send_offsets", "commit_transaction_failed", "commit"], \
        "librdkafka refuses send_offsets_to_transaction() while the commit goes on: only commit_transaction() again"
    assert producer.transactions == ["init", "begin", "offsets:0=1", "commit"]
    assert checkpoint.records_committed == 1 and not checkpoint.holding


def test_an_abortable_error_aborts_and_asks_for_a_rewind():
    producer, consumer = FakeProducer(), FakeConsumer()
    producer.txn_errors["commit_transaction"] = [KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True)]
    checkpoint = transactional(producer, consumer, owned(0))
    finished(checkpoint, source(0, 0))
    with pytest.raises(CommitFailedError):
        checkpoint.commit()
    assert producer.transactions[-1] == "abort" and checkpoint.needs_rewind and checkpoint.records_committed == 0
    assert not checkpoint.holding, "after the abort the records are read again: nothing to hold for"
    assert producer.visible() == []


def test_a_failed_delivery_aborts_and_only_produce_max_attempts_failures_in_a_row_stop_the_worker():
    producer, consumer = FakeProducer(), FakeConsumer()
    ownership = owned(0)
    checkpoint = transactional(producer, consumer, ownership, max_attempts=2)
    timeout = KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out")

    def attempt() -> None:
        ownership.assign([(TOPIC, 0)])  # the worker's rewind: the records again, under a new epoch
        finished(checkpoint, source(0, 0, epoch=ownership.epoch((TOPIC, 0))))
        checkpoint.commit()

    producer.failures = [timeout]
    with pytest.raises(CommitFailedError):
        attempt()
    assert checkpoint.needs_rewind and producer.transactions[-1] == "abort"
    attempt()  # delivered this time
    assert checkpoint.records_committed == 1 and checkpoint.failed_deliveries == 0
    assert [r.value for r in producer.visible()] == [b"summary"]
    for _ in range(2):  # attempts of the next records, both failing
        producer.failures = [timeout]
        checkpoint.tracker.track(source(0, 1, epoch=ownership.epoch((TOPIC, 0))))
        checkpoint.tracker.finish(source(0, 1, epoch=ownership.epoch((TOPIC, 0))), output(source(0, 1)))
        if checkpoint.failed_deliveries == 0:
            with pytest.raises(CommitFailedError):
                checkpoint.commit()
            ownership.assign([(TOPIC, 0)])
        else:
            with pytest.raises(OutputUnavailableError):
                checkpoint.commit()
    assert checkpoint.records_committed == 1 and producer.transactions.count("abort") == 3


def test_a_timed_out_abort_is_resumed_alone_before_the_next_transaction():
    producer, consumer = FakeProducer(), FakeConsumer()
    producer.txn_errors["commit_transaction"] = [KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True)]
    producer.txn_errors["abort_transaction"] = [KafkaError(KafkaError._TIMED_OUT, "abort timed out", retriable=True)]
    ownership = owned(0)
    checkpoint = transactional(producer, consumer, ownership)
    finished(checkpoint, source(0, 0))
    with pytest.raises(CommitFailedError):
        checkpoint.commit()
    assert checkpoint.needs_rewind and checkpoint.holding
    ownership.assign([(TOPIC, 0)])
    checkpoint.tracker.drop([(TOPIC, 0)])
    finished(checkpoint, source(0, 0, epoch=ownership.epoch((TOPIC, 0))))
    checkpoint.commit()
    assert producer.transactions == ["init", "begin", "offsets:0=1", "abort", "begin", "offsets:0=1", "commit"]
    assert [e[0] for e in producer.events].count("abort_transaction_failed") == 1


def test_a_partition_revoked_while_the_transaction_flushes_aborts_it():
    producer, consumer = FakeProducer(), FakeConsumer()
    ownership = owned(0, 1)
    checkpoint = transactional(producer, consumer, ownership, keep_alive=lambda: ownership.revoke([(TOPIC, 1)]))
    producer.hold = True  # the flush polls, and keeps the group alive in between: the revoke comes in there
    finished(checkpoint, source(0, 0, epoch=1), source(1, 0, epoch=2))
    import threading

    threading.Timer(0.2, lambda: setattr(producer, "hold", False)).start()
    with pytest.raises(CommitFailedError):
        checkpoint.commit()
    assert "commit" not in producer.transactions and producer.transactions[-1] == "abort" and checkpoint.needs_rewind


@pytest.mark.parametrize("call", ["begin_transaction", "send_offsets_to_transaction", "commit_transaction"])
def test_a_fenced_producer_is_fatal(call):
    producer, consumer = FakeProducer(), FakeConsumer()
    producer.txn_errors[call] = [KafkaError(KafkaError._FENCED, "fenced", fatal=True)]
    checkpoint = transactional(producer, consumer, owned(0))
    finished(checkpoint, source(0, 0))
    with pytest.raises(TransactionFatalError):
        checkpoint.commit()
    assert producer.visible() == [] and checkpoint.records_committed == 0


# ------------------------------------------------------------------------------------------------ commit policy
def test_the_policy_commits_at_the_interval_or_at_once_at_the_bound_or_when_idle():
    policy = CommitPolicy(interval_s=0.2, max_uncommitted=None, uncommitted_windows=8)
    assert policy.bound(window=4) == 32 and CommitPolicy(max_uncommitted=6).bound(window=4) == 6
    assert not policy.due(since_last_s=0.1, uncommitted=31, window=4, idle=False)
    assert policy.due(since_last_s=0.2, uncommitted=0, window=4, idle=False)
    assert policy.due(since_last_s=0.1, uncommitted=32, window=4, idle=False), "at the bound: reading has stopped"
    assert policy.due(since_last_s=0.1, uncommitted=1, window=4, idle=True), "nothing left to finish"


def test_the_policy_from_settings_is_one_bound_for_both_modes():
    from processor.settings import load_settings

    micro = CommitPolicy.from_settings(load_settings(generation_mode="micro_batch", continuous_max_uncommitted=5))
    continuous = CommitPolicy.from_settings(load_settings(generation_mode="continuous", continuous_max_uncommitted=5))
    assert micro.interval_s == 0.0 and micro.one_release_at_a_time and micro.bound(window=2) == 16
    assert continuous.interval_s > 0 and not continuous.one_release_at_a_time and continuous.bound(window=2) == 5


def test_the_checkpoint_reads_up_to_the_bound_and_holds_reading_while_a_commit_fails():
    consumer = FakeConsumer()
    checkpoint = AtLeastOnceCheckpoint(consumer=consumer, ownership=owned(0), window=lambda: 2,
                                       policy=CommitPolicy(max_uncommitted=3, retry_first_s=60.0))
    a, b = source(0, 0), source(0, 1)
    for src in (a, b):
        checkpoint.track(src)
    assert checkpoint.room() == 1
    checkpoint.finish(a, output(a))
    checkpoint.acked(checkpoint.release()[0])
    consumer.commit_failures.append(KafkaError(KafkaError.REQUEST_TIMED_OUT, "timed out", retriable=True))
    checkpoint.maybe_commit()  # fails within the retry budget: held, not raised
    assert checkpoint.holding and checkpoint.room() == 0 and consumer.commits == []
    checkpoint.maybe_commit()
    assert consumer.commits == [], "the retry waits out its backoff"
    checkpoint.maybe_commit(force=True)
    assert consumer.commits == [{(TOPIC, 0): 1}] and not checkpoint.holding and checkpoint.room() == 2


def test_commits_failing_longer_than_the_policy_allows_raise():
    consumer = FakeConsumer()
    checkpoint = AtLeastOnceCheckpoint(consumer=consumer, ownership=owned(0), policy=CommitPolicy(give_up_after_s=-1.0))
    a = source(0, 0)
    checkpoint.track(a)
    checkpoint.finish(a, output(a))
    checkpoint.acked(checkpoint.release()[0])
    consumer.commit_failures.append(KafkaError(KafkaError.REQUEST_TIMED_OUT, "timed out", retriable=True))
    with pytest.raises(CommitFailedError):
        checkpoint.maybe_commit()


def test_a_hold_after_a_failed_commit_ends_when_its_partitions_are_lost():
    """Found by the simulation: a commit failed, then the partitions were lost; nothing was left to commit, so no
    retry could ever succeed and lift the hold — the worker stopped reading for good."""
    consumer = FakeConsumer()
    ownership = owned(0)
    checkpoint = AtLeastOnceCheckpoint(consumer=consumer, ownership=ownership, window=lambda: 2,
                                       policy=CommitPolicy(max_uncommitted=3, retry_first_s=0.0))
    a = source(0, 0)
    checkpoint.track(a)
    checkpoint.finish(a, output(a))
    checkpoint.acked(checkpoint.release()[0])
    consumer.commit_failures.append(KafkaError(KafkaError.REQUEST_TIMED_OUT, "timed out", retriable=True))
    checkpoint.maybe_commit()
    assert checkpoint.holding and checkpoint.room() == 0
    ownership.revoke([(TOPIC, 0)])
    checkpoint.drop([(TOPIC, 0)])
    ownership.assign([(TOPIC, 0)])  # the group gives it back: reading must resume from the committed offset
    checkpoint.maybe_commit()
    assert not checkpoint.holding and checkpoint.room() > 0 and consumer.commits == []
