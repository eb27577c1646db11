"""GENERATION_MODE=continuous: one long-lived thread feeds a StreamingEngine and keeps it full.

Micro-batching runs one blocking generate() per batch, so the GPU idles at each batch's tail: the batch waits for
its longest summary while the slots of the short ones stay empty. Here requests go into the engine one by one
(vLLM's add_request) and the engine is stepped continuously; each request that finishes frees its room, which is
refilled at once from a small queue of submitted requests. The caller (the consumer loop) only hands requests
over (`submit`), collects outcomes (`take_finished`), and withdraws requests of revoked partitions (`abort`).

Admission keeps the engine inside its budget (InFlightBudget, from the KV cache vLLM really allocated): a request
costs its prompt tokens + max_new_tokens (rounded up to whole KV blocks) and one sequence, and is admitted while
both fit, in submission order (a large request is never overtaken, so it cannot starve). One request is always
admitted when nothing is in flight, so a request larger than the whole budget still runs (alone). Reserving the
worst case for every request in flight (max_new_tokens = SAMPLING_MAX_TOKENS, the default) means vLLM never has to
preempt (and recompute) for lack of cache; CONTINUOUS_RESERVE_NEW_TOKENS reserves less, admitting more at once and
leaving the rest to vLLM's own scheduler, which preempts when the cache runs out.

Threading: one thread makes every engine call (add_request, step, abort, generate via run_exclusive). It is
long-lived because CUDA libraries keep per-thread state (handles, workspaces): a fresh thread per batch was
measured 3-4x slower on an H100. It does not spin: with nothing in flight and nothing admissible it blocks on a
condition variable until a submit, abort, exclusive call or close wakes it.

Deadline: every engine call the feed makes is timed (`stalled_for()`), so the caller can tell a hung engine (a
step() that never returns) from a busy one and give up on it; a hung call cannot be interrupted, only abandoned.

Failure: when step() or add_request() raises (not an EventGenerationError, which is one request's outcome), the
feed records `failure`, aborts what the engine still holds (best effort), moves every submitted-unfinished id
(in flight and queued) to `failed_ids()`, and stops admitting and stepping. The caller either probes the engine
with run_exclusive() (success clears the failure and the failed ids; queued work submitted since then runs) or
calls reset() (clears everything, work submitted after the failure included) and decides what becomes of what it
had submitted: the ContinuousScheduler holds everything unfinished and bisects it through start_exclusive() and the
engine's generate(). start_exclusive() is run_exclusive() without the wait — the polling thread must never wait
on the engine — and a call of it that raises fails the feed like step() would.

Modules: this one holds the feed and its caller side; feed_loop.py the feed's thread (FeedLoop, its base);
admission.py the budget bookkeeping (Admission).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, TypeVar

from processor.admission import Admission
from processor.engines.base import CallClock, Finished, InFlightBudget, Prompt, StreamingEngine, TimedEngine
from processor.feed_loop import Exclusive, FeedLoop

log = logging.getLogger(__name__)

T = TypeVar("T")


class ContinuousFeed(FeedLoop):
    def __init__(
        self,
        engine: StreamingEngine,
        *,
        budget: InFlightBudget | None,
        max_new_tokens: int,
        max_sequences_default: int = 256,
        refill_min: int = 1,
    ) -> None:
        self.engine = engine
        self.clock = CallClock()
        self._engine: StreamingEngine = TimedEngine(engine, self.clock)  # type: ignore[assignment] - every call the feed makes is timed
        self.budget = budget
        self.max_new_tokens = max_new_tokens
        self.admission = Admission(budget, max_new_tokens=max_new_tokens, max_sequences_default=max_sequences_default,
                                   refill_min=refill_min)
        self.max_sequences = self.admission.max_sequences
        self.kv_tokens = self.admission.kv_tokens
        self.refill_min = self.admission.refill_min

        self._cond = threading.Condition()
        self._queue = self.admission.queue
        self._in_flight = self.admission.in_flight
        self._aborting = self.admission.aborting
        self._finished: list[Finished] = []
        self._failed: list[str] = []
        self._exclusive: deque[Exclusive[Any]] = deque()
        self._closed = False
        self.failure: BaseException | None = None

        # Engine time with and without work in flight, measured on the feed's thread.
        self._busy = 0.0
        self._idle = 0.0
        self._idle_since: float | None = None  # set while the thread waits with nothing to do
        self.steps = 0
        self._mark = time.perf_counter()

        log.info(
            "continuous feed: up to %d sequences and %s KV tokens in flight (%s), %d new tokens reserved per request",
            self.max_sequences,
            f"{self.kv_tokens:,}" if self.kv_tokens is not None else "unbounded",
            "engine budget" if budget is not None else "no engine budget: default",
            max_new_tokens,
        )
        self._thread = threading.Thread(target=self._run, name="continuous-feed", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------- caller side
    def submit(self, request_id: str, prompt: Prompt) -> None:
        """Queue one request; the feed admits it to the engine when the budget allows. Thread-safe."""
        cost = self.admission.cost(prompt)
        with self._cond:
            if self._closed:
                raise RuntimeError("the continuous feed is closed")
            self.admission.enqueue(request_id, prompt, cost)
            self._cond.notify_all()

    def abort(self, request_ids: Iterable[str]) -> None:
        """Withdraw requests, queued or in flight; no Finished is reported for them afterwards. Thread-safe."""
        with self._cond:
            ids = set(request_ids)
            self.admission.withdraw(ids)
            self._finished = [f for f in self._finished if f.request_id not in ids]
            self._failed = [i for i in self._failed if i not in ids]
            self._cond.notify_all()

    def take_finished(self) -> list[Finished]:
        """The outcomes reported since the last call (non-blocking). Thread-safe."""
        with self._cond:
            finished, self._finished = self._finished, []
            return finished

    def wait(self, timeout: float) -> bool:
        """Block until an outcome is waiting, the feed failed, or `timeout` passed; True unless it timed out."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._finished) or self.failure is not None or self._closed, timeout)
            return bool(self._finished) or self.failure is not None

    def wanted(self) -> int:
        """How many more requests the caller should hand over now: enough to fill the budget plus a small
        look-ahead queue; 0 when that is already there, or while the feed has failed."""
        with self._cond:
            if self._closed or self.failure is not None:
                return 0
            return self.admission.wanted()

    @property
    def capacity(self) -> int:
        """Requests the engine can hold at once: the sequence limit, or fewer where the KV cache fits fewer of the
        requests seen so far (a running mean of their cost; before any, the worst case of a whole-context request)."""
        with self._cond:
            return self.admission.capacity()

    def failed_ids(self) -> list[str]:
        """The ids that were submitted and unfinished when the engine failed, in submission order."""
        with self._cond:
            return list(self._failed)

    def run_exclusive(self, fn: Callable[[StreamingEngine], T], timeout: float | None = None) -> T:
        """Run fn(engine) on the feed's thread once nothing is in flight (admission pauses meanwhile): warm-up, a
        known-good probe after a failure, bisection with the engine's generate(). If fn returns, a recorded
        failure and its failed ids are cleared (read failed_ids() first); fn's exception is re-raised. A timeout
        (seconds to wait for fn to start and return) raises TimeoutError; fn is withdrawn if it had not started."""
        job: Exclusive[T] = Exclusive(fn, wait_idle=True)
        self._call(job, timeout)
        with self._cond:
            self.failure = None
            self._failed = []
            self._cond.notify_all()
        return job.result

    def start_exclusive(self, fn: Callable[[StreamingEngine], T]) -> Exclusive[T]:
        """run_exclusive() without waiting: fn(engine) runs on the feed's thread once nothing is in flight; poll
        the returned job's `done`, then read `result` or `error`. Before `done` is set, fn's exception fails the
        feed (failure, failed_ids) like a step() that raised, so nothing is admitted after a call that found the
        engine broken; its success leaves a failure recorded meanwhile for the caller (see _run_job)."""
        job: Exclusive[T] = Exclusive(fn, wait_idle=True, settles=True)
        with self._cond:
            if self._closed:
                raise RuntimeError("the continuous feed is closed")
            self._exclusive.append(job)
            self._cond.notify_all()
        return job

    def stalled_for(self) -> float:
        """Seconds the engine call running now (step, add_request, an exclusive call's generate) has not returned."""
        return self.clock.running_for()

    def reset(self) -> None:
        """Start over: abort everything in flight, forget queued work and a recorded failure (the caller
        resubmits what it still wants). Outcomes already reported stay for take_finished()."""
        with self._cond:
            self._queue.clear()
            self._aborting.update(self._in_flight)
            self._cond.notify_all()
        # The engine's abort() runs on the feed's thread (the engine is not thread-safe).
        self._call(Exclusive(lambda engine: None, wait_idle=False), None)
        with self._cond:
            self.failure = None
            self._failed = []
            self._cond.notify_all()

    @property
    def busy_seconds(self) -> float:
        """Seconds the feed's thread spent in the engine with work in flight (steps, admission, exclusive calls)."""
        return self._busy

    @property
    def idle_seconds(self) -> float:
        """Seconds the engine had nothing in flight (the feed waiting for work), the current wait included."""
        since = self._idle_since
        return self._idle + (time.perf_counter() - since if since is not None else 0.0)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self.admission.live

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (requests still in the engine are aborted there); the engine itself stays open."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ handing a call to the feed's thread
    def _call(self, job: Exclusive[Any], timeout: float | None) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("run_exclusive/reset called from the feed's own thread")
        with self._cond:
            if self._closed:
                raise RuntimeError("the continuous feed is closed")
            self._exclusive.append(job)
            self._cond.notify_all()
        if not job.done.wait(timeout):
            with self._cond:
                if not job.started and job in self._exclusive:
                    self._exclusive.remove(job)
                    self._cond.notify_all()
            raise TimeoutError(f"the engine was not free within {timeout} s")
        if job.error is not None:
            raise job.error
