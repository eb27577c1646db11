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
worst case for every request in flight means vLLM never has to preempt (and recompute) for lack of cache.

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
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, TypeVar

from processor.engines.base import CallClock, EventGenerationError, Finished, InFlightBudget, Prompt, StreamingEngine, TimedEngine

log = logging.getLogger(__name__)

T = TypeVar("T")

# Requests queued beyond what fills the budget: enough to refill the engine from the feed's own thread while the
# caller is busy elsewhere (polling, publishing), small enough that abort-on-revoke has little to withdraw.
LOOKAHEAD_MIN = 4
LOOKAHEAD_SHARE = 0.25


@dataclass
class Exclusive(Generic[T]):
    """One call run on the feed's thread with the engine to itself; `done` is set once `result` or `error` is."""

    fn: Callable[[StreamingEngine], T]
    wait_idle: bool  # run_exclusive: wait until nothing is in flight; reset: run at once
    settles: bool = False  # start_exclusive: an exception fails the feed
    started: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class ContinuousFeed:
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
        self.max_sequences = budget.max_sequences if budget is not None else max_sequences_default
        self.kv_tokens: int | None = budget.kv_tokens if budget is not None else None
        self._block_size = budget.block_size if budget is not None else 1
        # Refill once at least this many sequence slots are free (1: as soon as anything finishes). Larger values
        # let new prompts enter the engine together: on vLLM V1 every step that holds a prefill runs outside the
        # decode CUDA graphs, so one refill per finished request costs a slow step each (bench/vllm_modes.py).
        self.refill_min = max(1, min(refill_min, self.max_sequences))

        self._cond = threading.Condition()
        self._queue: OrderedDict[str, tuple[Prompt, int]] = OrderedDict()  # submitted, not admitted: id → (prompt, cost)
        self._in_flight: OrderedDict[str, int] = OrderedDict()  # admitted to the engine: id → KV tokens reserved
        self._tokens_in_flight = 0
        self._aborting: set[str] = set()  # in flight, withdrawn by the caller, not yet aborted in the engine
        self._finished: list[Finished] = []
        self._failed: list[str] = []
        self._exclusive: deque[Exclusive[Any]] = deque()
        self._closed = False
        self._mean_cost = float(2 * max_new_tokens)  # running estimate of a request's cost, for wanted()
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
        cost = self._cost(prompt)
        with self._cond:
            if self._closed:
                raise RuntimeError("the continuous feed is closed")
            if request_id in self._queue or (request_id in self._in_flight and request_id not in self._aborting):
                raise ValueError(f"request {request_id!r} is already submitted and unfinished")
            self._queue[request_id] = (prompt, cost)
            self._mean_cost += (cost - self._mean_cost) * 0.05
            self._cond.notify_all()

    def abort(self, request_ids: Iterable[str]) -> None:
        """Withdraw requests, queued or in flight; no Finished is reported for them afterwards. Thread-safe."""
        with self._cond:
            ids = set(request_ids)
            for request_id in ids:
                if self._queue.pop(request_id, None) is None and request_id in self._in_flight:
                    self._aborting.add(request_id)
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
            capacity = self._capacity_locked()
            lookahead = max(LOOKAHEAD_MIN, int(capacity * LOOKAHEAD_SHARE))
            return max(0, capacity + lookahead - (len(self._in_flight) - len(self._aborting)) - len(self._queue))

    @property
    def capacity(self) -> int:
        """Requests the engine can hold at once: the sequence limit, or fewer where the KV cache fits fewer of the
        requests seen so far (a running mean of their cost; before any, the worst case of a whole-context request)."""
        with self._cond:
            return self._capacity_locked()

    def _capacity_locked(self) -> int:
        if self.kv_tokens is None:
            return self.max_sequences
        return min(self.max_sequences, max(1, int(self.kv_tokens // max(1.0, self._mean_cost))))

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
            return len(self._in_flight) - len(self._aborting)

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

    # ------------------------------------------------------------------------------------ feed's thread
    def _cost(self, prompt: Prompt) -> int:
        tokens = prompt.prompt_tokens + self.max_new_tokens
        return -(-tokens // self._block_size) * self._block_size

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

    def _account(self, had_work: bool) -> None:
        now = time.perf_counter()
        if had_work:
            self._busy += now - self._mark
        else:
            self._idle += now - self._mark
        self._mark = now

    def _admissible_locked(self) -> bool:
        if not self._queue or self.failure is not None:
            return False
        if any(job.wait_idle for job in self._exclusive):
            return False  # draining for run_exclusive
        request_id, (_, cost) = next(iter(self._queue.items()))
        if request_id in self._in_flight:
            return False  # the same id is still being aborted: after that
        live = len(self._in_flight)
        if live == 0:
            return True  # always one: a request larger than the whole budget still runs, alone
        if live + 1 > self.max_sequences:
            return False
        return self.kv_tokens is None or self._tokens_in_flight + cost <= self.kv_tokens

    def _has_work_locked(self) -> bool:
        if self._closed or self._aborting:
            return True
        if self._exclusive and (not self._exclusive[0].wait_idle or not self._in_flight):
            return True
        if self.failure is not None:
            return False
        return bool(self._in_flight) or self._admissible_locked()

    def _release_locked(self, request_id: str) -> None:
        self._tokens_in_flight -= self._in_flight.pop(request_id, 0)
        self._aborting.discard(request_id)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._has_work_locked():
                    self._account(had_work=bool(self._in_flight))
                    self._idle_since = self._mark
                    while not self._has_work_locked():
                        self._cond.wait()
                    self._idle_since = None
                    self._account(had_work=False)
                if self._closed:
                    break
                aborts = [i for i in self._in_flight if i in self._aborting]
            if aborts:
                self._abort_in_engine(aborts)
            with self._cond:
                for request_id in aborts:
                    self._release_locked(request_id)
                job = None
                if self._exclusive and (not self._exclusive[0].wait_idle or not self._in_flight):
                    job = self._exclusive.popleft()
                    job.started = True
            if job is not None:
                self._run_job(job)
                continue
            self._admit()
            self._step()
        self._shutdown()

    def _abort_in_engine(self, request_ids: list[str]) -> None:
        had_work = bool(self._in_flight)
        try:
            self._engine.abort(request_ids)
        except Exception as exc:  # noqa: BLE001 - a broken engine cannot hold them either; the ids are released
            log.warning("aborting %d requests in the engine failed: %s", len(request_ids), exc)
        self._account(had_work)

    def _run_job(self, job: Exclusive[Any]) -> None:
        try:
            job.result = job.fn(self._engine)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of run_exclusive
            job.error = exc
        finally:
            self._account(had_work=True)
            # A started job's success clears nothing: the caller starts one only while the feed has no failure, so a
            # failure recorded now happened while the job waited for the engine to drain (a step() that raised), and
            # its failed requests are the caller's to hold and retry — clearing it would lose them.
            if job.settles and job.error is not None:
                self._fail(job.error)
            job.done.set()

    def _admit(self) -> None:
        with self._cond:
            live = len(self._in_flight)
            if live and self.max_sequences - live < self.refill_min:
                return  # wait until enough room is free to refill together
        while True:
            with self._cond:
                if not self._admissible_locked():
                    return
                request_id, (prompt, cost) = self._queue.popitem(last=False)
                self._in_flight[request_id] = cost
                self._tokens_in_flight += cost
            try:
                self._engine.add_request(request_id, prompt)
            except EventGenerationError as exc:  # this request's failure (e.g. a prompt over max_model_len)
                with self._cond:
                    self._release_locked(request_id)
                    self._finished.append(Finished(request_id, exc))
                    self._cond.notify_all()
            except Exception as exc:  # noqa: BLE001 - the engine as a whole
                self._fail(exc)
                return

    def _step(self) -> None:
        with self._cond:
            if not self._in_flight or self.failure is not None:
                return
        try:
            finished = self._engine.step() if self._engine.has_unfinished() else []
            lost = [] if self._engine.has_unfinished() else None
        except Exception as exc:  # noqa: BLE001 - the engine as a whole
            self._account(had_work=True)
            self._fail(exc)
            return
        self.steps += 1
        self._account(had_work=True)
        with self._cond:
            for item in finished:
                if item.request_id not in self._in_flight:
                    continue  # not (or no longer) ours
                dropped = item.request_id in self._aborting
                self._release_locked(item.request_id)
                if not dropped:
                    self._finished.append(item)
            if lost is None and self._in_flight:
                # The engine says nothing is unfinished, yet these never came back: report them rather than
                # stepping an idle engine for ever.
                for request_id in list(self._in_flight):
                    dropped = request_id in self._aborting
                    self._release_locked(request_id)
                    if not dropped:
                        self._finished.append(
                            Finished(request_id, EventGenerationError("the engine finished without an output for it"))
                        )
            if finished or lost is None:
                self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        log.error("the engine failed as a whole: %s: %s", type(exc).__name__, exc)
        with self._cond:
            in_flight = [i for i in self._in_flight if i not in self._aborting]
            self.failure = exc
            self._failed = in_flight + list(self._queue)
            self._queue.clear()
            held = list(self._in_flight)
        # Whatever the engine still holds must go before anything else runs on it (a probe's generate() would
        # step stale requests too).
        if held:
            self._abort_in_engine(held)
        with self._cond:
            for request_id in held:
                self._release_locked(request_id)
            self._cond.notify_all()

    def _shutdown(self) -> None:
        with self._cond:
            held = list(self._in_flight)
            pending = list(self._exclusive)
            self._exclusive.clear()
        if held:
            self._abort_in_engine(held)
        with self._cond:
            for request_id in held:
                self._release_locked(request_id)
        for job in pending:
            job.error = RuntimeError("the continuous feed closed")
            job.done.set()
