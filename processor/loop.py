"""The Worker: consume → intake → generation → records → sink → checkpoint, orchestrated on one thread.

Each stage lives in its own module and the Worker only moves work between them:
  intake.py      message → source record → batch item (prompt, or the record's error)
  generation.py  the engine's thread(s): micro-batches or the continuous feed; the probe that tells a broken GPU
                 from a poison event
  records.py     summary / dead letter for each finished item
  sink.py        delivery, acknowledgements, the first delivery error latched
  checkpoint.py  ownership epochs, commit order (contiguous acked prefix per partition), at-least-once or
                 transactional commits
  clients.py     the Kafka clients' configuration and the broker's health

Failures follow errors.py: a RecordError becomes that record's dead letter and its offset is committed; an
InfrastructureError (engine, registry, broker, commit, output) holds the pipeline — nothing dead-lettered, nothing
committed past it — and is retried with backoff while the consumer keeps polling, then ends the worker with the
error's exit code. Memory stays bounded: when generation wants nothing, every assigned partition is paused and
the loop keeps calling poll(), so the consumer never exceeds max.poll.interval.ms however long generate() takes.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, Message, TopicPartition

from processor.batcher import MicroBatcher
from processor.source import BatchItem, SourceRecord
from processor.capacity import BatchLimits, resolve_batch_limits
from processor.checkpoint import TP, AtLeastOnceCheckpoint, Checkpoint, Ownership, State, TransactionalCheckpoint
from processor.clients import BrokerHealth, consumer_config, is_cooperative, make_consumer, make_producer, max_record_bytes, producer_config
from processor.codec import SUMMARY_SCHEMA, Codec, SchemaStore, SerializationContext, make_codec
from processor.engines.base import Engine, EngineStartupError, Prompt, supports_streaming
from processor.errors import EXIT_OK, BrokerUnavailableError, CommitFailedError, InfrastructureError, RegistryUnavailableError
from processor.events import validate_event
from processor.generation import ContinuousScheduler, Done, MicroBatchScheduler, Scheduler
from processor.intake import Intake, source_of
from processor.metrics import Metrics
from processor.prompt import PromptBuilder
from processor.records import OutgoingRecord, RecordBuilder
from processor.retry import Backoff
from processor.settings import GenerationMode, ProcessingGuarantee, Settings
from processor.sink import Sink

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
PAUSE_AFTER_S = 0.5  # far below any max.poll.interval.ms librdkafka accepts (≥ 1 s)
LAG_EVERY_S = 5.0
REPORT_EVERY_S = 10.0
CONTINUOUS_COMMIT_EVERY_S = 0.2
MAX_WARM_UP_COPIES = 64
# Continuous: records read but not committed ≤ this many in-flight windows unless CONTINUOUS_MAX_UNCOMMITTED says
# otherwise (the duplicate bound after a crash). Out-of-order completion piles finished-but-uncommitted records up
# behind a partition's slowest request: about the engine's throughput × that request's time, with summary lengths of
# median ~270 and a tail to 1,536 tokens up to ~5 windows (~300 records at a window of 64). bench/uncommitted_bound.py:
# four windows stopped reading 10 times in 1,000 events and cost the engine 1-2 % more steps; eight never; one window
# (a crash duplicating at most what is in flight) ran the engine at 0.4 of its speed.
UNCOMMITTED_WINDOWS = 8
# While the worker runs, a thread waiting for the GIL gets it after at most this long (CPython's default: 5 ms).
# The engine's thread wakes from the GPU many times a second and must not wait behind the loop's Python work: on
# an H100 with vLLM 0.24 (bench/gpu_bench.py, bench/results/switch-interval/) micro-batches went from 0.89 to 0.95
# of the engine alone, and the continuous feed needed ~1.6 % more engine steps than the engine alone (2-3 % at 5 ms).
GIL_SWITCH_INTERVAL_S = 0.001


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
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.codec: Codec = codec or make_codec(settings.schema_registry_url, max_results=settings.max_event_results)
        self.metrics = metrics or Metrics()
        self.limits: BatchLimits = resolve_batch_limits(settings, engine.capacity())
        self.prompts = PromptBuilder(engine.tokenizer, settings.max_model_len, settings.sampling_max_tokens, settings.summary_language)
        self.transactional = settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE
        self.continuous = settings.generation_mode is GenerationMode.CONTINUOUS
        if self.continuous and not supports_streaming(engine):
            raise EngineStartupError(f"GENERATION_MODE=continuous needs an engine with add_request/step; ENGINE={engine.kind} has none")

        self.health = BrokerHealth(bootstrap=settings.kafka_bootstrap_servers, timeout_s=settings.broker_unavailable_timeout_s,
                                   probe=lambda: self.consumer.list_topics(settings.kafka_input_topic, timeout=2.0))
        consumer_conf = consumer_config(settings, self.health.on_client_error, consumer_overrides)
        producer_conf = producer_config(settings, self.health.on_client_error, producer_overrides)
        self._cooperative = is_cooperative(consumer_conf)
        self.consumer = consumer if consumer is not None else make_consumer(consumer_conf)
        self.producer = producer if producer is not None else make_producer(producer_conf)

        self.intake = Intake(codec=self.codec, prompts=self.prompts, max_event_bytes=settings.max_event_bytes)
        self.records = RecordBuilder(
            encode_summary=lambda record: self.codec.serialize(record, SerializationContext(settings.kafka_output_topic, SUMMARY_SCHEMA)),
            output_topic=settings.kafka_output_topic, dlq_topic=settings.kafka_dlq_topic, engine_kind=engine.kind,
            model=engine.model, prompt_version=self.prompts.version, max_record_bytes=max_record_bytes(producer_conf),
            citations=_citations(self.codec.store),
        )
        self.sink = Sink(producer=self.producer, max_attempts=settings.produce_max_attempts, on_acknowledged=self._on_acknowledged,
                         shrink=self.records.smaller)
        self.ownership = Ownership()
        commit_every = CONTINUOUS_COMMIT_EVERY_S if self.continuous else 0.0
        self.checkpoint: Checkpoint
        if self.transactional:
            # Inside a transaction a failed delivery dooms the whole transaction (librdkafka makes it abortable):
            # no re-send in it; the checkpoint aborts, the worker rewinds, and the batch is the unit of attempts.
            self.checkpoint = TransactionalCheckpoint(
                producer=self.producer, consumer=self.consumer, ownership=self.ownership,
                new_sink=lambda: Sink(producer=self.producer, max_attempts=1, on_acknowledged=self._on_acknowledged),
                flush_timeout_s=settings.delivery_timeout_ms / 1000 * settings.produce_max_attempts,
                max_attempts=settings.produce_max_attempts,
                keep_alive=self._keep_alive, on_committed=self._on_committed, min_commit_interval_s=commit_every,
            )
        else:
            self.checkpoint = AtLeastOnceCheckpoint(consumer=self.consumer, ownership=self.ownership, one_batch_at_a_time=not self.continuous,
                                                    min_commit_interval_s=commit_every, on_committed=self._on_committed)
        self.probe_prompt = self._probe_prompt()
        self.scheduler: Scheduler = self._scheduler()
        self.metrics.watch_engine(self.scheduler.stalled_for, settings.engine_call_timeout_s)  # /healthz, /readyz

        self._inbox: deque[Message] = deque()  # consumed, not yet through intake (held while the registry is down)
        self._registry = Backoff(give_up_after_s=settings.infrastructure_retry_timeout_s)
        self._commits = Backoff(give_up_after_s=settings.broker_unavailable_timeout_s)
        self._paused = False
        self._full_since: float | None = None
        self._stop = threading.Event()
        self._subscribed = self._joined = False
        self._lag_observed_at = 0.0
        self._idle_reported = self._busy_reported = 0.0
        self._reported_at = time.monotonic()
        self._unassigned_warned_at = time.monotonic()
        self.totals = {"consumed": 0, "summaries": 0, "dead_letters": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def _scheduler(self) -> Scheduler:
        probe = self.probe_prompt
        timeout = self.settings.infrastructure_retry_timeout_s
        if self.continuous:
            from processor.continuous import ContinuousFeed

            budget = self.engine.in_flight_budget()  # type: ignore[attr-defined]
            if budget is not None and self.settings.batch_max_records:  # an explicit BATCH_MAX_RECORDS caps the window
                budget = dataclasses.replace(budget, max_sequences=min(budget.max_sequences, self.settings.batch_max_records))
            window = budget.max_sequences if budget is not None else self.limits.max_records
            # Refill in groups (an eighth of the window by default): prompts that enter together share one prefill
            # step, and on vLLM V1 a step holding a prefill runs outside the decode CUDA graphs (bench/vllm_modes.py:
            # window 64, refilling 8 at a time: 1.63x micro-batches instead of 1.35x).
            refill = self.settings.continuous_refill_min or max(1, window // 8)
            feed = ContinuousFeed(self.engine, budget=budget, max_new_tokens=self.settings.sampling_max_tokens,
                                  max_sequences_default=self.limits.max_records, refill_min=refill)
            # Out-of-order completion: bound what is read but not yet committed (and so what a crash can duplicate),
            # so one slow request cannot let published-but-uncommitted work pile up without bound; the default is
            # roomy enough that the long tail of summary lengths does not starve the engine (UNCOMMITTED_WINDOWS).
            if self.settings.continuous_max_uncommitted is not None and self.settings.continuous_max_uncommitted < feed.capacity:
                log.warning("CONTINUOUS_MAX_UNCOMMITTED=%d is below the %d requests the engine can hold: it will hold at "
                            "most %d at a time", self.settings.continuous_max_uncommitted, feed.capacity,
                            self.settings.continuous_max_uncommitted)
            return ContinuousScheduler(feed=feed, engine=self.engine, probe_prompt=probe, retry_timeout_s=timeout,
                                       call_timeout_s=self.settings.engine_call_timeout_s)
        continuous_only = [name for name, value in (("CONTINUOUS_MAX_UNCOMMITTED", self.settings.continuous_max_uncommitted),
                                                     ("CONTINUOUS_REFILL_MIN", self.settings.continuous_refill_min)) if value is not None]
        if continuous_only:
            log.warning("ignored in micro_batch mode (GENERATION_MODE=continuous settings): %s", ", ".join(continuous_only))
        batcher = MicroBatcher(self.limits.max_records, self.settings.batch_max_wait_ms / 1000, self.limits.max_prompt_tokens)
        return MicroBatchScheduler(engine=self.engine, batcher=batcher, probe_prompt=probe, retry_timeout_s=timeout,
                                   call_timeout_s=self.settings.engine_call_timeout_s)

    def _probe_prompt(self) -> Prompt:
        from processor.samples import sample_events

        return self.prompts.build(validate_event(sample_events()[1]))

    # ------------------------------------------------------------------------------------------------ control
    @property
    def max_uncommitted(self) -> int | None:
        """Continuous: records read but not yet committed, at most (None in micro_batch mode, where one batch at a
        time bounds it). By default UNCOMMITTED_WINDOWS × the requests the engine can hold now (its KV cache, not
        just its sequence limit, decides how many)."""
        if not self.continuous:
            return None
        return self.settings.continuous_max_uncommitted or UNCOMMITTED_WINDOWS * self.scheduler.capacity  # type: ignore[attr-defined]

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
            signal.signal(signum, lambda *_: self.request_stop())

    def warm_up(self) -> float:
        """One sample generate() on the engine's own thread before taking partitions: the first call on a thread pays
        CUDA's per-thread set-up, and an engine that cannot generate at all should fail before it owns any data."""
        started = time.monotonic()
        try:
            self.scheduler.warm_up(self.probe_prompt, self._warm_up_copies())
        except Exception as exc:  # noqa: BLE001 - any failure here means the engine cannot start
            raise EngineStartupError(f"the engine failed its warm-up generate(): {exc}") from exc
        return time.monotonic() - started

    def _warm_up_copies(self) -> int:
        """A GPU engine warms up at the batch shape it will run: the first batch of a new shape pays one-time kernel
        JIT and compilation (measured on an H100: the first 64-event batch took 11.6 s, later ones ~4 s). Engines
        without a KV cache (model-free, Transformers on a CPU) warm up with one prompt."""
        budget = getattr(self.engine, "in_flight_budget", None)
        if budget is None or budget() is None:
            return 1
        window = self.limits.max_records if not self.continuous else self.scheduler.window  # type: ignore[attr-defined]
        return max(1, min(window, MAX_WARM_UP_COPIES))

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
            log.info("engine warmed up in %.1f s", self.warm_up())
        if self._stop.is_set():
            self._close()
            return EXIT_OK
        if self.transactional:
            self.producer.init_transactions(30)
        log.info("joining group %s on %s at %s", self.settings.kafka_group_id, self.settings.kafka_input_topic, self.settings.kafka_bootstrap_servers,
                 extra={"engine": self.engine.kind, "model": self.engine.model, "mode": self.settings.generation_mode.value,
                        "batch_limits": self.limits.describe(), "max_uncommitted": self.max_uncommitted})
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
        self._finish(self.scheduler.take())
        self._publish()
        self._commit()
        self.health.check()
        self._observe_lag()
        self._report()
        self._consume()
        self._drain_inbox()

    def _consume(self) -> None:
        wanted = 0 if (self._inbox or self.checkpoint.holding) else self.scheduler.wanted()
        bound = self.max_uncommitted
        if bound is not None:
            wanted = min(wanted, bound - len(self.checkpoint.tracker))
        if wanted > 0:
            self._full_since = None
            self._set_paused(False)
            due = self.scheduler.seconds_until_due()
            busy = not self.sink.idle
            timeout = 0.0 if busy else POLL_INTERVAL_S if due is None else min(POLL_INTERVAL_S, due)
            self._fetch(min(wanted, 1000), timeout)
            return
        # Full. For a moment, simply stop taking records. If it lasts (a long generate()), pause every partition
        # and keep polling: paused partitions return nothing, but poll() keeps the group membership alive.
        # Pausing at once would cost a refetch per batch: librdkafka drops a paused partition's prefetched queue.
        self._full_since = self._full_since or time.monotonic()
        if time.monotonic() - self._full_since >= PAUSE_AFTER_S:
            self._keep_alive()
        if not self.sink.idle:
            self.sink.poll(0.005)  # returns as soon as a delivery report arrives
        else:
            # Wake seldom: every wake takes the GIL from the engine's thread, which needs it to launch kernels.
            self.scheduler.wait(0.25 if self._paused else 0.05)

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
                item = self.intake.prepare(source)
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
            self.checkpoint.tracker.track(source)
            self.scheduler.add(item)

    # ------------------------------------------------------------------------------------- finish → publish
    def _finish(self, done: list[Done]) -> None:
        now = datetime.now(timezone.utc)
        for item, outcome in done:
            if not self.ownership.owns(item.source):
                continue  # revoked while it generated: the new owner produces it
            record = self.records.for_item(item, outcome, now)
            if self.checkpoint.tracker.finish(item.source, record) and record.is_dead_letter:
                self._log_dead_letter(record)
        for stats in self.scheduler.last_batches:
            self.metrics.batch_done(stats)
            self.totals["prompt_tokens"] += stats.prompt_tokens
            self.totals["completion_tokens"] += stats.completion_tokens
            if not self.continuous:
                log.info("batch: %d event(s), %d failed, %d prompt + %d completion tokens in %.2f s",
                         stats.events, stats.failed, stats.prompt_tokens, stats.completion_tokens, stats.seconds,
                         extra={"events": stats.events, "failed": stats.failed, "seconds": round(stats.seconds, 3)})
        self.scheduler.last_batches.clear()

    def _publish(self) -> None:
        if self.sink.accepting:
            self.sink.add(self.checkpoint.release())
        self.sink.poll(0)
        self.sink.raise_for_error()

    def _commit(self, force: bool = False) -> None:
        if self._commits.failing and not self._commits.due() and not force:
            return
        try:
            self.checkpoint.commit(force or self._commit_now())
        except CommitFailedError as exc:
            if self.checkpoint.needs_rewind:
                self._rewind()
            if not self._commits.failed():
                raise
            log.warning("%s; holding the pipeline, retry %d in %.1f s", exc, self._commits.attempts, self._commits.next_at - time.monotonic())
            return
        self._commits.succeeded()

    def _commit_now(self) -> bool:
        """Continuous mode commits at most every CONTINUOUS_COMMIT_EVERY_S, except when waiting gains nothing: at the
        uncommitted bound reading has stopped until a commit makes room, and with nothing left in the engine no
        more finishes are coming to share the commit (the end of a burst: lag drops to 0 at once)."""
        bound = self.max_uncommitted
        if bound is None:
            return False
        return len(self.checkpoint.tracker) >= bound or (not self.scheduler.in_flight() and not self.scheduler.pending())

    def _on_acknowledged(self, record: OutgoingRecord) -> None:
        self.health.ok()
        self.checkpoint.tracker.acked(record.source)
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
        # While still the owner: get acknowledgements in and commit them, so the next owner starts after them.
        if not self.transactional:
            self.sink.flush(10.0)
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
        self.checkpoint.tracker.drop(tps)
        dropped = self.scheduler.drop(self.ownership.owns)
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
        first_read = self.checkpoint.tracker.first_offsets()
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
        self.checkpoint.needs_rewind = False
        for tp in owned:
            key = (tp.topic, tp.partition)
            offset = committed.get(key, -1) if committed.get(key, -1) >= 0 else first_read.get(key)
            if offset is not None:
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        log.warning("rewound %s to the committed offsets after an aborted transaction", _names(owned))

    def _finish_join(self) -> None:
        """Stopped mid-join: let the join complete before closing. A member that leaves before it has a member id
        cannot send LeaveGroup, and the group then waits for it (Tansu: for minutes) before anyone gets partitions."""
        deadline = time.monotonic() + self.settings.kafka_session_timeout_ms / 1000
        log.info("stopping during the group join: finishing the join (up to %.0f s) so the group is left cleanly",
                 deadline - time.monotonic())
        self._paused = True  # _on_assign pauses what it gets: nothing is fetched or processed any more
        while not self._joined and time.monotonic() < deadline:
            self.consumer.consume(1, 0.2)

    # ------------------------------------------------------------------------------------------- observation
    def _observe_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_observed_at < LAG_EVERY_S:
            return
        self._lag_observed_at = now
        idle, busy = self.scheduler.idle_seconds, self.scheduler.busy_seconds
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
        if not self.ownership.partitions and now - self._unassigned_warned_at >= REPORT_EVERY_S:
            self._unassigned_warned_at = now
            log.warning("no partitions assigned yet: waiting for group %s (a group join takes up to session.timeout.ms; "
                        "more workers than partitions leave some idle)", self.settings.kafka_group_id)
        if self.continuous and now - self._reported_at >= REPORT_EVERY_S:
            self._reported_at = now
            log.info("progress: %(consumed)d consumed, %(summaries)d summaries, %(dead_letters)d dead letters, "
                     "%(completion_tokens)d completion tokens", self.totals, extra={"in_flight": self.scheduler.in_flight()})

    # ------------------------------------------------------------------------------------------------ stop
    def _shutdown(self) -> None:
        self._set_paused(True)
        not_started = self.scheduler.pending() + len(self._inbox)
        self._inbox.clear()
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        self._finish(self.scheduler.finish(self.settings.shutdown_timeout_s))
        # What finished is published and committed before exit: a batch may wait behind the previous batch's
        # commit (one batch at a time), so release, acknowledge and commit until nothing finished is left.
        for _round in range(3):
            self._publish()
            if not self.transactional:
                self.sink.flush(max(0.0, deadline - time.monotonic()))
                self.sink.raise_for_error()
            self._commit(force=True)
            if not self.checkpoint.tracker.counts()[State.FINISHED] or time.monotonic() > deadline:
                break
        log.info("stopped: %(consumed)d consumed, %(summaries)d summaries, %(dead_letters)d dead letters published; "
                 "%(prompt_tokens)d prompt + %(completion_tokens)d completion tokens", self.totals,
                 extra={**self.totals, "committed": self.records_committed, "left_for_next_run": not_started})

    def _close(self) -> None:
        self.scheduler.close()
        if self._subscribed and not self._joined and not self.health.down:
            self._finish_join()
        try:
            self.consumer.close()  # leaves the group at once, whatever state the join is in
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close: %s", exc)
        self.producer.flush(5)


def _citations(store: SchemaStore) -> Callable[[Any, str], list[dict[str, Any]]] | None:
    """The summary schema's `citations` field, where the deployed schema has it (v2 on)."""
    from processor.citations import cited_results

    fields = {f["name"] for f in store.latest(SUMMARY_SCHEMA).parsed["fields"]}
    return cited_results if "citations" in fields else None
