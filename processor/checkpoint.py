"""The checkpoint: which input offsets are committed, when, and by whom (after quix-streams' BaseCheckpoint) — the
whole offset lifecycle behind one interface, so the loop never looks inside it.

    track (read) → finish (output built) → release / publish (to the sink) → acked (on the broker) → commit

`BaseCheckpoint` owns that lifecycle, ownership epochs (tracking.py) and the one `CommitPolicy` — when to commit
(interval, or at once at the uncommitted bound or when nothing is left to finish), how much may be read and not yet
committed (one bound for both generation modes), and how failed commits are retried. The guarantee is a variant on
top: `AtLeastOnceCheckpoint` (outputs go out through its sink as they finish; the consumer commits each partition's
acked prefix) or `TransactionalCheckpoint` (outputs and offsets commit atomically in one producer transaction).
`make_checkpoint` picks the variant from the settings. A failed commit holds the pipeline: nothing new is released
until a retry succeeds, and after `give_up_after_s` CommitFailedError ends the worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from processor.errors import CommitFailedError, OutputUnavailableError, TransactionFatalError
from processor.records import OutgoingRecord
from processor.retry import Backoff
from processor.settings import GenerationMode, ProcessingGuarantee, Settings
from processor.sink import Sink
from processor.source import TP, SourceRecord
from processor.tracking import OffsetTracker, Ownership, State

log = logging.getLogger(__name__)

__all__ = ["TP", "State", "Ownership", "OffsetTracker", "CommitPolicy", "BaseCheckpoint", "AtLeastOnceCheckpoint",
           "TransactionalCheckpoint", "make_checkpoint", "UNCOMMITTED_WINDOWS"]

# Records read but not committed ≤ this many windows (the engine's unit of work: a micro-batch, or the requests the
# continuous engine holds) unless CONTINUOUS_MAX_UNCOMMITTED says otherwise (the duplicate bound after a crash).
# Out-of-order completion piles finished-but-uncommitted records up behind a partition's slowest request: about the
# engine's throughput × that request's time, with summary lengths of median ~270 and a tail to 1,536 tokens up to ~5
# windows (~300 records at a window of 64). bench/uncommitted_bound.py: four windows stopped reading 10 times in 1,000
# events and cost the engine 1-2 % more steps; eight never; one window ran the engine at 0.4 of its speed. In
# micro_batch mode it binds only while a commit is slow: finished batches then wait their turn (one release at a time).
UNCOMMITTED_WINDOWS = 8
# Continuous generation finishes a request at a time: committing on every one would be a commit per record.
CONTINUOUS_COMMIT_EVERY_S = 0.2


@dataclass(frozen=True)
class CommitPolicy:
    """When to commit and how much may wait uncommitted: asked by the checkpoint alone (arroyo's CommitPolicy,
    quix's "expired() or force")."""

    interval_s: float = 0.0  # commit at most this often ...
    max_uncommitted: int | None = None  # ... unless this many records are read and uncommitted (None: windows × window)
    uncommitted_windows: int = UNCOMMITTED_WINDOWS
    # Release nothing new while anything released is uncommitted: a crash duplicates at most one micro-batch.
    one_release_at_a_time: bool = False
    retry_first_s: float = 0.5  # a failed commit is retried after this, doubling ...
    give_up_after_s: float = 60.0  # ... until commits have failed this long

    @classmethod
    def from_settings(cls, settings: Settings) -> "CommitPolicy":
        continuous = settings.generation_mode is GenerationMode.CONTINUOUS
        return cls(interval_s=CONTINUOUS_COMMIT_EVERY_S if continuous else 0.0,
                   max_uncommitted=settings.continuous_max_uncommitted if continuous else None,
                   one_release_at_a_time=not continuous, give_up_after_s=settings.broker_unavailable_timeout_s)

    def bound(self, window: int) -> int:
        """Records read and not committed, at most, for an engine whose unit of work is `window` records."""
        return self.max_uncommitted or self.uncommitted_windows * max(1, window)

    def due(self, *, since_last_s: float, uncommitted: int, window: int, idle: bool) -> bool:
        """Commit now? When the interval has passed, or when waiting gains nothing: at the bound reading has stopped
        until a commit makes room, and with nothing left to finish no more finishes are coming to share the commit."""
        return since_last_s >= self.interval_s or uncommitted >= self.bound(window) or idle


def _to_topic_partitions(offsets: dict[TP, int]) -> list[TopicPartition]:
    return [TopicPartition(topic, partition, offset) for (topic, partition), offset in sorted(offsets.items())]


class BaseCheckpoint:
    """The offset lifecycle and the commit policy; a variant implements `commit()` (and publishing, if it has a
    sink of its own). `window` is the engine's unit of work now (the pipeline's), for the uncommitted bound."""

    def __init__(self, *, ownership: Ownership, policy: CommitPolicy, window: Callable[[], int] = lambda: 1,
                 on_acknowledged: Callable[[OutgoingRecord], None] | None = None,
                 on_committed: Callable[[dict[TP, int], int], None] | None = None) -> None:
        self.ownership = ownership
        self.policy = policy
        self.window = window
        self.tracker = OffsetTracker(ownership)
        self.on_acknowledged = on_acknowledged
        self.on_committed = on_committed
        self.committed_offsets: dict[TP, int] = {}
        self.records_committed = 0
        self.holding = False  # a commit failed: nothing new is released until one succeeds
        self.needs_rewind = False  # a transaction was aborted: the loop re-reads from the committed offsets
        self.retry = Backoff(give_up_after_s=policy.give_up_after_s, first_s=policy.retry_first_s)
        self._last_commit = 0.0

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Before the first record is read."""

    def track(self, source: SourceRecord) -> None:
        self.tracker.track(source)

    def finish(self, source: SourceRecord, record: OutgoingRecord) -> bool:
        """Attach a finished record's output; False when it is no longer this worker's (revoked meanwhile)."""
        return self.tracker.finish(source, record)

    def acked(self, record: OutgoingRecord) -> None:
        """The broker acknowledged an output (the sink's callback)."""
        self.tracker.acked(record.source)
        if self.on_acknowledged is not None:
            self.on_acknowledged(record)

    def drop(self, tps: Iterable[TP]) -> None:
        """Partitions revoked or lost: forget their records (their new owner reads them)."""
        self.tracker.drop(tps)

    def first_offsets(self) -> dict[TP, int]:
        """Per owned partition, the first offset read and not yet committed (where a rewind must start)."""
        return self.tracker.first_offsets()

    def rewound(self) -> None:
        self.needs_rewind = False

    @property
    def uncommitted(self) -> int:
        """Records read and not yet committed."""
        return len(self.tracker)

    @property
    def max_uncommitted(self) -> int:
        return self.policy.bound(self.window())

    def room(self) -> int:
        """Records that may be read now: none while holding after a failed commit, else up to the bound."""
        return 0 if self.holding else max(0, self.max_uncommitted - self.uncommitted)

    @property
    def accepts_finished(self) -> bool:
        """Whether the loop may hand over the next finished unit of work (a micro-batch) now."""
        return True

    @property
    def finished_waiting(self) -> int:
        """Outputs built and not yet handed on (waiting behind a commit)."""
        return self.tracker.counts()[State.FINISHED]

    # ------------------------------------------------------------------------------------------- publishing
    @property
    def delivering(self) -> bool:
        """Outputs on their way to the broker (the loop then polls for acknowledgements rather than sleeps)."""
        return False

    def publish(self) -> None:
        """Hand what may go out now to the sink and serve its acknowledgements; raises OutputUnavailableError."""

    def serve(self, timeout: float) -> None:
        """Wait up to `timeout` for acknowledgements."""

    def flush(self, timeout: float) -> None:
        """Get every output out and acknowledged, up to `timeout`; raises OutputUnavailableError."""

    # ------------------------------------------------------------------------------------------- committing
    def maybe_commit(self, *, idle: bool = False, force: bool = False) -> None:
        """Commit what is safe, when the policy says so (or `force`): the loop asks on every step, `idle` when nothing
        is left to finish. A failed commit holds the pipeline and is retried with backoff; CommitFailedError once
        commits have failed for longer than the policy allows, TransactionFatalError or OutputUnavailableError at once."""
        if self.retry.failing and not self.retry.due() and not force:
            return
        due = self.policy.due(since_last_s=time.monotonic() - self._last_commit, uncommitted=self.uncommitted,
                              window=self.window(), idle=idle)
        if not (force or self.holding or due):
            return  # before walking the tracker: the loop asks on every step
        try:
            self.commit()
        except CommitFailedError as exc:
            if not self.retry.failed():
                raise
            log.warning("%s; holding the pipeline, retry %d in %.1f s", exc, self.retry.attempts, self.retry.next_at - time.monotonic())
            return
        self.retry.succeeded()

    def commit(self) -> None:
        """Commit what is safe to commit now; raises CommitFailedError (hold and retry), TransactionFatalError or
        OutputUnavailableError."""
        raise NotImplementedError

    def _committed(self, offsets: dict[TP, int]) -> None:
        self.holding = False
        self._last_commit = time.monotonic()
        count = self.tracker.committed(offsets)
        self.records_committed += count
        self.committed_offsets.update(offsets)
        if self.on_committed:
            self.on_committed(offsets, count)

    def before_revoke(self, tps: list[TP]) -> None:
        """Still the owner of `tps`: whatever lets the next owner start after this worker's work."""


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
            self.consumer.commit(offsets=_to_topic_partitions(offsets), asynchronous=False)
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
            self.producer.send_offsets_to_transaction(_to_topic_partitions(offsets), self.consumer.consumer_group_metadata(), 30)
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
