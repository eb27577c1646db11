"""The Worker: only the consumer loop — poll, pause and keep-alive, rebalance, broker health, start and stop (after
Sentry arroyo's StreamProcessor) — over two interfaces it does not look inside:

  pipeline.py    a consumed record in, its summary or dead letter out: intake → generation (micro_batch or
                 continuous, chosen once by make_pipeline) → records
  checkpoint.py  the offset lifecycle (track, finish, publish, acked, commit), ownership epochs and the one
                 CommitPolicy; at-least-once or transactional, chosen once by make_checkpoint
  clients.py     the Kafka clients' configuration and the broker's health

Failures follow errors.py: a RecordError becomes that record's dead letter and its offset is committed; an
InfrastructureError (engine, registry, broker, commit, output) holds the pipeline — nothing dead-lettered, nothing
committed past it — and is retried with backoff while the consumer keeps polling, then ends the worker with the
error's exit code. Memory stays bounded: when the pipeline wants nothing (or the commit policy's uncommitted bound is
reached), every assigned partition is paused and the loop keeps calling poll(), so the consumer never exceeds
max.poll.interval.ms however long generate() takes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, TypeVar

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, Message, TopicPartition

from processor.checkpoint import TP, BaseCheckpoint, CommitPolicy, Ownership, make_checkpoint
from processor.clients import BrokerHealth, consumer_config, is_cooperative, make_consumer, make_producer, max_record_bytes, producer_config
from processor.codec import Codec, make_codec
from processor.engines.base import Engine, EngineStartupError
from processor.errors import EXIT_OK, BrokerUnavailableError, CommitFailedError, InfrastructureError, RegistryUnavailableError
from processor.intake import source_of
from processor.metrics import Metrics
from processor.pipeline import Pipeline, make_pipeline
from processor.records import OutgoingRecord
from processor.retry import Backoff
from processor.settings import Settings

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
PAUSE_AFTER_S = 0.5  # far below any max.poll.interval.ms librdkafka accepts (≥ 1 s)
LAG_EVERY_S = 5.0
REPORT_EVERY_S = 10.0
# While the worker runs, a thread waiting for the GIL gets it after at most this long (CPython's default: 5 ms).
# The engine's thread wakes from the GPU many times a second and must not wait behind the loop's Python work: on
# an H100 with vLLM 0.24 (bench/gpu_bench.py, bench/results/switch-interval/) micro-batches went from 0.89 to 0.95
# of the engine alone, and the continuous feed needed ~1.6 % more engine steps than the engine alone (2-3 % at 5 ms).
GIL_SWITCH_INTERVAL_S = 0.001
# A stop during the group join waits this long at most for the join to complete, so the member can leave the group
# cleanly: mid-join, librdkafka's LeaveGroup waits behind the broker's pending JoinGroup and times out after 5 s
# without reaching it, and the embedded broker then keeps the group unusable for minutes. A second signal ends the
# wait at once. (The embedded broker's join with KAFKA_SESSION_TIMEOUT_MS=6000 takes ~3 s.)
FINISH_JOIN_MAX_S = 4.0
STOP_CHECK_S = 0.1  # how often a wait during start-up (the warm-up) looks for a stop


def exit_at_once(code: int) -> None:
    """A second SIGTERM/SIGINT: flush the log and leave without waiting for anything (nothing is committed that was
    not acknowledged, so what was in flight is simply read again by the next owner)."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - exiting regardless
            pass
    os._exit(code)


T = TypeVar("T")


def load_or_stop(load: Callable[[], T], what: str, *, exit_now: Callable[[int], None] = exit_at_once) -> T:
    """Run `load` (the model load) so that SIGTERM or SIGINT ends the process at once with exit 0, as any requested stop
    does. Nothing is owned yet (no partition, no offset, nothing in flight), so there is nothing to finish; and a load is
    long native code (imports, weights, CUDA) that an exception raised inside it can leave half-initialised: measured
    with a KeyboardInterrupt inside `import torch`, the process aborted at exit or the interrupt was swallowed and the
    load went on. The previous handlers are back when it returns."""

    def stop(signum: int, _frame: object) -> None:
        log.info("%s while %s: nothing is owned yet, exiting %d now", signal.Signals(signum).name, what, EXIT_OK)
        exit_now(EXIT_OK)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum in previous:
        signal.signal(signum, stop)
    log.info("%s (SIGTERM/SIGINT stops it)", what)
    try:
        return load()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"


