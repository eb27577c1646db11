"""The Worker: only the consumer loop — poll, pause and keep-alive, rebalance, broker health, start and stop (after
Sentry arroyo's StreamProcessor) — over two interfaces it does not look inside:

  pipeline.py    a consumed record in, its summary or dead letter out: intake → generation (micro_batch or
                 continuous, chosen once by make_pipeline) → records
  checkpoint.py  the offset lifecycle (track, finish, publish, acked, commit), ownership epochs and the one
                 CommitPolicy; at-least-once or transactional, chosen once by make_checkpoint
  clients.py     the Kafka clients' configuration and the broker's health

and two parts of its own: assignment.py (the inbox, fetch, pause and keep-alive, the rebalance callbacks, the rewind)
and reporting.py (totals, lag, progress and dead-letter lines).

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

from processor.assignment import FINISH_JOIN_MAX_S, PAUSE_AFTER_S, POLL_INTERVAL_S, Assignment
from processor.checkpoint import TP, BaseCheckpoint, CommitPolicy, Ownership, make_checkpoint
from processor.clients import BrokerHealth, consumer_config, is_cooperative, make_consumer, make_producer, max_record_bytes, producer_config
from processor.codec import Codec, make_codec
from processor.engines.base import Engine, EngineStartupError
from processor.errors import EXIT_OK, CommitFailedError, InfrastructureError
from processor.metrics import Metrics
from processor.pipeline import Pipeline, make_pipeline
from processor.records import OutgoingRecord
from processor.reporting import Progress
from processor.retry import Backoff
from processor.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["FINISH_JOIN_MAX_S", "GIL_SWITCH_INTERVAL_S", "PAUSE_AFTER_S", "POLL_INTERVAL_S", "Worker", "exit_at_once", "load_or_stop"]

# While the worker runs, a thread waiting for the GIL gets it after at most this long (CPython's default: 5 ms).
# The engine's thread wakes from the GPU many times a second and must not wait behind the loop's Python work: on
# an H100 with vLLM 0.24 (bench/gpu_bench.py, bench/results/switch-interval/) micro-batches went from 0.89 to 0.95
# of the engine alone, and the continuous feed needed ~1.6 % more engine steps than the engine alone (2-3 % at 5 ms).
GIL_SWITCH_INTERVAL_S = 0.001
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
        self.consumer = consumer if consumer is not None else make_consumer(consumer_conf)
        self.producer = producer if producer is not None else make_producer(producer_conf)

        self.pipeline: Pipeline = pipeline or make_pipeline(settings, engine, self.codec, max_record_bytes=max_record_bytes(producer_conf))
        self.ownership = Ownership()
        # The callbacks are late-bound: assignment and progress are built on the checkpoint, just below.
        self.checkpoint: BaseCheckpoint = make_checkpoint(
            settings, consumer=self.consumer, producer=self.producer, policy=commit_policy or CommitPolicy.from_settings(settings),
            ownership=self.ownership, window=self.pipeline.window, keep_alive=lambda: self.assignment.keep_alive(),
            shrink=self.pipeline.smaller, on_acknowledged=lambda record: self.progress.acknowledged(record),
            on_committed=lambda offsets, count: self.progress.committed(offsets, count))
        self.metrics.watch_engine(self.pipeline.stalled_for, settings.engine_call_timeout_s)  # /healthz, /readyz

        self.progress = Progress(settings, consumer=self.consumer, pipeline=self.pipeline, checkpoint=self.checkpoint,
                                 ownership=self.ownership, metrics=self.metrics, health=self.health)
        self.assignment = Assignment(
            settings, consumer=self.consumer, pipeline=self.pipeline, checkpoint=self.checkpoint, ownership=self.ownership,
            metrics=self.metrics, health=self.health, progress=self.progress, cooperative=is_cooperative(consumer_conf),
            registry_retry=registry_retry or Backoff(give_up_after_s=settings.infrastructure_retry_timeout_s))
        # Finished work (one pipeline.take() each: a micro-batch) the checkpoint does not accept yet: handed on one at
        # a time, so that a commit never releases two batches at once (the engine meanwhile goes on generating).
        self._finished: deque[list[OutgoingRecord]] = deque()
        self._stop = threading.Event()
        self._exit_now = exit_now
        self._signals = 0
        self._warm_up_abandoned = False
        self.totals = self.progress.totals

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
        return self.assignment.paused

    def full_for(self) -> float | None:
        """Seconds generation has wanted no more records, or None while it takes them."""
        full_since = self.assignment.full_since
        return None if full_since is None else time.monotonic() - full_since

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
        self.assignment.subscribe()
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
        self.progress.observe_lag()
        self.progress.report()
        self.assignment.consume()
        self.assignment.drain_inbox()
    # ------------------------------------------------------------------------------------- finish → publish
    def _finish(self, records: list[OutgoingRecord]) -> None:
        if records:
            self._finished.append(records)
        while self._finished and self.checkpoint.accepts_finished:
            for record in self._finished.popleft():
                # False for a record no longer this worker's (revoked while it generated): the new owner produces it.
                if self.checkpoint.finish(record.source, record) and record.is_dead_letter:
                    self.progress.dead_letter(record)
        for stats in self.pipeline.batches():
            self.progress.batch_done(stats)

    def _publish(self) -> None:
        self.checkpoint.publish()

    def _commit(self, force: bool = False) -> None:
        idle = self.pipeline.idle()
        try:
            self.checkpoint.maybe_commit(idle=idle, force=force)
        except CommitFailedError:
            if self.checkpoint.needs_rewind:
                self.assignment.rewind()
            raise
        if self.checkpoint.needs_rewind:  # an aborted transaction, retried after the rewind
            self.assignment.rewind()
    # ------------------------------------------------------------------------------------------------ stop
    def _shutdown(self) -> None:
        not_started = self.pipeline.pending() + self.assignment.stop_fetching()
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
        self.progress.stopped(not_started)

    def _close(self) -> None:
        if not self._warm_up_abandoned:  # else the engine's thread is busy with the warm-up: nothing to wait for
            self.pipeline.close()
        self.assignment.leave()
        self.producer.flush(5)

