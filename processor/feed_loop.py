"""The continuous feed's own thread (continuous.py has the feed, its caller side and the design): wait for work,
abort what the caller withdrew, run exclusive calls, admit by the budget (admission.py), step the engine, and on a
failure of the engine as a whole record it and stop. FeedLoop is ContinuousFeed's base: the state below is the
feed's, created in its constructor and guarded by `_cond`."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from processor.admission import Admission
from processor.engines.base import EventGenerationError, Finished, StreamingEngine

log = logging.getLogger("processor.continuous")  # the feed's log, wherever its code lives

T = TypeVar("T")


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



class FeedLoop:
    """The feed's thread: `_run` is its target; every engine call happens here."""

    _cond: threading.Condition
    _engine: StreamingEngine
    admission: Admission
    _queue: OrderedDict[str, Any]
    _in_flight: OrderedDict[str, int]
    _aborting: set[str]
    _finished: list[Finished]
    _failed: list[str]
    _exclusive: deque[Exclusive[Any]]
    _closed: bool
    failure: BaseException | None
    _busy: float
    _idle: float
    _idle_since: float | None
    _mark: float
    steps: int

    def _account(self, had_work: bool) -> None:
        now = time.perf_counter()
        if had_work:
            self._busy += now - self._mark
        else:
            self._idle += now - self._mark
        self._mark = now

    def _admissible_locked(self) -> bool:
        if self.failure is not None or any(job.wait_idle for job in self._exclusive):
            return False  # failed, or draining for run_exclusive
        return self.admission.admissible()

    def _has_work_locked(self) -> bool:
        if self._closed or self._aborting:
            return True
        if self._exclusive and (not self._exclusive[0].wait_idle or not self._in_flight):
            return True
        if self.failure is not None:
            return False
        return bool(self._in_flight) or self._admissible_locked()

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
                    self.admission.release(request_id)
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
            if self.admission.waits_to_refill():
                return  # wait until enough room is free to refill together
        while True:
            with self._cond:
                if not self._admissible_locked():
                    return
                request_id, prompt = self.admission.admit_next()
            try:
                self._engine.add_request(request_id, prompt)
            except EventGenerationError as exc:  # this request's failure (e.g. a prompt over max_model_len)
                with self._cond:
                    self.admission.release(request_id)
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
                self.admission.release(item.request_id)
                if not dropped:
                    self._finished.append(item)
            if lost is None and self._in_flight:
                # The engine says nothing is unfinished, yet these never came back: report them rather than
                # stepping an idle engine for ever.
                for request_id in list(self._in_flight):
                    dropped = request_id in self._aborting
                    self.admission.release(request_id)
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
                self.admission.release(request_id)
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
                self.admission.release(request_id)
        for job in pending:
            job.error = RuntimeError("the continuous feed closed")
            job.done.set()
