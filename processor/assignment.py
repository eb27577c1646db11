"""The consumer side of the Worker: what it fetched and has not yet handed to the pipeline (the inbox), when to
fetch and when to pause and only keep the membership alive, and what a rebalance changes (assign, revoke, lost, the
rewind after an aborted transaction, finishing a join before leaving). Split from loop.py so the Worker holds only
the loop; every method runs on the loop's thread (the rebalance callbacks inside consume())."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, Message, TopicPartition

from processor.checkpoint import TP, BaseCheckpoint, Ownership
from processor.clients import BrokerHealth
from processor.errors import BrokerUnavailableError, RegistryUnavailableError
from processor.intake import source_of
from processor.metrics import Metrics
from processor.pipeline import Pipeline
from processor.reporting import Progress
from processor.retry import Backoff
from processor.settings import Settings

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
# While outputs are on their way to the broker the loop waits this long at most for an acknowledgement (it returns as
# soon as one arrives) instead of polling the consumer back to back with no timeout: that spin held the interpreter
# the engine's thread needs — ~4,000 empty loop turns a second in continuous mode on the embedded broker.
ACK_WAIT_S = 0.005
# While records are in hand (read, not yet committed), a wait for more lasts this long at most. librdkafka's consume()
# cannot be woken from another thread (confluent-kafka-python #1321: "use a lower poll timeout"), and it returns early
# only with as many records as asked for: on a topic with fewer (its end, a slow stream), what the engine finished,
# a batch waiting behind a commit, or a commit due after the last acknowledgement all waited the whole POLL_INTERVAL_S
# (measured on the embedded broker: 100 ms from the last generate() to its first produce(), 100 more to its commit).
# An idle loop still waits POLL_INTERVAL_S.
RESULT_WAIT_S = 0.01
PAUSE_AFTER_S = 0.5  # far below any max.poll.interval.ms librdkafka accepts (≥ 1 s)
# A stop during the group join waits this long at most for the join to complete, so the member can leave the group
# cleanly: mid-join, librdkafka's LeaveGroup waits behind the broker's pending JoinGroup and times out after 5 s
# without reaching it, and the embedded broker then keeps the group unusable for minutes. A second signal ends the
# wait at once. (The embedded broker's join with KAFKA_SESSION_TIMEOUT_MS=6000 takes ~3 s.)
FINISH_JOIN_MAX_S = 4.0


def names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"


class Assignment:
    """The partitions this worker owns as the consumer sees them, and the records fetched from them."""

    def __init__(self, settings: Settings, *, consumer: Any, pipeline: Pipeline, checkpoint: BaseCheckpoint,
                 ownership: Ownership, metrics: Metrics, health: BrokerHealth, progress: Progress,
                 registry_retry: Backoff, cooperative: bool) -> None:
        self.settings = settings
        self.consumer = consumer
        self.pipeline = pipeline
        self.checkpoint = checkpoint
        self.ownership = ownership
        self.metrics = metrics
        self.health = health
        self.progress = progress
        self._registry = registry_retry
        self._cooperative = cooperative
        self._inbox: deque[Message] = deque()  # consumed, not yet through intake (held while the registry is down)
        self.paused = False
        self.full_since: float | None = None
        self.subscribed = self.joined = False

    def subscribe(self) -> None:
        self.consumer.subscribe([self.settings.kafka_input_topic], on_assign=self.on_assign, on_revoke=self.on_revoke, on_lost=self.on_lost)
        self.subscribed = True

    # ------------------------------------------------------------------------------------------------ fetch
    def consume(self) -> None:
        wanted = 0 if self._inbox else min(self.pipeline.wanted(), self.checkpoint.room())
        if wanted > 0:
            self.full_since = None
            self.set_paused(False)
            due = self.pipeline.seconds_until_due()
            if self.checkpoint.delivering:
                self.checkpoint.serve(ACK_WAIT_S if due is None else min(ACK_WAIT_S, due))
                timeout = 0.0  # what librdkafka fetched meanwhile is taken, and the acknowledgements served next turn
            else:
                timeout = min(RESULT_WAIT_S if self.checkpoint.uncommitted else POLL_INTERVAL_S,
                              POLL_INTERVAL_S if due is None else due)
            self._fetch(min(wanted, 1000), timeout)
            return
        # Full. For a moment, simply stop taking records. If it lasts (a long generate()), pause every partition
        # and keep polling: paused partitions return nothing, but poll() keeps the group membership alive.
        # Pausing at once would cost a refetch per batch: librdkafka drops a paused partition's prefetched queue.
        self.full_since = self.full_since or time.monotonic()
        if time.monotonic() - self.full_since >= PAUSE_AFTER_S:
            self.keep_alive()
        if self.checkpoint.delivering:
            self.checkpoint.serve(ACK_WAIT_S)  # returns as soon as a delivery report arrives
        elif self.checkpoint.finished_waiting:
            self.pipeline.wait(RESULT_WAIT_S)  # a batch behind a commit: nothing from the engine wakes the wait for it
        else:
            # Wake seldom: every wake takes the GIL from the engine's thread, which needs it to launch kernels.
            self.pipeline.wait(0.25 if self.paused else 0.05)

    def keep_alive(self) -> None:
        """Poll with every partition paused: group membership stays alive, nothing new is fetched."""
        self.set_paused(True)
        self._fetch(1, 0)

    def _fetch(self, count: int, timeout: float) -> None:
        """consume() into the inbox. librdkafka serves rebalance callbacks inside consume(), so nothing they replace
        or re-number may be held across the call: the result goes to a local first, and the inbox is read after.
        A partition re-assigned inside the call (revoked or lost, then assigned again) may come back with messages
        fetched under its old assignment: those must not be processed under the new epoch, so they are dropped and
        the partition is sent back to where its new assignment starts (the committed offset)."""
        before = {tp: self.ownership.epoch(tp) for tp in self.ownership.partitions}
        messages = self.consumer.consume(count, timeout)
        reassigned = {tp for tp, epoch in before.items() if self.ownership.epoch(tp) not in (epoch, None)}
        if reassigned:
            refetch = {(m.topic(), m.partition()) for m in messages if m.error() is None} & reassigned
            messages = [m for m in messages if (m.topic(), m.partition()) not in refetch]
            self._restart_at_committed(refetch)
        self._inbox.extend(messages)

    def _restart_at_committed(self, tps: set[TP]) -> None:
        if not tps:
            return
        partitions = [TopicPartition(t, p) for t, p in sorted(tps)]
        reset = OFFSET_BEGINNING if self.settings.kafka_auto_offset_reset == "earliest" else OFFSET_END
        try:
            committed = self.consumer.committed(partitions, timeout=10)
        except KafkaException as exc:
            raise BrokerUnavailableError(f"committed offsets of re-assigned {names(partitions)} unavailable: {exc}") from None
        for tp in committed:
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else reset))
        log.info("re-assigned during a fetch: %s restarted at the committed offsets", names(partitions))

    def set_paused(self, paused: bool) -> None:
        if paused == self.paused:
            return
        partitions = self.consumer.assignment()
        if partitions:
            (self.consumer.pause if paused else self.consumer.resume)(partitions)
        self.paused = paused

    def drain_inbox(self) -> None:
        if self._registry.failing and not self._registry.due():
            return
        while self._inbox:
            message = self._inbox[0]
            error = message.error()
            if error is not None:
                self._inbox.popleft()
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", error.str())
                    if error.fatal():
                        raise KafkaException(error)
                continue
            if self.ownership.epoch((message.topic(), message.partition())) is None:
                self._inbox.popleft()  # fetched just before a revoke; the new owner reads it
                continue
            # The readable, owned records at the head of the inbox go through intake together (prompts in batches).
            sources = []
            for message in self._inbox:
                epoch = None if message.error() is not None else self.ownership.epoch((message.topic(), message.partition()))
                if epoch is None:
                    break
                sources.append(source_of(message, epoch))
            taken, stopped = self.pipeline.submit_many(sources)
            for source in sources[:taken]:
                self._inbox.popleft()
                self.health.ok()
                self.progress.consumed(source)
                self.checkpoint.track(source)
            if taken:
                self._registry.succeeded()
            if stopped is not None:
                if not isinstance(stopped, RegistryUnavailableError) or not self._registry.failed():
                    raise stopped
                log.error("schema registry unavailable, holding %d record(s), retry in %.1f s: %s",
                          len(self._inbox), self._registry.next_at - time.monotonic(), stopped)
                self.set_paused(True)
                return

    # ---------------------------------------------------------------------------------------------- rebalance
    def on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.joined = True
        self.ownership.assign((p.topic, p.partition) for p in partitions)
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if partitions:
            # Set the pause state explicitly both ways: librdkafka keeps a partition's pause flag across
            # unassign/assign, so a partition paused before a lost assignment comes back paused and never fetches.
            (consumer.pause if self.paused else consumer.resume)(partitions)
        log.info("assigned %s", names(partitions), extra={"partitions": [p.partition for p in partitions]})
        self.metrics.ready(engine_loaded=True, assigned=bool(self.ownership.partitions))

    def on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # While still the owner: whatever lets the next owner start after this worker's work.
        self.checkpoint.before_revoke([(p.topic, p.partition) for p in partitions])
        self.forget(partitions)
        log.info("revoked %s", names(partitions))

    def on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Lost means another member may already own them: committing now would be wrong.
        self.forget(partitions)
        log.warning("lost %s (membership expired); their work in flight is dropped", names(partitions))

    def forget(self, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self.ownership.revoke(tps)
        self.checkpoint.drop(tps)
        dropped = self.pipeline.drop(tps)
        # In place: this runs inside consume() (a rebalance callback), and the caller's inbox must stay the inbox.
        kept = [m for m in self._inbox if (m.topic(), m.partition()) not in tps]
        self._inbox.clear()
        self._inbox.extend(kept)
        for tp in tps:
            self.metrics.forget(tp)
        if dropped:
            log.info("dropped %d record(s) of revoked partitions; their new owner processes them", dropped)
        self.metrics.ready(engine_loaded=True, assigned=bool(self.ownership.partitions))

    def rewind(self) -> None:
        """After an aborted transaction: forget everything in flight and re-read from the committed offsets, or,
        where a partition has none yet, from the first record read (the aborted transaction's first offset)."""
        owned = [TopicPartition(t, p) for t, p in self.ownership.partitions]
        first_read = self.checkpoint.first_offsets()
        for message in self._inbox:
            tp = (message.topic(), message.partition())
            if message.error() is None and self.ownership.epoch(tp) is not None:
                first_read[tp] = min(first_read.get(tp, message.offset()), message.offset())
        try:
            committed = {(tp.topic, tp.partition): tp.offset for tp in self.consumer.committed(owned, timeout=10)}
        except KafkaException as exc:  # the first offsets read are where the aborted records start all the same
            log.warning("committed offsets unavailable for the rewind (%s): rewinding to the first records read", exc)
            committed = {}
        self.forget(owned)
        self.ownership.assign((tp.topic, tp.partition) for tp in owned)
        self.checkpoint.rewound()
        for tp in owned:
            key = (tp.topic, tp.partition)
            offset = committed.get(key, -1) if committed.get(key, -1) >= 0 else first_read.get(key)
            if offset is not None:
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        log.warning("rewound %s to the committed offsets after an aborted transaction", names(owned))

    def finish_join(self) -> None:
        """Stopped mid-join: let the join complete before closing, for a few seconds at most. A member that leaves
        before it has a member id cannot send LeaveGroup, and the group then waits for it (Tansu: for minutes) before
        anyone gets partitions. A second signal exits at once (handle_signal)."""
        limit = min(FINISH_JOIN_MAX_S, self.settings.kafka_session_timeout_ms / 1000)
        deadline = time.monotonic() + limit
        log.info("stopping during the group join: finishing the join (up to %.0f s) so the group is left cleanly; "
                 "a second signal exits at once", limit)
        self.paused = True  # _on_assign pauses what it gets: nothing is fetched or processed any more
        while not self.joined and time.monotonic() < deadline:
            self.consumer.consume(1, 0.2)
        if not self.joined:
            # Measured on Tansu: a join takes session.timeout.ms / 2 there, and a member that leaves mid-join keeps the
            # group from assigning anything for minutes (README, Operations).
            log.warning("the group join did not complete within %.0f s: leaving mid-join. On the embedded broker this can "
                        "keep group %s from assigning partitions for minutes (a new KAFKA_GROUP_ID avoids it; "
                        "KAFKA_SESSION_TIMEOUT_MS=6000 makes its joins take ~3 s)", limit, self.settings.kafka_group_id)

    # ------------------------------------------------------------------------------------------------ stop
    def stop_fetching(self) -> int:
        """Pause everything and forget what was fetched but not submitted; returns how many records that was (the
        next owner reads them)."""
        self.set_paused(True)
        held = len(self._inbox)
        self._inbox.clear()
        return held

    def leave(self) -> None:
        if self.subscribed and not self.joined and not self.health.down:
            self.finish_join()
        try:
            self.consumer.close()  # leaves the group at once, whatever state the join is in
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close: %s", exc)
