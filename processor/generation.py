"""Generation: the engine's side of the loop, in either GENERATION_MODE, behind one small interface.

* micro_batch — items are grouped by the MicroBatcher; one long-lived thread runs one generate() per batch. Long-
  lived because CUDA libraries keep per-thread state (cuBLAS handles, workspaces) that a fresh thread per batch
  would pay for again on every batch (measured on an H100 at 3-4× the batch's own generation time).
* continuous — items go one by one into a ContinuousFeed that keeps vLLM's engine supplied up to its KV budget
  and reports each request as it finishes, out of order.

Both answer the worker's questions the same way: how many items do you want, take this item, what finished.
A failure of the engine as a whole is never blamed on the records: the known-good warm-up prompt is the probe, and
isolation.FailurePolicy is the one place, for both modes, that asks it before a failure becomes a dead letter; while
the probe fails, the work is held and retried with backoff, and EngineUnavailableError ends the worker once
INFRASTRUCTURE_RETRY_TIMEOUT_S has passed. Every engine call, probe and retry runs on the engine's own thread; the
polling thread only hands work over and collects results, so take(), wanted(), add() and wait() never wait on the
engine for longer than their timeout. An engine call that has not returned after ENGINE_CALL_TIMEOUT_S means a hung
engine (the probe cannot run behind it): take() raises EngineUnavailableError, and what is in flight is left
uncommitted for the next owner.

This module holds the interface, what both modes share and the micro-batch scheduler; continuous_scheduler.py the
continuous one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from processor.batcher import Batch, MicroBatcher
from processor.source import BatchItem, SourceRecord
from processor.engines.base import CallClock, Engine, EventGenerationError, Generation, Prompt, ShortGeneration, TimedEngine
from processor.engines.isolation import FailurePolicy
from processor.errors import EngineUnavailableError
from processor.retry import Backoff

log = logging.getLogger(__name__)

# The warm-up's tokens per prompt: enough to run the decode path at the batch shape, short enough that a warm-up on
# a CPU takes seconds and a stop during it is not kept waiting.
WARM_UP_MAX_TOKENS = 4

Outcome = Generation | EventGenerationError
Done = tuple[BatchItem, "Outcome | BaseException"]


@dataclass
class BatchStats:
    events: int
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    failed: int


class Scheduler(Protocol):
    busy_seconds: float
    idle_seconds: float
    last_batches: list[BatchStats]

    def warm_up(self, prompt: Prompt, copies: int = 1) -> None: ...
    def wanted(self) -> int: ...
    def seconds_until_due(self) -> float | None: ...
    def add(self, item: BatchItem) -> None: ...
    def take(self) -> list[Done]:
        """Finished items with their outcomes; never waits on the engine. Raises EngineUnavailableError once the engine
        stayed broken longer than the retry timeout, or an engine call is past its deadline (a hung engine)."""
        ...
    def wait(self, timeout: float) -> None: ...
    def drop(self, keep: Callable[[SourceRecord], bool]) -> int: ...
    def pending(self) -> int: ...
    def in_flight(self) -> int: ...
    def finish(self, timeout: float) -> list[Done]:
        """Stop taking items; wait up to `timeout` for what is generating; return what finished."""
        ...
    def stalled_for(self) -> float:
        """Seconds the engine call running now has not returned (0.0 between calls): /healthz and /readyz ask it."""
        ...
    def close(self) -> None: ...


def check_deadline(stalled_s: float, call_timeout_s: float | None) -> None:
    """A hung engine call cannot be probed (the probe would queue behind it) nor interrupted: give up on the engine."""
    if call_timeout_s is not None and stalled_s > call_timeout_s:
        log.error("an engine call has not returned for %.0f s (ENGINE_CALL_TIMEOUT_S=%g): the engine is hung", stalled_s, call_timeout_s)
        raise EngineUnavailableError(
            f"an engine call has not returned for {stalled_s:.0f} s (ENGINE_CALL_TIMEOUT_S={call_timeout_s:g}); the work in "
            "flight is not committed and is read again by the next owner"
        )


def batch_stats(items: list[BatchItem], outcomes: list[Any], seconds: float) -> BatchStats:
    done = [o for o in outcomes if isinstance(o, Generation)]
    return BatchStats(sum(1 for i in items if i.prompt is not None), seconds, sum(o.prompt_tokens for o in done), sum(o.completion_tokens for o in done), len(outcomes) - len(done))


# --------------------------------------------------------------------------------------------- micro-batch
class _Job:
    def __init__(self, batch: Batch, work: Callable[[], list[Any]]) -> None:
        self.batch = batch
        self.work = work
        self.results: list[Any] | None = None
        self.failure: BaseException | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self.done = threading.Event()


class GenerationThread:
    """One long-lived daemon thread runs every engine call (a daemon, so a stuck call can be abandoned at exit)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="generate", daemon=True)
        self._thread.start()

    def submit(self, batch: Batch, work: Callable[[], list[Any]]) -> _Job:
        job = _Job(batch, work)
        self._jobs.put(job)
        return job

    def call(self, fn: Callable[[], object], timeout: float | None = None) -> None:
        """Run fn on the generation thread and wait for it; re-raise its exception."""
        job = self.submit(Batch(), lambda: (fn(), [])[1])
        if not job.done.wait(timeout):
            raise EngineUnavailableError(f"the engine did not answer within {timeout:g} s")
        if job.failure is not None:
            raise job.failure

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            job.started = time.monotonic()
            try:
                job.results = job.work()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which decides
                job.failure = exc
            finally:
                job.finished = time.monotonic()
                job.done.set()


