"""The consumer loop: consume → decode → validate → prompt → micro-batch → generate → publish → commit.

One main thread owns the consumer and the producer; generate() runs in a worker thread. The stages overlap:
while the engine generates batch N, the main thread consumes and prepares batch N+1 and publishes and commits
batch N−1, so the engine never waits on Kafka. Memory stays bounded: at most one closed batch waits for the
engine; past that every assigned partition is paused and the loop keeps calling poll(), so the consumer never
exceeds max.poll.interval.ms however long generate() takes.

Offsets are committed per batch, in batch order, only after every output and dead-letter record of the batch is
acknowledged (at-least-once). A partition's records carry the assignment epoch they were consumed under; after a
revoke, anything of the old epoch is neither published nor committed by this worker.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from processor.batcher import Batch, BatchItem, MicroBatcher, SourceRecord
from processor.capacity import BatchLimits, resolve_batch_limits
from processor.codec import EVENT_SCHEMA, SUMMARY_SCHEMA, AvroCodec, RegistryCodec, RegistryUnavailableError, make_codec
from processor.engines.base import Engine, EngineStartupError, EventGenerationError, Generation
from processor.engines.isolation import generate_isolated
from processor.events import validate_event
from processor.metrics import Metrics
from processor.prompt import PromptBuilder
from processor.settings import ProcessingGuarantee, Settings
from processor.sink import OutgoingRecord, OutputUnavailableError, Publication, Sink

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
PROBE_AFTER_S = 5.0
PAUSE_AFTER_S = 0.5  # far below any max.poll.interval.ms librdkafka accepts (≥ 1 s)
LAG_EVERY_S = 5.0
EXIT_OK, EXIT_BROKER_UNAVAILABLE, EXIT_OUTPUT_FAILED = 0, 3, 4

TP = tuple[str, int]


class BrokerUnavailableError(Exception):
    """No broker answered for longer than BROKER_UNAVAILABLE_TIMEOUT_S."""


class RecordTooLargeError(Exception):
    """The record's value is larger than MAX_EVENT_BYTES."""


class GenerationJob:
    """One engine call; its results (or failure) are set by the generation thread."""

    def __init__(self, batch: Batch, isolate: bool = True) -> None:
        self.batch = batch
        self.isolate = isolate  # False: exceptions surface as the job's failure (the warm-up wants them)
        self.results: list[Generation | EventGenerationError] | None = None
        self.failure: BaseException | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self.done = threading.Event()


