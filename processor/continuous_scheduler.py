"""The continuous GENERATION_MODE's scheduler (generation.py holds the interface both modes answer and the
micro-batch scheduler): items go one by one into a ContinuousFeed, and each comes back as it finishes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from processor.engines.base import Engine, EventGenerationError, Prompt
from processor.engines.isolation import PROBE_AFTER_FAILED_IN_A_ROW, FailurePolicy, accepted
from processor.errors import EngineUnavailableError
from processor.generation import BatchStats, Done, Outcome, batch_stats, check_deadline, warm
from processor.retry import Backoff
from processor.source import BatchItem, SourceRecord

if TYPE_CHECKING:
    from processor.continuous import ContinuousFeed, Exclusive

log = logging.getLogger(__name__)

# How long closing waits for the continuous feed's step in flight before abandoning its (daemon) thread: a decode step
# takes milliseconds, so this covers one that is merely finishing, and stays far below the group's session timeout.
CLOSE_WAIT_S = 1.0


# ---------------------------------------------------------------------------------------------- continuous
@dataclass
class _Request:
    item: BatchItem
    submitted: float = field(default_factory=time.monotonic)
    attempt: int = 1


def request_id_of(source: SourceRecord, attempt: int = 1) -> str:
    base = f"{source.topic}/{source.partition}/{source.offset}/{source.epoch}"
    return base if attempt == 1 else f"{base}/attempt-{attempt}"


class ContinuousScheduler:
    """Items go one by one into the ContinuousFeed; each comes back as it finishes, in any order.

    A failed outcome is not released at once: a request that fails is submitted once more on its own, and one that
    fails twice is held as a suspect until a summary after it shows the engine works again, or a run of suspects (or
    nothing left in flight) makes the engine itself suspect. Either way the suspects are settled like a micro-batch,
    through the FailurePolicy's generate(): the known-good probe when all fail, a try on its own each; a failing probe,
    like a step() that raises, holds the work for a retry after the backoff. Probes and retries run on the feed's
    thread (start_exclusive) and are collected by a later take()."""

    def __init__(self, *, feed: "ContinuousFeed", engine: Engine, probe_prompt: Prompt, retry_timeout_s: float,
                 call_timeout_s: float | None = None) -> None:
        self.feed = feed
        self.engine = engine
        self.policy = FailurePolicy(probe_prompt, probe_after=min(feed.capacity, PROBE_AFTER_FAILED_IN_A_ROW))
        self.backoff = Backoff(give_up_after_s=retry_timeout_s)
        self.call_timeout_s = call_timeout_s
        self._requests: dict[str, _Request] = {}
        self._held: list[BatchItem] = []  # failed as a whole with the engine: regenerated once the backoff is due
        self._suspects: list[tuple[BatchItem, EventGenerationError]] = []  # failed twice, not released yet
        self._suspects_cleared = False  # a summary finished after the suspects: the engine works
        self._job: "Exclusive[list[Outcome]] | None" = None  # a probe or a retry running on the feed's thread
        self._job_items: list[BatchItem] = []
        self._job_is_probe = False
        self._done_now: list[Done] = []
        self.last_batches: list[BatchStats] = []

    @property
    def busy_seconds(self) -> float:
        return self.feed.busy_seconds

    @property
    def idle_seconds(self) -> float:
        return self.feed.idle_seconds

    @property
    def window(self) -> int:
        return self.feed.max_sequences

    @property
    def capacity(self) -> int:
        """Requests the engine holds at once, as far as its KV cache allows (≤ window)."""
        return self.feed.capacity

    def warm_up(self, prompt: Prompt, copies: int = 1) -> None:
        self.feed.run_exclusive(lambda engine: warm(engine, prompt, copies))

    def wanted(self) -> int:
        if self._held or self._job is not None or self.feed.failure is not None:
            return 0
        return self.feed.wanted()

    def add(self, item: BatchItem) -> None:
        if item.skips_engine:  # failed before the engine: done now (commit order is the checkpoint's business)
            self._done_now.append((item, item.error or ValueError("no prompt")))
            return
        self._submit(item)

    def _submit(self, item: BatchItem, attempt: int = 1) -> None:
        assert item.prompt is not None
        request_id = request_id_of(item.source, attempt)
        self._requests[request_id] = _Request(item, attempt=attempt)
        self.feed.submit(request_id, item.prompt)

    def pending(self) -> int:
        return len(self._held) + self.feed.queued

    def in_flight(self) -> int:
        return len(self._requests) + len(self._suspects) + len(self._job_items)

    def seconds_until_due(self) -> float | None:
        return None

    def stalled_for(self) -> float:
        return self.feed.stalled_for()

    def take(self) -> list[Done]:
        check_deadline(self.stalled_for(), self.call_timeout_s)
        finished, self._done_now = self._done_now, []
        finished += self._collect()
        finished += self._settle()
        # With a probe or retry still on the feed's thread, reset() would wait for it: the failure is handled after.
        if self.feed.failure is not None and self._job is None:
            failure = self.feed.failure
            self.feed.reset()
            finished += self._collect()  # reported before the failure, after the collect above
            # Everything still unfinished is out of the engine now — in flight at the failure, queued, or submitted
            # after it (the loop may hand over work before it sees the failure) — and the failures held as suspects
            # may be the engine's too: all of it is held, in order, and regenerated after the backoff.
            unfinished = [item for item, _ in self._suspects] + [request.item for request in self._requests.values()]
            self._suspects, self._suspects_cleared = [], False
            self._requests.clear()
            self._held += unfinished
            log.warning("the engine failed with %d request(s) unfinished: %s", len(self._held), failure)
            if not self.backoff.failed():
                raise failure if isinstance(failure, EngineUnavailableError) else EngineUnavailableError(
                    f"the engine kept failing for {self.backoff.failing_for():.0f} s: {type(failure).__name__}: {failure}")
            log.error("engine unavailable (retry %d in %.1f s): %s", self.backoff.attempts, self.backoff.next_at - time.monotonic(), failure)
        self._start_job()
        return finished

    def _collect(self) -> list[Done]:
        finished: list[Done] = []
        for result in self.feed.take_finished():
            request = self._requests.pop(result.request_id, None)
            if request is None:
                continue  # aborted meanwhile (revoked)
            outcome = accepted(result.outcome)
            self.last_batches.append(batch_stats([request.item], [outcome], time.monotonic() - request.submitted))
            if isinstance(outcome, EventGenerationError):
                if request.attempt == 1 and request.item.prompt is not None:
                    # A first failure gets a second try on its own request (as a micro-batch event gets one alone):
                    # a transient engine error, or one that hit every request of a step, must not cost a good event.
                    self._submit(request.item, attempt=2)
                    continue
                self._suspects.append((request.item, outcome))  # held until a summary or the probe clears it
                continue
            if self._suspects:
                self._suspects_cleared = True  # a summary after them: the engine works again, they get a retry
            finished.append((request.item, outcome))
        return finished

    def _settle(self) -> list[Done]:
        """The probe or retry that ran on the feed's thread, once it is done."""
        job = self._job
        if job is None or not job.done.is_set():
            return []
        items, self._job, self._job_items = self._job_items, None, []
        if job.error is None:
            self.backoff.succeeded()
            finished = list(zip(items, job.result))
            if not self._job_is_probe:
                self.last_batches.append(batch_stats(items, job.result, 0.0))
            return finished
        if isinstance(job.error, EngineUnavailableError):
            # The feed failed with this error (start_exclusive): take() holds these with the rest and backs off.
            self._held = items + self._held
            return []
        raise job.error

    def _start_job(self) -> None:
        if self._job is not None or self.feed.failure is not None:
            return
        if self._held:
            if self.backoff.failing and not self.backoff.due():
                return
            items, self._held = self._held, []
            prompts = [item.prompt for item in items if item.prompt is not None]
            self._start(items, lambda engine: self.policy.generate(engine, prompts), probe=False)
        elif self._suspects and (self._suspects_cleared or self.policy.wants_probe(len(self._suspects), more_coming=bool(self._requests))):
            # Failed twice on their own requests. Either the engine works again (a summary came after them) or a run
            # of failures makes it suspect: either way they are settled like a micro-batch, through the policy's
            # generate() — the probe when all fail, a try on its own each — so an engine that was sick for a few
            # steps is never blamed on the records it happened to be running.
            suspects, self._suspects, self._suspects_cleared = self._suspects, [], False
            prompts = [item.prompt for item, _ in suspects if item.prompt is not None]
            log.warning("%d request(s) failed twice; regenerating them through the failure policy", len(suspects))
            self._start([item for item, _ in suspects], lambda engine: self.policy.generate(engine, prompts), probe=True)

    def _start(self, items: list[BatchItem], fn: Callable[[Engine], list[Outcome]], *, probe: bool) -> None:
        self._job_items, self._job_is_probe = items, probe
        self._job = self.feed.start_exclusive(fn)

    def wait(self, timeout: float) -> None:
        if self._job is not None:
            self._job.done.wait(timeout)
        else:
            self.feed.wait(timeout)

    def drop(self, keep: Callable[[SourceRecord], bool]) -> int:
        gone = [rid for rid, request in self._requests.items() if not keep(request.item.source)]
        for rid in gone:
            del self._requests[rid]
        if gone:
            self.feed.abort(gone)
        before = len(self._held) + len(self._suspects) + len(self._done_now)
        self._done_now = [(item, outcome) for item, outcome in self._done_now if keep(item.source)]
        self._held = [item for item in self._held if keep(item.source)]
        self._suspects = [(item, outcome) for item, outcome in self._suspects if keep(item.source)]
        # A probe or retry running now finishes; its revoked items are ignored by the Worker (ownership).
        return len(gone) + before - len(self._held) - len(self._suspects) - len(self._done_now)

    def finish(self, timeout: float) -> list[Done]:
        deadline = time.monotonic() + timeout
        finished: list[Done] = []
        if self._requests:
            log.info("stopping: waiting up to %.0f s for %d request(s) in flight", timeout, len(self._requests))
        self._held = []  # not retried on the way out: not committed, read again by the next owner
        while (self._requests or self._suspects or self._job) and time.monotonic() < deadline and self.feed.failure is None:
            self.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            try:
                finished += self.take()
            except EngineUnavailableError:
                break
            self._held = []
        if self._requests:
            log.warning("stopping: aborted %d request(s); they are not committed and will be processed again", len(self._requests))
            self.feed.abort(list(self._requests))
            self._requests.clear()
        self._suspects = []
        return finished

    def close(self) -> None:
        # The polling thread closes the consumer (leaves the group) after this: a step still running is waited for
        # briefly, never for the rest of the call timeout — a call that is hanging but not yet past its deadline looks
        # like a slow one, and waiting it out kept the worker from leaving the group (the feed's thread is a daemon).
        wait = CLOSE_WAIT_S
        if self.call_timeout_s is not None:
            wait = min(wait, max(0.0, self.call_timeout_s - self.stalled_for()))
        self.feed.close(timeout=wait)