class Worker:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        consumer: Any = None,
        producer: Any = None,
        consumer_overrides: dict[str, Any] | None = None,
        producer_overrides: dict[str, Any] | None = None,
        metrics: Metrics | None = None,
        codec: Codec | None = None,
        commit_policy: CommitPolicy | None = None,
        pipeline: Pipeline | None = None,
        registry_retry: Backoff | None = None,
        exit_now: Callable[[int], None] = exit_at_once,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.codec: Codec = codec or make_codec(settings.schema_registry_url, max_results=settings.max_event_results)
        self.metrics = metrics or Metrics()
        self.health = BrokerHealth(bootstrap=settings.kafka_bootstrap_servers, timeout_s=settings.broker_unavailable_timeout_s,
                                   probe=lambda: self.consumer.list_topics(settings.kafka_input_topic, timeout=2.0))
        consumer_conf = consumer_config(settings, self.health.on_client_error, consumer_overrides)
        producer_conf = producer_config(settings, self.health.on_client_error, producer_overrides)
        self._cooperative = is_cooperative(consumer_conf)
        self.consumer = consumer if consumer is not None else make_consumer(consumer_conf)
        self.producer = producer if producer is not None else make_producer(producer_conf)

        self.pipeline: Pipeline = pipeline or make_pipeline(settings, engine, self.codec, max_record_bytes=max_record_bytes(producer_conf))
        self.ownership = Ownership()
        self.checkpoint: BaseCheckpoint = make_checkpoint(
            settings, consumer=self.consumer, producer=self.producer, policy=commit_policy or CommitPolicy.from_settings(settings),
            ownership=self.ownership, window=self.pipeline.window, keep_alive=self._keep_alive, shrink=self.pipeline.smaller,
            on_acknowledged=self._on_acknowledged, on_committed=self._on_committed)
        self.metrics.watch_engine(self.pipeline.stalled_for, settings.engine_call_timeout_s)  # /healthz, /readyz

        self._inbox: deque[Message] = deque()  # consumed, not yet through intake (held while the registry is down)
        # Finished work (one pipeline.take() each: a micro-batch) the checkpoint does not accept yet: handed on one at
        # a time, so that a commit never releases two batches at once (the engine meanwhile goes on generating).
        self._finished: deque[list[OutgoingRecord]] = deque()
        self._registry = registry_retry or Backoff(give_up_after_s=settings.infrastructure_retry_timeout_s)
        self._paused = False
        self._full_since: float | None = None
        self._stop = threading.Event()
        self._exit_now = exit_now
        self._signals = 0
        self._warm_up_abandoned = False
        self._subscribed = self._joined = False
        self._lag_observed_at = 0.0
        self._idle_reported = self._busy_reported = 0.0
        self._reported_at = time.monotonic()
        self._unassigned_warned_at = time.monotonic()
        self.totals = {"consumed": 0, "summaries": 0, "dead_letters": 0, "prompt_tokens": 0, "completion_tokens": 0}

    # ------------------------------------------------------------------------------------------------ control
    @property
    def max_uncommitted(self) -> int:
        """Records read but not yet committed, at most (the commit policy's one bound, in windows of the engine)."""
        return self.checkpoint.max_uncommitted

    @property
    def committed(self) -> dict[TP, int]:
        """What this worker committed last, per partition (tests, lag, backfill progress)."""
        return self.checkpoint.committed_offsets

    @property
    def records_committed(self) -> int:
        """Input records whose outcome is acknowledged and committed."""
        return self.checkpoint.records_committed

    @property
    def assigned(self) -> list[TP]:
        return self.ownership.partitions

    @property
    def paused(self) -> bool:
        return self._paused

    def full_for(self) -> float | None:
        """Seconds generation has wanted no more records, or None while it takes them."""
        return None if self._full_since is None else time.monotonic() - self._full_since

    def request_stop(self) -> None:
        """Stop fetching, finish or abandon the work in flight, publish and commit what finished, close."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, _frame: self.handle_signal(signum))

    def handle_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT: the first stops in order (finish the batch, commit, leave the group); the second exits at
        once, whatever the worker is waiting for (a batch, the join, the warm-up)."""
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log.info("%s: stopping (a second signal exits at once)", name)
            self.request_stop()
            return
        log.warning("%s again: exiting at once (exit %d); what was not committed is read again by the next owner", name, EXIT_OK)
        self._exit_now(EXIT_OK)

    def warm_up(self) -> float | None:
        """One short sample generate() on the engine's own thread before taking partitions: the first call on a
        thread pays CUDA's per-thread set-up, and an engine that cannot generate at all should fail before it owns any
        data. Returns its seconds, or None when a stop came first: the warm-up is then abandoned on its daemon thread
        (the worker is exiting, and an engine call cannot be interrupted)."""
        started = time.monotonic()
        log.info("warming up the engine (a few tokens; SIGTERM/SIGINT stops it)")
        failure: list[BaseException] = []

        def warm() -> None:
            try:
                self.pipeline.warm_up()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                failure.append(exc)

        waiter = threading.Thread(target=warm, name="warm-up", daemon=True)
        waiter.start()
        while waiter.is_alive():
            waiter.join(STOP_CHECK_S)
            if self._stop.is_set() and waiter.is_alive():
                log.info("stopped during the engine warm-up (after %.1f s): not joining the group", time.monotonic() - started)
                self._warm_up_abandoned = True
                return None
        if failure:
            raise EngineStartupError(f"the engine failed its warm-up generate(): {failure[0]}") from failure[0]
        return time.monotonic() - started

    def run(self, until: Callable[[], bool] | None = None) -> int:
        """Process until request_stop() (or `until()` is true); return the process exit code."""
        previous_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(previous_switch_interval, GIL_SWITCH_INTERVAL_S))
        try:
            return self._run(until)
        finally:
            sys.setswitchinterval(previous_switch_interval)

    def _run(self, until: Callable[[], bool] | None) -> int:
        if not self._stop.is_set():
            seconds = self.warm_up()
            if seconds is not None:
                log.info("engine warmed up in %.1f s", seconds)
        if self._stop.is_set():
            self._close()
            return EXIT_OK
        self.checkpoint.start()
        log.info("joining group %s on %s at %s", self.settings.kafka_group_id, self.settings.kafka_input_topic, self.settings.kafka_bootstrap_servers,
                 extra={"engine": self.engine.kind, "model": self.engine.model, "mode": self.settings.generation_mode.value,
                        "max_uncommitted": self.max_uncommitted})
        self.consumer.subscribe([self.settings.kafka_input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        self._subscribed = True
        self.metrics.ready(engine_loaded=True, assigned=False)
        try:
            while not self._stop.is_set() and not (until and until()):
                self._step()
            self._shutdown()
            return EXIT_OK
        except InfrastructureError as exc:
            log.error("stopping (%s unavailable, exit %d): %s; nothing past the failure is committed", exc.what, exc.exit_code, exc)
            return exc.exit_code
        finally:
            self._close()

    # ------------------------------------------------------------------------------------------------- step
    def _step(self) -> None:
        self.metrics.heartbeat()
        self._finish(self.pipeline.take())
        self._publish()
        self._commit()
        self.health.check()
        self._observe_lag()
        self._report()
        self._consume()
        self._drain_inbox()

    def _consume(self) -> None:
        wanted = 0 if self._inbox else min(self.pipeline.wanted(), self.checkpoint.room())
        if wanted > 0:
            self._full_since = None
            self._set_paused(False)
            due = self.pipeline.seconds_until_due()
            busy = self.checkpoint.delivering
            timeout = 0.0 if busy else POLL_INTERVAL_S if due is None else min(POLL_INTERVAL_S, due)
            self._fetch(min(wanted, 1000), timeout)
            return
        # Full. For a moment, simply stop taking records. If it lasts (a long generate()), pause every partition
        # and keep polling: paused partitions return nothing, but poll() keeps the group membership alive.
        # Pausing at once would cost a refetch per batch: librdkafka drops a paused partition's prefetched queue.
        self._full_since = self._full_since or time.monotonic()
        if time.monotonic() - self._full_since >= PAUSE_AFTER_S:
            self._keep_alive()
        if self.checkpoint.delivering:
            self.checkpoint.serve(0.005)  # returns as soon as a delivery report arrives
        else:
            # Wake seldom: every wake takes the GIL from the engine's thread, which needs it to launch kernels.
            self.pipeline.wait(0.25 if self._paused else 0.05)

    def _keep_alive(self) -> None:
        """Poll with every partition paused: group membership stays alive, nothing new is fetched."""
        self._set_paused(True)
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
            raise BrokerUnavailableError(f"committed offsets of re-assigned {_names(partitions)} unavailable: {exc}") from None
        for tp in committed:
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else reset))
        log.info("re-assigned during a fetch: %s restarted at the committed offsets", _names(partitions))

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        partitions = self.consumer.assignment()
        if partitions:
            (self.consumer.pause if paused else self.consumer.resume)(partitions)
        self._paused = paused

    def _drain_inbox(self) -> None:
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
            epoch = self.ownership.epoch((message.topic(), message.partition()))
            if epoch is None:
                self._inbox.popleft()  # fetched just before a revoke; the new owner reads it
                continue
            source = source_of(message, epoch)
            try:
                self.pipeline.submit(source)
            except RegistryUnavailableError as exc:
                if not self._registry.failed():
                    raise
                log.error("schema registry unavailable, holding %d record(s), retry in %.1f s: %s",
                          len(self._inbox), self._registry.next_at - time.monotonic(), exc)
                self._set_paused(True)
                return
            self._registry.succeeded()
            self._inbox.popleft()
            self.health.ok()
            self.metrics.consumed((source.topic, source.partition))
            self.totals["consumed"] += 1
            self.checkpoint.track(source)

    # ------------------------------------------------------------------------------------- finish → publish
    def _finish(self, records: list[OutgoingRecord]) -> None:
        if records:
            self._finished.append(records)
        while self._finished and self.checkpoint.accepts_finished:
            for record in self._finished.popleft():
                # False for a record no longer this worker's (revoked while it generated): the new owner produces it.
                if self.checkpoint.finish(record.source, record) and record.is_dead_letter:
                    self._log_dead_letter(record)
        for stats in self.pipeline.batches():
            self.metrics.batch_done(stats)
            self.totals["prompt_tokens"] += stats.prompt_tokens
            self.totals["completion_tokens"] += stats.completion_tokens

    def _publish(self) -> None:
        self.checkpoint.publish()

    def _commit(self, force: bool = False) -> None:
        idle = self.pipeline.idle()
        try:
            self.checkpoint.maybe_commit(idle=idle, force=force)
        except CommitFailedError:
            if self.checkpoint.needs_rewind:
                self._rewind()
            raise
        if self.checkpoint.needs_rewind:  # an aborted transaction, retried after the rewind
            self._rewind()

    def _on_acknowledged(self, record: OutgoingRecord) -> None:
        self.health.ok()
        self.metrics.acknowledged(record)
        self.totals["dead_letters" if record.is_dead_letter else "summaries"] += 1

    def _on_committed(self, offsets: dict[TP, int], count: int) -> None:
        self.health.ok()
        for tp, offset in offsets.items():
            self.metrics.committed(tp, offset)
        log.debug("committed %d record(s): %s", count, offsets)

    def _log_dead_letter(self, record: OutgoingRecord) -> None:
        log.warning("dead-lettered %s[%d]@%d: %s", record.source.topic, record.source.partition, record.source.offset, record.reason,
                    extra={"topic": record.source.topic, "partition": record.source.partition, "offset": record.source.offset,
                           "event_id": record.event_id, "error_class": record.reason,
                           "error_message": (record.error_message or "")[:500]})

    # ---------------------------------------------------------------------------------------------- rebalance
    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._joined = True
        self.ownership.assign((p.topic, p.partition) for p in partitions)
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if partitions:
            # Set the pause state explicitly both ways: librdkafka keeps a partition's pause flag across
            # unassign/assign, so a partition paused before a lost assignment comes back paused and never fetches.
            (consumer.pause if self._paused else consumer.resume)(partitions)
        log.info("assigned %s", _names(partitions), extra={"partitions": [p.partition for p in partitions]})
        self.metrics.ready(engine_loaded=True, assigned=bool(self.ownership.partitions))

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # While still the owner: whatever lets the next owner start after this worker's work.
        self.checkpoint.before_revoke([(p.topic, p.partition) for p in partitions])
        self._forget(partitions)
        log.info("revoked %s", _names(partitions))

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Lost means another member may already own them: committing now would be wrong.
        self._forget(partitions)
        log.warning("lost %s (membership expired); their work in flight is dropped", _names(partitions))

    def _forget(self, partitions: list[TopicPartition]) -> None:
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

    def _rewind(self) -> None:
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
        self._forget(owned)
        self.ownership.assign((tp.topic, tp.partition) for tp in owned)
        self.checkpoint.rewound()
        for tp in owned:
            key = (tp.topic, tp.partition)
            offset = committed.get(key, -1) if committed.get(key, -1) >= 0 else first_read.get(key)
            if offset is not None:
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        log.warning("rewound %s to the committed offsets after an aborted transaction", _names(owned))

    def _finish_join(self) -> None:
        """Stopped mid-join: let the join complete before closing, for a few seconds at most. A member that leaves
        before it has a member id cannot send LeaveGroup, and the group then waits for it (Tansu: for minutes) before
        anyone gets partitions. A second signal exits at once (handle_signal)."""
        limit = min(FINISH_JOIN_MAX_S, self.settings.kafka_session_timeout_ms / 1000)
        deadline = time.monotonic() + limit
        log.info("stopping during the group join: finishing the join (up to %.0f s) so the group is left cleanly; "
                 "a second signal exits at once", limit)
        self._paused = True  # _on_assign pauses what it gets: nothing is fetched or processed any more
        while not self._joined and time.monotonic() < deadline:
            self.consumer.consume(1, 0.2)
        if not self._joined:
            # Measured on Tansu: a join takes session.timeout.ms / 2 there, and a member that leaves mid-join keeps the
            # group from assigning anything for minutes (README, Operations).
            log.warning("the group join did not complete within %.0f s: leaving mid-join. On the embedded broker this can "
                        "keep group %s from assigning partitions for minutes (a new KAFKA_GROUP_ID avoids it; "
                        "KAFKA_SESSION_TIMEOUT_MS=6000 makes its joins take ~3 s)", limit, self.settings.kafka_group_id)

    # ------------------------------------------------------------------------------------------- observation
    def _observe_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_observed_at < LAG_EVERY_S:
            return
        self._lag_observed_at = now
        idle, busy = self.pipeline.idle_seconds, self.pipeline.busy_seconds
        self.metrics.engine_idle_for(max(0.0, idle - self._idle_reported))
        self.metrics.engine_busy_for(max(0.0, busy - self._busy_reported))
        self._idle_reported, self._busy_reported = idle, busy
        for topic, partition in self.ownership.partitions:
            try:
                # cached=True: the watermark the last fetch brought back; no extra request to the broker.
                _low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            committed = self.committed.get((topic, partition))
            if high >= 0 and committed is not None:
                self.metrics.lag_observed((topic, partition), high, committed)

    def _report(self) -> None:
        now = time.monotonic()
        # The group hint only while brokers answer: with none answering, BrokerHealth names the real cause.
        if not self.ownership.partitions and now - self._unassigned_warned_at >= REPORT_EVERY_S and self.health.answering:
            self._unassigned_warned_at = now
            log.warning("no partitions assigned yet: waiting for group %s (a group join takes up to session.timeout.ms; "
                        "more workers than partitions leave some idle)", self.settings.kafka_group_id)
        if now - self._reported_at >= REPORT_EVERY_S:
            self._reported_at = now
            log.info("progress: %(consumed)d consumed, %(summaries)d summaries, %(dead_letters)d dead letters, "
                     "%(completion_tokens)d completion tokens", self.totals, extra={"in_flight": self.pipeline.in_flight()})

    # ------------------------------------------------------------------------------------------------ stop
    def _shutdown(self) -> None:
        self._set_paused(True)
        not_started = self.pipeline.pending() + len(self._inbox)
        self._inbox.clear()
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        self._finish(self.pipeline.finish(self.settings.shutdown_timeout_s))
        # What finished is published and committed before exit: a batch may wait behind the previous batch's
        # commit (one batch at a time), so release, acknowledge and commit until nothing finished is left.
        for _round in range(len(self._finished) + 3):
            self._finish([])
            self._publish()
            self.checkpoint.flush(max(0.0, deadline - time.monotonic()))
            self._commit(force=True)
            if not (self.checkpoint.finished_waiting or self._finished) or time.monotonic() > deadline:
                break
        log.info("stopped: %(consumed)d consumed, %(summaries)d summaries, %(dead_letters)d dead letters published; "
                 "%(prompt_tokens)d prompt + %(completion_tokens)d completion tokens", self.totals,
                 extra={**self.totals, "committed": self.records_committed, "left_for_next_run": not_started})

    def _close(self) -> None:
        if not self._warm_up_abandoned:  # else the engine's thread is busy with the warm-up: nothing to wait for
            self.pipeline.close()
        if self._subscribed and not self._joined and not self.health.down:
            self._finish_join()
        try:
            self.consumer.close()  # leaves the group at once, whatever state the join is in
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close: %s", exc)
        self.producer.flush(5)

