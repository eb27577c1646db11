"""The checkpoint: which input offsets are committed, when, and by whom (after quix-streams' BaseCheckpoint) — the
whole offset lifecycle behind one interface, so the loop never looks inside it.

    track (read) → finish (output built) → release / publish (to the sink) → acked (on the broker) → commit

`BaseCheckpoint` owns that lifecycle, ownership epochs (tracking.py) and the one `CommitPolicy` — when to commit
(interval, or at once at the uncommitted bound or when nothing is left to finish), how much may be read and not yet
committed (one bound for both generation modes), and how failed commits are retried. The guarantee is a variant on
top: `AtLeastOnceCheckpoint` (outputs go out through its sink as they finish; the consumer commits each partition's
acked prefix) or `TransactionalCheckpoint` (outputs and offsets commit atomically in one producer transaction).
`make_checkpoint` picks the variant from the settings. A failed commit holds the pipeline: nothing new is released
until a retry succeeds, and after `give_up_after_s` CommitFailedError ends the worker. CommitPolicy and
BaseCheckpoint live in checkpoint_base.py (imported from here as before).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from confluent_kafka import KafkaError, KafkaException

from processor.checkpoint_base import UNCOMMITTED_WINDOWS, BaseCheckpoint, CommitPolicy, to_topic_partitions
from processor.errors import CommitFailedError, OutputUnavailableError, TransactionFatalError
from processor.records import OutgoingRecord
from processor.settings import ProcessingGuarantee, Settings
from processor.sink import Sink
from processor.source import TP
from processor.tracking import OffsetTracker, Ownership, State

log = logging.getLogger(__name__)

__all__ = ["TP", "State", "Ownership", "OffsetTracker", "CommitPolicy", "BaseCheckpoint", "AtLeastOnceCheckpoint",
           "TransactionalCheckpoint", "make_checkpoint", "UNCOMMITTED_WINDOWS"]


class AtLeastOnceCheckpoint(BaseCheckpoint):
    """Outputs go out through the sink as they finish; the consumer commits each partition's acked prefix
    (synchronously). With the policy's `one_release_at_a_time`, nothing new is released while anything released is
    uncommitted, so that a crash duplicates at most one batch (micro-batch mode)."""

    def __init__(self, *, consumer: Any, sink: Sink | None = None, **base: Any) -> None:
        super().__init__(**base)
        self.consumer = consumer
        self.sink = sink

    @property
    def accepts_finished(self) -> bool:
        # One release at a time: while a finished batch waits behind the commit of the one released before it, a
        # second one handed over now would go out with it in one release, and a crash would duplicate both.
        return not (self.policy.one_release_at_a_time and self.finished_waiting)

    def release(self) -> list[OutgoingRecord]:
        """Finished outputs that may go out now, marked released (empty while holding after a failed commit)."""
        if self.holding or (self.policy.one_release_at_a_time and self.tracker.uncommitted_published()):
            return []
        return self.tracker.releasable(in_offset_order=False)

    @property
    def delivering(self) -> bool:
        return self.sink is not None and not self.sink.idle

    def publish(self) -> None:
        assert self.sink is not None
        if self.sink.accepting:
            self.sink.add(self.release())
        self.sink.poll(0)
        self.sink.raise_for_error()

    def serve(self, timeout: float) -> None:
        if self.sink is not None:
            self.sink.poll(timeout)

    def flush(self, timeout: float) -> None:
        if self.sink is not None:
            self.sink.flush(timeout)
            self.sink.raise_for_error()

    def commit(self) -> None:
        offsets = {tp: o for tp, o in self.tracker.committable().items() if o != self.committed_offsets.get(tp)}
        if not offsets:
            # Nothing left to commit (the partitions of a failed commit were revoked or lost meanwhile): no hold. Kept,
            # it would stop reading for good — nothing could ever succeed to lift it.
            self.holding = False
            return
        try:
            self.consumer.commit(offsets=to_topic_partitions(offsets), asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            self.holding = True
            raise CommitFailedError(f"offset commit failed: {error.str()}", retriable=error.retriable()) from None
        self._committed(offsets)

    def before_revoke(self, tps: list[TP]) -> None:
        """Still the owner: get acknowledgements in and commit what is acked, so the next owner starts after it
        (best effort)."""
        if self.sink is not None:
            self.sink.flush(10.0)
        try:
            self.commit()
        except CommitFailedError as exc:
            log.warning("commit during revoke failed (%s): the next owner re-reads from the last commit", exc)


class TransactionalCheckpoint(BaseCheckpoint):
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

    Each attempt delivers through a fresh sink from `new_sink` (by default one delivery attempt, acknowledging into
    this checkpoint): a sink whose transaction was aborted keeps its latched error and its late delivery reports to
    itself. Nothing goes out between commits: outputs are published inside commit()'s transaction."""

    def __init__(self, *, producer: Any, consumer: Any, flush_timeout_s: float, keep_alive: Callable[[], None],
                 max_attempts: int = 1, new_sink: Callable[[], Any] | None = None, **base: Any) -> None:
        super().__init__(**base)
        self.producer = producer
        self.consumer = consumer
        self.new_sink = new_sink or (lambda: Sink(producer=producer, max_attempts=1, on_acknowledged=self.acked))
        self.flush_timeout_s = flush_timeout_s
        self.keep_alive = keep_alive
        self.max_attempts = max_attempts
        self.failed_deliveries = 0  # aborted attempts in a row whose outputs were not delivered
        self._committing: tuple[list[OutgoingRecord], dict[TP, int]] | None = None  # commit_transaction() to resume
        self._aborting = False  # abort_transaction() to resume

    def start(self) -> None:
        self.producer.init_transactions(30)

    def release(self) -> list[OutgoingRecord]:
        return []  # outputs go out inside commit()'s transaction

    def commit(self) -> None:
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
            self.producer.send_offsets_to_transaction(to_topic_partitions(offsets), self.consumer.consumer_group_metadata(), 30)
            self._committing = (records, offsets)
            self.producer.commit_transaction(60)
        except KafkaException as exc:
            self._fail(exc.args[0])
        self._done(records, offsets)

    def _done(self, records: list[OutgoingRecord], offsets: dict[TP, int]) -> None:
        self._committing = None
        self.failed_deliveries = 0
        for record in records:
            self.tracker.acked(record.source)
        self._committed(offsets)

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