class MicroBatchScheduler:
    """At most one closed batch waits while another generates: memory stays bounded, the engine never waits."""

    def __init__(self, *, engine: Engine, batcher: MicroBatcher, probe_prompt: Prompt, retry_timeout_s: float,
                 call_timeout_s: float | None = None) -> None:
        self.engine = engine
        self.batcher = batcher
        self.thread = GenerationThread(engine)
        self.policy = FailurePolicy(probe_prompt)
        self.clock = CallClock()
        self._timed: Engine = TimedEngine(engine, self.clock)  # type: ignore[assignment] - every batch's calls are timed
        self.call_timeout_s = call_timeout_s
        self.backoff = Backoff(give_up_after_s=retry_timeout_s)
        self._ready: list[Batch] = []
        self._job: _Job | None = None
        self.busy_seconds = 0.0
        self.idle_seconds = 0.0
        self._idle_since: float | None = time.monotonic()
        self.last_batches: list[BatchStats] = []

    def warm_up(self, prompt: Prompt, copies: int = 1) -> None:
        self.thread.call(lambda: warm(self.engine, prompt, copies))

    @property
    def ready_batches(self) -> list[Batch]:
        """Closed batches waiting for the engine (at most one in steady state)."""
        return list(self._ready)

    def wanted(self) -> int:
        return 0 if self._ready else max(1, self.batcher.room)

    def add(self, item: BatchItem) -> None:
        self._ready.extend(self.batcher.add(item))

    def pending(self) -> int:
        return self.batcher.pending + sum(len(b) for b in self._ready)

    def in_flight(self) -> int:
        return 0 if self._job is None else len(self._job.batch)

    def seconds_until_due(self) -> float | None:
        return self.batcher.seconds_until_due()

    def stalled_for(self) -> float:
        return self.clock.running_for()

    def take(self) -> list[Done]:
        check_deadline(self.stalled_for(), self.call_timeout_s)
        due = self.batcher.due()
        if due is not None:
            self._ready.append(due)
        finished: list[Done] = []
        job = self._job
        if job is not None and job.done.is_set():
            self._job = None
            self._note_idle_start()
            assert job.finished is not None
            self.busy_seconds += job.finished - job.started
            if isinstance(job.failure, EngineUnavailableError):
                self._ready.insert(0, job.batch)  # hold the batch: retried after the backoff, never dead-lettered
                if not self.backoff.failed():
                    raise job.failure
                log.error("engine unavailable (retry %d in %.1f s): %s", self.backoff.attempts, self.backoff.next_at - time.monotonic(), job.failure)
            elif job.failure is not None:
                raise job.failure
            else:
                assert job.results is not None
                self.backoff.succeeded()
                finished = list(zip(job.batch.items, job.results))
                if job.batch.prompts:
                    self.last_batches.append(batch_stats(job.batch.items, job.results, job.finished - job.started))
        self._start()
        return finished

    def _start(self) -> None:
        if self._job is not None or not self._ready or (self.backoff.failing and not self.backoff.due()):
            return
        batch = self._ready.pop(0)
        if self._idle_since is not None and batch.prompts:
            self.idle_seconds += time.monotonic() - self._idle_since
            self._idle_since = None
        self._job = self.thread.submit(batch, lambda: self._outcomes(batch))

    def _outcomes(self, batch: Batch) -> list[Outcome | BaseException]:
        """One outcome per item: records that failed before the engine ride along in their batch, so a batch's
        dead letters are published and committed with it, in offset order."""
        results = iter(self.policy.generate(self._timed, batch.prompts))
        return [item.error if item.skips_engine else next(results) for item in batch.items]  # type: ignore[misc]

    def _note_idle_start(self) -> None:
        self._idle_since = time.monotonic()

    def wait(self, timeout: float) -> None:
        if self._job is not None:
            self._job.done.wait(timeout)
        else:
            time.sleep(timeout)

    def drop(self, keep: Callable[[SourceRecord], bool]) -> int:
        dropped = self.batcher.drop(keep)
        kept = []
        for batch in self._ready:
            remaining = batch.without(keep)
            dropped += len(batch) - len(remaining)
            if remaining.items:
                kept.append(remaining)
        self._ready = kept
        return dropped  # the batch generating now finishes; its revoked items are ignored by the checkpoint

    def finish(self, timeout: float) -> list[Done]:
        self.batcher.drop(lambda _source: False)
        self._ready.clear()
        if self._job is None:
            return []
        log.info("stopping: waiting up to %.0f s for the batch generating now", timeout)
        if not self._job.done.wait(timeout):
            log.warning("stopping: abandoned the batch generating now; it is not committed and will be processed again")
            self._job = None
            return []
        try:
            return self.take()
        except EngineUnavailableError:
            return []

    def close(self) -> None:
        return None


def warm(engine: Engine, prompt: Prompt, copies: int = 1) -> None:
    if isinstance(engine, ShortGeneration):  # a few tokens: the kernels and the batch shape, not a whole summary
        outputs = engine.generate_short([prompt] * copies, WARM_UP_MAX_TOKENS)
    else:
        outputs = engine.generate([prompt] * copies)
    if outputs and not isinstance(outputs[0], Generation):
        log.warning("warm-up generate() produced no summary: %s", outputs[0])
