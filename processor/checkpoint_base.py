"""What both processing guarantees share (checkpoint.py holds the variants and make_checkpoint): the CommitPolicy —
when to commit, how much may wait uncommitted — and BaseCheckpoint, the offset lifecycle over ownership epochs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from confluent_kafka import TopicPartition

from processor.errors import CommitFailedError
from processor.records import OutgoingRecord
from processor.retry import Backoff
from processor.settings import GenerationMode, Settings
from processor.source import TP, SourceRecord
from processor.tracking import OffsetTracker, Ownership, State

log = logging.getLogger(__name__)

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


def to_topic_partitions(offsets: dict[TP, int]) -> list[TopicPartition]:
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