class GenerationThread:
    """One long-lived daemon thread runs every generate(). Long-lived because CUDA libraries keep per-thread state
    (cuBLAS handles, workspaces) that a fresh thread per batch would pay for again on every batch — measured on an
    H100 at 3-4× the batch's own generation time. A daemon, so a stuck generate() can be abandoned at shutdown."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._jobs: queue.SimpleQueue[GenerationJob] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="generate", daemon=True)
        self._thread.start()

    def submit(self, batch: Batch, isolate: bool = True) -> GenerationJob:
        job = GenerationJob(batch, isolate)
        self._jobs.put(job)
        return job

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            job.started = time.monotonic()
            try:
                prompts = job.batch.prompts
                job.results = generate_isolated(self.engine, prompts) if job.isolate else list(self.engine.generate(prompts))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which decides
                job.failure = exc
            finally:
                job.finished = time.monotonic()
                job.done.set()


class Worker:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        consumer_overrides: dict[str, Any] | None = None,
        producer_overrides: dict[str, Any] | None = None,
        metrics: Metrics | None = None,
        codec: AvroCodec | RegistryCodec | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.codec = codec or make_codec(settings.schema_registry_url)
        self.metrics = metrics or Metrics()
        self.limits: BatchLimits = resolve_batch_limits(settings, engine.capacity())
        self.prompts = PromptBuilder(engine.tokenizer, settings.max_model_len, settings.sampling_max_tokens, settings.summary_language)
        self.batcher = MicroBatcher(self.limits.max_records, settings.batch_max_wait_ms / 1000, self.limits.max_prompt_tokens)
        self.transactional = settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE

        common = settings.kafka_common()
        consumer_conf: dict[str, Any] = {**common, **(consumer_overrides or {})}
        self._cooperative = "cooperative" in str(consumer_conf.get("partition.assignment.strategy", ""))
        self.consumer = Consumer(
            {
                **common,
                "group.id": settings.kafka_group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": settings.kafka_auto_offset_reset,
                "session.timeout.ms": settings.kafka_session_timeout_ms,
                "heartbeat.interval.ms": settings.kafka_heartbeat_interval_ms,
                "max.poll.interval.ms": settings.kafka_max_poll_interval_ms,
                # Downstream read_committed consumers are the point of exactly-once; read the input the same way.
                "isolation.level": "read_committed",
                "error_cb": self._on_client_error,
                **(consumer_overrides or {}),
            }
        )
        producer_conf: dict[str, Any] = {
            **common,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": settings.delivery_timeout_ms,
            # Dead letters carry the original value; the broker, not this client, decides what is too large.
            "message.max.bytes": 100 * 1024 * 1024,
            "error_cb": self._on_client_error,
        }
        if self.transactional:
            producer_conf["transactional.id"] = f"{settings.kafka_group_id}-{settings.kafka_input_topic}-{settings.transactional_id_suffix}"
            producer_conf["transaction.timeout.ms"] = max(60_000, settings.delivery_timeout_ms)  # librdkafka: ≥ message.timeout.ms
        self.producer = Producer({**producer_conf, **(producer_overrides or {})})
        self.sink = Sink(
            self.producer,
            lambda record: self.codec.encode(record, SUMMARY_SCHEMA, settings.kafka_output_topic),
            settings.kafka_output_topic,
            settings.kafka_dlq_topic,
            engine.kind,
            engine.model,
            self.prompts.version,
            settings.produce_max_attempts,
            on_delivered=self._on_delivered,
        )

        self._epochs: dict[TP, int] = {}
        self._epoch_counter = 0
        self._ready: deque[Batch] = deque()
        self._job: GenerationJob | None = None
        self._generator = GenerationThread(engine)
        self._publishing: deque[Publication] = deque()
        self._paused = False
        self._stop = threading.Event()
        self._last_broker_ok = time.monotonic()
        self._brokers_down = False
        self._engine_idle_since: float | None = time.monotonic()
        self._lag_observed_at = 0.0
        self._full_since: float | None = None
        self.committed: dict[TP, int] = {}  # what this worker committed last, per partition (tests and lag)
        self.records_committed = 0  # input records whose outcome is acknowledged and committed

    # ----------------------------------------------------------------------------------------------- control
    def request_stop(self) -> None:
        """Stop fetching, finish or abandon the in-flight batch, commit what is acknowledged, close."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.request_stop())

    @property
    def assigned(self) -> list[TP]:
        return sorted(self._epochs)

    def warm_up(self) -> float:
        """One sample generate() on the generation thread before taking partitions: the first call on a thread pays
        CUDA's per-thread set-up, and an engine that cannot generate at all should fail before it owns any data."""
        from processor.samples import sample_events

        started = time.monotonic()
        prompt = self.prompts.build(validate_event(sample_events()[1]))
        batch = Batch()
        batch.add(BatchItem(SourceRecord("warm-up", -1, -1, None, None, None), prompt=prompt))
        job = self._generator.submit(batch, isolate=False)
        job.done.wait()
        if job.failure is not None:
            raise EngineStartupError(f"the engine failed its warm-up generate(): {job.failure}") from job.failure
        if job.results and not isinstance(job.results[0], Generation):
            log.warning("warm-up generate() produced no summary: %s", job.results[0])
        return time.monotonic() - started

    def run(self, until: Callable[[], bool] | None = None) -> int:
        """Process until request_stop() (or `until()` is true); return the process exit code."""
        log.info("engine warmed up in %.1f s", self.warm_up())
        self.consumer.subscribe(
            [self.settings.kafka_input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        if self.transactional:
            self.producer.init_transactions(30)
        self.metrics.ready(engine_loaded=True, assigned=False)
        log.info(
            "worker started",
            extra={"engine": self.engine.kind, "model": self.engine.model, "batch_limits": self.limits.describe()},
        )
        try:
            while not self._stop.is_set() and not (until and until()):
                self._step()
            self._shutdown()
            return EXIT_OK
        except (BrokerUnavailableError, RegistryUnavailableError) as exc:
            log.error("stopping: %s", exc)
            return EXIT_BROKER_UNAVAILABLE
        except OutputUnavailableError as exc:
            log.error("stopping without committing the failed batch: %s", exc)
            return EXIT_OUTPUT_FAILED
        finally:
            self._close()

    # -------------------------------------------------------------------------------------------- main step
    def _step(self) -> None:
        self.metrics.heartbeat()
        self._collect_generation()
        self._start_generation()
        self.sink.service(0)
        self._commit_acknowledged()
        self._check_health()
        self._observe_lag()

        # Block only as long as nothing else is waiting: acks and finished generations must not sit behind a poll.
        busy = bool(self._publishing) or (self._job is not None and self._job.done.is_set())
        if self._accepting():
            self._full_since = None
            self._set_paused(False)
            room = max(1, min(self.batcher.room, 1000))
            wait = self.batcher.seconds_until_due()
            timeout = 0.0 if busy else POLL_INTERVAL_S if wait is None else min(POLL_INTERVAL_S, wait)
            messages = self.consumer.consume(room, timeout)
        else:
            # Full. For a moment, simply stop taking records. If it lasts (a long generate()), pause every partition
            # and keep polling: paused partitions return nothing, but poll() keeps the group membership alive.
            # Pausing at once would cost a refetch per batch: librdkafka drops a paused partition's prefetched queue.
            self._full_since = self._full_since or time.monotonic()
            messages = []
            if time.monotonic() - self._full_since >= PAUSE_AFTER_S:
                self._set_paused(True)
                messages = self.consumer.consume(1, 0)
            if self._publishing:
                self.sink.service(0.005)  # returns as soon as a delivery report arrives
            elif self._job is not None:
                # Wake seldom: every wake takes the GIL from the generation thread, which needs it to launch kernels.
                self._job.done.wait(0.25 if self._paused else 0.05)
        for message in messages:
            self._accept(message)
        due = self.batcher.due()
        if due is not None:
            self._ready.append(due)

    def _accepting(self) -> bool:
        # One batch may wait for the engine; more is memory for nothing.
        return not self._ready

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        partitions = self.consumer.assignment()
        if partitions:
            (self.consumer.pause if paused else self.consumer.resume)(partitions)
        self._paused = paused

    # --------------------------------------------------------------------------------------------- intake
    def _accept(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", error.str())
                if error.fatal():
                    raise KafkaException(error)
            return
        tp = (message.topic(), message.partition())
        epoch = self._epochs.get(tp)
        if epoch is None:
            return  # fetched just before a revoke; the new owner reads it
        self._broker_ok()
        timestamp_type, timestamp = message.timestamp()
        source = SourceRecord(
            tp[0],
            tp[1],
            message.offset(),
            message.key(),
            message.value(),
            timestamp if timestamp_type else None,
            tuple(message.headers() or ()),
            epoch,
        )
        self.metrics.consumed(tp)
        for closed in self.batcher.add(self._prepare(source)):
            self._ready.append(closed)

    def _prepare(self, source: SourceRecord) -> BatchItem:
        """Everything between bytes and prompt; any failure becomes this record's dead letter, never a crash."""
        event_id: str | None = None
        try:
            if source.value is not None and len(source.value) > self.settings.max_event_bytes:
                raise RecordTooLargeError(
                    f"value is {len(source.value)} bytes, over MAX_EVENT_BYTES={self.settings.max_event_bytes}"
                )
            record = self.codec.decode(source.value, EVENT_SCHEMA, source.topic)
            event_id = record.get("event_id") if isinstance(record.get("event_id"), str) else None
            prompt = self.prompts.build(validate_event(record))
            return BatchItem(source, prompt=prompt)
        except RegistryUnavailableError:
            raise  # not this record's fault: dead-lettering would send every record to the DLQ
        except Exception as exc:  # noqa: BLE001 - bad input must not stop the stream
            return BatchItem(source, error=exc, decoded_event_id=event_id)

    # ----------------------------------------------------------------------------------------- generation
    def _start_generation(self) -> None:
        while self._job is None and self._ready:
            batch = self._ready.popleft().without(self._owned)
            if not batch.items:
                continue
            if not batch.prompts:  # only failed records: nothing for the engine to do
                if self._publishing:
                    self._ready.appendleft(batch)  # keep commit order and one batch in publication
                    return
                self._publish(batch, [])
                continue
            if self._engine_idle_since is not None:
                self.metrics.engine_idle_for(time.monotonic() - self._engine_idle_since)
                self._engine_idle_since = None
            self._job = self._generator.submit(batch)

    def _collect_generation(self) -> None:
        job = self._job
        if job is None or not job.done.is_set():
            return
        if self._publishing and not self.transactional:
            # One batch at a time between "published" and "committed": a crash then duplicates at most one batch.
            # Acks take milliseconds, generation seconds, so the engine barely notices.
            return
        self._job = None
        self._engine_idle_since = time.monotonic()
        if job.failure is not None:
            raise job.failure
        assert job.results is not None and job.finished is not None
        self.metrics.generated(job.batch, job.results, job.finished - job.started)
        self._publish(job.batch, job.results)

    def _publish(self, batch: Batch, results: Sequence[Generation | EventGenerationError]) -> None:
        # Drop what was revoked while the engine ran: the new owner will produce it; publishing it here too
        # would be a duplicate from this worker.
        outcomes = iter(results)
        kept_items: list[BatchItem] = []
        kept_results: list[Generation | EventGenerationError] = []
        for item in batch.items:
            outcome = next(outcomes) if item.prompt is not None else None
            if self._owned(item.source):
                kept_items.append(item)
                if outcome is not None:
                    kept_results.append(outcome)
        if not kept_items:
            return
        kept = Batch(opened_at=batch.opened_at)
        for item in kept_items:
            kept.add(item)
        records = self.sink.records_for(kept, kept_results)
        for item, record in zip(kept.items, records):
            if record.is_dead_letter:
                headers = dict(record.headers)
                log.warning(
                    "dead-lettered %s[%d]@%d: %s",
                    item.source.topic,
                    item.source.partition,
                    item.source.offset,
                    headers["dlq.error_class"].decode(),
                    extra={
                        "topic": item.source.topic,
                        "partition": item.source.partition,
                        "offset": item.source.offset,
                        "event_id": item.event_id,
                        "error_class": headers["dlq.error_class"].decode(),
                        "error_message": headers["dlq.error_message"].decode()[:500],
                    },
                )
        if self.transactional:
            self._publish_transaction(kept, records)
            return
        self._publishing.append(self.sink.publish(kept, records))

    # ------------------------------------------------------------------------------------------- commits
    def _commit_acknowledged(self) -> None:
        while self._publishing:
            head = self._publishing[0]
            if head.error is not None:
                raise OutputUnavailableError(head.error)
            if not head.acknowledged:
                return
            self._publishing.popleft()
            self.metrics.published(head)
            self._commit(head.batch)

    def _commit(self, batch: Batch) -> None:
        offsets = [
            TopicPartition(topic, partition, offset)
            for (topic, partition), offset in batch.next_offsets().items()
            if (topic, partition) in self._epochs
        ]
        stale = {(i.source.topic, i.source.partition) for i in batch.items if not self._owned(i.source)}
        offsets = [tp for tp in offsets if (tp.topic, tp.partition) not in stale]
        if not offsets:
            return
        for attempt in range(3):
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
                break
            except KafkaException as exc:
                error = exc.args[0]
                if attempt == 2 or not error.retriable():
                    # The batch is published; its records will be read again by whoever owns the partition.
                    log.warning("commit failed (%s): its records may be processed again", error.str())
                    return
                time.sleep(0.2 * (attempt + 1))
        self._broker_ok()
        self._record_commit(batch, offsets)
        log.debug("committed %s", _names(offsets), extra={"offsets": {f"{tp.topic}[{tp.partition}]": tp.offset for tp in offsets}})

    def _record_commit(self, batch: Batch, offsets: list[TopicPartition]) -> None:
        self.records_committed += len(batch)
        for tp in offsets:
            self.committed[(tp.topic, tp.partition)] = tp.offset
            self.metrics.committed((tp.topic, tp.partition), tp.offset)

    def _publish_transaction(self, batch: Batch, records: list[OutgoingRecord]) -> None:
        """Exactly-once: outputs and the consumed offsets commit atomically in one transaction."""
        offsets = [TopicPartition(t, p, o) for (t, p), o in batch.next_offsets().items() if (t, p) in self._epochs]
        self.producer.begin_transaction()
        try:
            publication = self.sink.publish(batch, records)
            if not self.sink.flush(self.settings.delivery_timeout_ms / 1000 * self.settings.produce_max_attempts):
                raise OutputUnavailableError("transactional batch not acknowledged in time")
            if publication.error:
                raise OutputUnavailableError(publication.error)
            self.producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 30)
            self.producer.commit_transaction(60)
        except Exception:
            self.producer.abort_transaction(30)
            raise
        self.metrics.published(publication)
        self._record_commit(batch, offsets)

    # ------------------------------------------------------------------------------------------ rebalance
    def _owned(self, source: SourceRecord) -> bool:
        return self._epochs.get((source.topic, source.partition)) == source.epoch

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for partition in partitions:
            self._epoch_counter += 1
            self._epochs[(partition.topic, partition.partition)] = self._epoch_counter
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if partitions:
            # Set the pause state explicitly both ways: librdkafka keeps a partition's pause flag across
            # unassign/assign, so a partition paused before a lost assignment comes back paused and never fetches.
            (consumer.pause if self._paused else consumer.resume)(partitions)
        log.info("assigned %s", _names(partitions))
        self.metrics.ready(engine_loaded=True, assigned=bool(self._epochs))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # While still the owner: get acknowledgements in and commit them, so the next owner starts after them.
        if not self.transactional:
            self.sink.flush(10.0)
            try:
                self._commit_acknowledged()
            except OutputUnavailableError:
                log.error("output failed during revoke; nothing of that batch is committed")
        self._forget(partitions)
        log.info("revoked %s", _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost means another member may already own them: committing now would be wrong.
        self._forget(partitions)
        log.warning("lost %s (membership expired); their in-flight work is dropped", _names(partitions))

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for partition in partitions:
            tp = (partition.topic, partition.partition)
            self._epochs.pop(tp, None)
            self.metrics.forget(tp)
        self.batcher.drop(self._owned)
        self._ready = deque(b for b in (batch.without(self._owned) for batch in self._ready) if b.items)
        self.metrics.ready(engine_loaded=True, assigned=bool(self._epochs))

    # ------------------------------------------------------------------------------------- health / stop
    def _on_client_error(self, error: KafkaError) -> None:
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._brokers_down = True
        log.warning("kafka client: %s", error.str())

    def _on_delivered(self, _record: OutgoingRecord) -> None:
        self._broker_ok()

    def _broker_ok(self) -> None:
        self._last_broker_ok = time.monotonic()
        self._brokers_down = False

    def _check_health(self) -> None:
        silent = time.monotonic() - self._last_broker_ok
        if silent < PROBE_AFTER_S:
            return
        try:
            self.consumer.list_topics(self.settings.kafka_input_topic, timeout=2.0)
            self._broker_ok()
        except KafkaException:
            if silent > self.settings.broker_unavailable_timeout_s:
                raise BrokerUnavailableError(
                    f"no broker at {self.settings.kafka_bootstrap_servers} answered for {silent:.0f} s "
                    f"(BROKER_UNAVAILABLE_TIMEOUT_S={self.settings.broker_unavailable_timeout_s:g})"
                ) from None

    def _observe_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_observed_at < LAG_EVERY_S:
            return
        self._lag_observed_at = now
        for topic, partition in list(self._epochs):
            try:
                # cached=True: the watermark the last fetch brought back; no extra request to the broker.
                _low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            committed = self.committed.get((topic, partition))
            if high >= 0 and committed is not None:
                self.metrics.lag_observed((topic, partition), high, committed)

    def _shutdown(self) -> None:
        self._set_paused(True)
        dropped = self.batcher.pending + sum(len(b) for b in self._ready)
        self.batcher.drop(lambda _source: False)
        self._ready.clear()
        if self._job is not None:
            log.info("stopping: waiting up to %.0f s for the in-flight batch", self.settings.shutdown_timeout_s)
            if self._job.done.wait(self.settings.shutdown_timeout_s):
                self._collect_generation()
            else:
                log.warning("stopping: abandoned the in-flight batch; it is not committed and will be processed again")
                self._job = None
        self.sink.flush(self.settings.shutdown_timeout_s)
        self._commit_acknowledged()
        log.info("stopped: %d unprocessed record(s) left uncommitted for the next run", dropped)

    def _close(self) -> None:
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close: %s", exc)
        self.producer.flush(5)


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"
