"""The checkpoint: which input offsets may be committed, in what order, by whom (after quix-streams' Checkpoint).

Every consumed record is tracked from the moment it is read until its offset is committed:

    pending ──(its summary or dead letter is built)──▶ finished ──(handed to the sink)──▶ released ──(acked)──▶ acked

Per partition only the contiguous prefix of acked offsets is committed, so work that finishes out of order
(continuous generation) never commits past a record whose output is not safely on the broker. Ownership rides
along: a partition's records carry the assignment epoch they were read under; after a revoke the partition's
track is dropped, and anything of the old epoch is neither released nor committed by this worker.

Two implementations share one interface: `AtLeastOnceCheckpoint` (outputs acked, then the consumer commits) and
`TransactionalCheckpoint` (outputs and offsets commit atomically in one producer transaction). A failed commit
raises CommitFailedError and the worker holds: nothing new is released until a retry succeeds.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Iterable, Protocol

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from processor.source import SourceRecord
from processor.errors import CommitFailedError, OutputUnavailableError, TransactionFatalError
from processor.records import OutgoingRecord

log = logging.getLogger(__name__)

TP = tuple[str, int]


class State(IntEnum):
    PENDING = 0
    FINISHED = 1
    RELEASED = 2
    ACKED = 3


@dataclass
class _Entry:
    source: SourceRecord
    state: State = State.PENDING
    record: OutgoingRecord | None = None


@dataclass
class _Partition:
    epoch: int
    entries: "OrderedDict[int, _Entry]" = field(default_factory=OrderedDict)  # offset → entry, in offset order
    committed: int | None = None  # the last offset this worker committed (next to read)
    unreleased: int = 0  # entries FINISHED and not yet released: releasable() skips a partition with none


class Ownership:
    """Assignment epochs: a record is this worker's only while its partition's epoch is the one it was read under."""

    def __init__(self) -> None:
        self._epochs: dict[TP, int] = {}
        self._counter = 0

    def assign(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._counter += 1
            self._epochs[tp] = self._counter

    def revoke(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._epochs.pop(tp, None)

    def epoch(self, tp: TP) -> int | None:
        return self._epochs.get(tp)

    def owns(self, source: SourceRecord) -> bool:
        return self._epochs.get((source.topic, source.partition)) == source.epoch

    @property
    def partitions(self) -> list[TP]:
        return sorted(self._epochs)


class OffsetTracker:
    """Per partition, the records read and not yet committed, each with its state, in offset order."""

    def __init__(self, ownership: Ownership) -> None:
        self.ownership = ownership
        self._partitions: dict[TP, _Partition] = {}

    def track(self, source: SourceRecord) -> None:
        tp = (source.topic, source.partition)
        partition = self._partitions.get(tp)
        if partition is None or partition.epoch != source.epoch:
            partition = self._partitions[tp] = _Partition(source.epoch)
        partition.entries[source.offset] = _Entry(source)

    def _entry(self, source: SourceRecord) -> _Entry | None:
        partition = self._partitions.get((source.topic, source.partition))
        if partition is None or partition.epoch != source.epoch or not self.ownership.owns(source):
            return None
        return partition.entries.get(source.offset)

    def finish(self, source: SourceRecord, record: OutgoingRecord) -> bool:
        """Attach a finished record's output; False when it is no longer this worker's (revoked meanwhile)."""
        entry = self._entry(source)
        if entry is None or entry.state is not State.PENDING:
            return False
        entry.state, entry.record = State.FINISHED, record
        self._partitions[(source.topic, source.partition)].unreleased += 1
        return True

    def acked(self, source: SourceRecord) -> None:
        entry = self._entry(source)
        if entry is not None and entry.state is State.RELEASED:
            entry.state = State.ACKED

    def releasable(self, in_offset_order: bool) -> list[OutgoingRecord]:
        """Finished outputs that may go to the sink now, marked released.

        `in_offset_order`: only each partition's finished prefix (exactly-once: a transaction must not carry an
        output whose offset it does not commit). Otherwise every finished output, except one whose key is shared
        with an earlier unfinished record of its partition, so that per-key order holds downstream.
        """
        out: list[OutgoingRecord] = []
        for tp, partition in self._partitions.items():
            if not partition.unreleased or self.ownership.epoch(tp) != partition.epoch:
                continue  # nothing finished waits here: no walk over its (up to four windows of) entries
            blocked_keys: set[bytes] = set()
            for entry in partition.entries.values():
                if entry.state is State.PENDING:
                    if in_offset_order:
                        break
                    if entry.source.key is not None:
                        blocked_keys.add(entry.source.key)
                    continue
                if entry.state is State.FINISHED:
                    if entry.source.key is not None and entry.source.key in blocked_keys:
                        continue
                    assert entry.record is not None
                    entry.state = State.RELEASED
                    partition.unreleased -= 1
                    out.append(entry.record)
        return out

    def committable(self, upto: State = State.ACKED) -> dict[TP, int]:
        """Per owned partition, the offset after its contiguous prefix of records in state ≥ `upto` (if any)."""
        offsets: dict[TP, int] = {}
        for tp, partition in self._partitions.items():
            if self.ownership.epoch(tp) != partition.epoch:
                continue
            end = None
            for offset, entry in partition.entries.items():
                if entry.state < upto:
                    break
                end = offset + 1
            if end is not None:
                offsets[tp] = end
        return offsets

    def committed(self, offsets: dict[TP, int]) -> int:
        """Forget what was committed; return how many records that was."""
        count = 0
        for tp, end in offsets.items():
            partition = self._partitions.get(tp)
            if partition is None:
                continue
            while partition.entries and next(iter(partition.entries)) < end:
                partition.entries.popitem(last=False)
                count += 1
            partition.committed = end
        return count

    def first_offsets(self) -> dict[TP, int]:
        """Per owned partition, the first offset read and not yet committed (where a rewind must start)."""
        return {tp: next(iter(p.entries)) for tp, p in self._partitions.items()
                if p.entries and self.ownership.epoch(tp) == p.epoch}

    def drop(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._partitions.pop(tp, None)

    def __len__(self) -> int:
        """Records read and not yet committed."""
        return sum(len(partition.entries) for partition in self._partitions.values())

    def counts(self) -> dict[State, int]:
        totals = {state: 0 for state in State}
        for partition in self._partitions.values():
            for entry in partition.entries.values():
                totals[entry.state] += 1
        return totals

    def uncommitted_published(self) -> int:
        counts = self.counts()
        return counts[State.RELEASED] + counts[State.ACKED]

    def last_committed(self) -> dict[TP, int]:
        return {tp: p.committed for tp, p in self._partitions.items() if p.committed is not None}


class Checkpoint(Protocol):
    """What the worker needs from a checkpoint, whatever the processing guarantee."""

    ownership: Ownership
    tracker: OffsetTracker
    committed_offsets: dict[TP, int]
    records_committed: int
    holding: bool  # a commit failed: nothing new is released until one succeeds
    needs_rewind: bool  # a transaction was aborted: re-read from the committed offsets

    def release(self) -> list[OutgoingRecord]:
        """Outputs to hand to the sink now (empty while holding after a failed commit)."""
        ...

    def commit(self, force: bool = False) -> None:
        """Commit what is safe to commit; raises CommitFailedError (hold and retry) or TransactionFatalError."""
        ...

    def before_revoke(self, tps: list[TP]) -> None: ...


def _to_topic_partitions(offsets: dict[TP, int]) -> list[TopicPartition]:
    return [TopicPartition(topic, partition, offset) for (topic, partition), offset in sorted(offsets.items())]


class AtLeastOnceCheckpoint:
    """Outputs go out as they finish; the consumer commits each partition's acked prefix (synchronously).

    `one_batch_at_a_time`: release nothing new while anything released is uncommitted, so that a crash duplicates
    at most one batch (micro-batch mode). In continuous mode the bound is the in-flight window instead.
    """

    def __init__(self, *, consumer: Any, ownership: Ownership, one_batch_at_a_time: bool, min_commit_interval_s: float = 0.0,
                 on_committed: Callable[[dict[TP, int], int], None] | None = None) -> None:
        self.consumer = consumer
        self.ownership = ownership
        self.tracker = OffsetTracker(ownership)
        self.one_batch_at_a_time = one_batch_at_a_time
        self.min_commit_interval_s = min_commit_interval_s
        self.on_committed = on_committed
        self.committed_offsets: dict[TP, int] = {}
        self.records_committed = 0
        self.holding = False  # a commit failed: release nothing until one succeeds
        self.needs_rewind = False  # never: without a transaction there is nothing to abort
        self._last_commit = 0.0

    def release(self) -> list[OutgoingRecord]:
        if self.holding or (self.one_batch_at_a_time and self.tracker.uncommitted_published()):
            return []
        return self.tracker.releasable(in_offset_order=False)

    def commit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and not self.holding and now - self._last_commit < self.min_commit_interval_s:
            return  # before walking the tracker: the loop asks on every step
        offsets = {tp: o for tp, o in self.tracker.committable().items() if o != self.committed_offsets.get(tp)}
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=_to_topic_partitions(offsets), asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            self.holding = True
            raise CommitFailedError(f"offset commit failed: {error.str()}", retriable=error.retriable()) from None
        self.holding = False
        self._last_commit = now
        count = self.tracker.committed(offsets)
        self.records_committed += count
        self.committed_offsets.update(offsets)
        if self.on_committed:
            self.on_committed(offsets, count)

    def before_revoke(self, tps: list[TP]) -> None:
        """Still the owner: commit what is acked, so the next owner starts after it (best effort)."""
        try:
            self.commit(force=True)
        except CommitFailedError as exc:
            log.warning("commit during revoke failed (%s): the next owner re-reads from the last commit", exc)


class TransactionalCheckpoint:
    """Exactly-once: each commit is one producer transaction holding the outputs of a contiguous prefix of input
    records and the consumer offsets after it. librdkafka's errors are handled as rd_kafka_commit_transaction()
    documents them (and confluent-kafka's transactional examples do):

      * retriable from commit_transaction() (a timeout): the commit goes on in the background; the next commit()
        calls commit_transaction() again, alone: the transaction's offsets are already in it, and librdkafka refuses
        send_offsets_to_transaction() while a commit is in progress;
      * txn_requires_abort() (a failed delivery, a revoke meanwhile, any other non-fatal error): abort_transaction(),
        and the worker rewinds to the committed offsets and processes the records again. An abort for outputs that
        were not delivered counts as one delivery attempt of those records: after `max_attempts` of them in a row,
        OutputUnavailableError (exit 4). A retriable abort_transaction() failure is retried the same way, alone;
      * fatal() (fenced by another worker with the same transactional.id): TransactionFatalError (exit 7).

    Each attempt delivers through a fresh sink from `new_sink`: a sink whose transaction was aborted keeps its
    latched error and its late delivery reports to itself."""

    def __init__(self, *, producer: Any, consumer: Any, new_sink: Callable[[], Any], ownership: Ownership, flush_timeout_s: float,
                 keep_alive: Callable[[], None], max_attempts: int = 1,
                 on_committed: Callable[[dict[TP, int], int], None] | None = None, min_commit_interval_s: float = 0.0) -> None:
        self.producer = producer
        self.consumer = consumer
        self.new_sink = new_sink
        self.ownership = ownership
        self.tracker = OffsetTracker(ownership)
        self.flush_timeout_s = flush_timeout_s
        self.keep_alive = keep_alive
        self.max_attempts = max_attempts
        self.on_committed = on_committed
        self.min_commit_interval_s = min_commit_interval_s
        self.committed_offsets: dict[TP, int] = {}
        self.records_committed = 0
        self.holding = False
        self.needs_rewind = False  # an aborted transaction: the worker must re-read from the committed offsets
        self.failed_deliveries = 0  # aborted attempts in a row whose outputs were not delivered
        self._last_commit = 0.0
        self._committing: tuple[list[OutgoingRecord], dict[TP, int]] | None = None  # commit_transaction() to resume
        self._aborting = False  # abort_transaction() to resume

    def release(self) -> list[OutgoingRecord]:
        return []  # outputs go out inside commit()'s transaction

    def commit(self, force: bool = False) -> None:
        if self._aborting:  # abort_transaction() timed out: call it again, alone, before anything else
            self._abort_open("a previous abort_transaction() did not complete")
        if self._committing is not None:  # commit_transaction() timed out: call it again, alone
            records, offsets = self._committing
            try:
                self.producer.commit_transaction(60)
            except KafkaException as exc:
                self._fail(exc.args[0])
            self._done(records, offsets)
            return
        if not force and time.monotonic() - self._last_commit < self.min_commit_interval_s:
            return  # before walking the tracker: the loop asks on every step
        offsets = {tp: o for tp, o in self.tracker.committable(upto=State.FINISHED).items() if o != self.committed_offsets.get(tp)}
        if not offsets:
            return
        # The epochs the offsets were read under: a callback served by the keep-alive polls inside the flush may
        # revoke, lose or re-assign a partition, and then this transaction must not commit its offsets.
        epochs = {tp: self.ownership.epoch(tp) for tp in offsets}
        records = self.tracker.releasable(in_offset_order=True)
        sink = self.new_sink()
        try:
            self.producer.begin_transaction()
            sink.add(records)
            if not sink.flush(self.flush_timeout_s, keep_alive=self.keep_alive):
                self._abort(f"outputs not delivered: {_sink_error(sink)}", delivery=True)
            if any(self.ownership.epoch(tp) != epoch for tp, epoch in epochs.items()):
                self._abort("partitions revoked or lost during the transaction")
            self.producer.send_offsets_to_transaction(_to_topic_partitions(offsets), self.consumer.consumer_group_metadata(), 30)
            self._committing = (records, offsets)
            self.producer.commit_transaction(60)
        except KafkaException as exc:
            self._fail(exc.args[0])
        self._done(records, offsets)

    def _done(self, records: list[OutgoingRecord], offsets: dict[TP, int]) -> None:
        self._committing = None
        self.holding = False
        self.failed_deliveries = 0
        self._last_commit = time.monotonic()
        for record in records:
            self.tracker.acked(record.source)
        count = self.tracker.committed(offsets)
        self.records_committed += count
        self.committed_offsets.update(offsets)
        if self.on_committed:
            self.on_committed(offsets, count)

    def _fail(self, error: KafkaError) -> None:
        if error.fatal():
            raise TransactionFatalError(f"transactional producer fatal error (fenced by another worker with the same "
                                        f"TRANSACTIONAL_ID_SUFFIX?): {error.str()}") from None
        if self._committing is not None and error.retriable() and not error.txn_requires_abort():
            self.holding = True
            raise CommitFailedError(f"transaction commit failed ({error.str()}); retrying", retriable=True) from None
        self._abort(error.str())

    def _abort(self, reason: str, delivery: bool = False) -> None:
        """Abort the open transaction and raise what the worker does next. Its records were released into it, so
        whatever happens to the abort, the worker must process them again from the committed offsets."""
        self._committing = None
        self.holding = True
        self.needs_rewind = True
        self._aborting = True
        self._abort_open(reason)
        if delivery:
            self.failed_deliveries += 1
            if self.failed_deliveries >= self.max_attempts:
                raise OutputUnavailableError(f"transactional outputs not delivered after {self.failed_deliveries} "
                                             f"attempt(s) ({reason}); nothing of them committed")
        raise CommitFailedError(f"transaction aborted ({reason}); re-reading from the committed offsets")

    def _abort_open(self, reason: str) -> None:
        try:
            self.producer.abort_transaction(30)
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal():
                raise TransactionFatalError(f"abort_transaction() failed: {error.str()}") from None
            if not error.retriable():  # no transaction open (begin_transaction() itself failed): nothing to resume
                self._aborting = self.holding = False
            raise CommitFailedError(f"abort_transaction() failed ({error.str()}) after: {reason}; retrying", retriable=True) from None
        self._aborting = False
        self.holding = False  # the rewound records are read again

    def before_revoke(self, tps: list[TP]) -> None:
        """Nothing to do: an open transaction sees the revoke through the epochs it captured, and aborts."""


def _sink_error(sink: Any) -> str:
    try:
        sink.raise_for_error()
    except OutputUnavailableError as exc:
        return str(exc)
    return "not acknowledged in time"