def _sink_error(sink: Any) -> str:
    try:
        sink.raise_for_error()
    except OutputUnavailableError as exc:
        return str(exc)
    return "not acknowledged in time"


def make_checkpoint(settings: Settings, *, consumer: Any, producer: Any, policy: CommitPolicy, ownership: Ownership,
                    window: Callable[[], int], keep_alive: Callable[[], None],
                    shrink: Callable[[OutgoingRecord], OutgoingRecord | None],
                    on_acknowledged: Callable[[OutgoingRecord], None] | None = None,
                    on_committed: Callable[[dict[TP, int], int], None] | None = None) -> BaseCheckpoint:
    """The checkpoint for PROCESSING_GUARANTEE."""
    base: dict[str, Any] = dict(ownership=ownership, policy=policy, window=window, on_acknowledged=on_acknowledged,
                                on_committed=on_committed)
    if settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE:
        # Inside a transaction a failed delivery dooms the whole transaction (librdkafka makes it abortable): no
        # re-send in it; the checkpoint aborts, the worker rewinds, and the batch is the unit of attempts.
        return TransactionalCheckpoint(producer=producer, consumer=consumer, keep_alive=keep_alive,
                                       flush_timeout_s=settings.delivery_timeout_ms / 1000 * settings.produce_max_attempts,
                                       max_attempts=settings.produce_max_attempts, **base)
    checkpoint = AtLeastOnceCheckpoint(consumer=consumer, **base)
    checkpoint.sink = Sink(producer=producer, max_attempts=settings.produce_max_attempts, on_acknowledged=checkpoint.acked,
                           shrink=shrink)
    return checkpoint
