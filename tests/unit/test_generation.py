"""Generation: a GPU that dies is the engine's failure (held, retried, then exit 5), never the records'."""

from __future__ import annotations

import time

import pytest

from processor.batcher import MicroBatcher
from processor.source import BatchItem, SourceRecord
from processor.engines.base import EventGenerationError, Generation
from processor.engines.extractive import ExtractiveEngine
from processor.continuous import ContinuousFeed
from processor.engines.base import EmptySummaryError
from processor.engines.isolation import EngineCallError, generate_isolated, probe_with
from processor.errors import EngineUnavailableError
from processor.events import validate_event
from processor.continuous_scheduler import ContinuousScheduler
from processor.generation import MicroBatchScheduler
from processor.prompt import PromptBuilder
from processor.ops.samples import sample_events


class DyingEngine(ExtractiveEngine):
    """Works for `healthy_calls` generate() calls, then raises for everything (a CUDA illegal address), until revived."""

    def __init__(self, healthy_calls: int, poisoned: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.healthy_calls = healthy_calls
        self.poisoned = poisoned
        self.calls = 0

    def generate(self, prompts):
        self.calls += 1
        if self.calls > self.healthy_calls:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if any(p.event.event_id in self.poisoned for p in prompts):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return super().generate(prompts)


def prompts(n: int):
    builder = PromptBuilder(ExtractiveEngine().tokenizer, 6144, 1536)
    base = sample_events()
    return [builder.build(validate_event(base[i % len(base)] | {"event_id": f"e{i}"})) for i in range(n)]


def test_a_dead_gpu_is_not_blamed_on_the_batch():
    engine = DyingEngine(healthy_calls=0)
    batch = prompts(8)
    probe = probe_with(engine, prompts(1)[0])
    with pytest.raises(EngineUnavailableError):
        generate_isolated(engine, batch, probe)
    assert engine.calls == 2, "the whole batch, then the probe: no bisection of a dead GPU"


def test_a_gpu_dying_mid_bisection_is_caught_when_every_event_failed():
    engine = DyingEngine(healthy_calls=2, poisoned=frozenset({"e3"}))  # batch raises (poison), probe passes, then death
    with pytest.raises(EngineUnavailableError):
        generate_isolated(engine, prompts(8), probe_with(engine, prompts(1)[0]))


def test_a_lone_poison_event_is_dead_lettered_when_the_probe_passes():
    engine = DyingEngine(healthy_calls=10**6, poisoned=frozenset({"e0"}))
    [outcome] = generate_isolated(engine, prompts(1), probe_with(engine, prompts(2)[1]))
    assert isinstance(outcome, EngineCallError)


def item(offset: int, prompt) -> BatchItem:
    return BatchItem(SourceRecord("in", 0, offset, None, b"", None, (), 1), prompt=prompt)


def run_until_done(scheduler: MicroBatchScheduler, deadline_s: float = 10.0):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        done = scheduler.take()
        if done:
            return done
        scheduler.wait(0.01)
    raise AssertionError("no batch finished")


def test_micro_batches_are_held_and_retried_while_the_engine_is_down_then_exit():
    engine = DyingEngine(healthy_calls=1)  # warm-up works, then the GPU dies
    probe_prompt = prompts(1)[0]
    scheduler = MicroBatchScheduler(engine=engine, batcher=MicroBatcher(4, 0.0, 10**9), probe_prompt=probe_prompt, retry_timeout_s=0.5)
    scheduler.backoff.first_s = 0.05
    scheduler.warm_up(probe_prompt)
    for offset, prompt in enumerate(prompts(4)):
        scheduler.add(item(offset, prompt))
    finished: list = []
    with pytest.raises(EngineUnavailableError):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            finished += scheduler.take()
            scheduler.wait(0.01)
    assert finished == [], "nothing finished, so nothing is dead-lettered or committed"
    assert scheduler.backoff.attempts >= 2, "retried with backoff before giving up"
    assert scheduler.pending() == 4, "the batch is still held"


def test_micro_batches_resume_when_the_engine_recovers():
    engine = DyingEngine(healthy_calls=1)
    probe_prompt = prompts(1)[0]
    scheduler = MicroBatchScheduler(engine=engine, batcher=MicroBatcher(4, 0.0, 10**9), probe_prompt=probe_prompt, retry_timeout_s=60)
    scheduler.backoff.first_s = 0.05
    scheduler.warm_up(probe_prompt)
    for offset, prompt in enumerate(prompts(4)):
        scheduler.add(item(offset, prompt))
    deadline = time.monotonic() + 10
    while scheduler.backoff.attempts < 2 and time.monotonic() < deadline:
        assert scheduler.take() == []
        scheduler.wait(0.01)
    engine.healthy_calls = 10**6  # the driver came back
    done = run_until_done(scheduler)
    assert [i.source.offset for i, _ in done] == [0, 1, 2, 3]
    assert all(isinstance(outcome, Generation) for _, outcome in done)
    assert not scheduler.backoff.failing


def test_records_that_failed_before_the_engine_ride_along_in_their_batch():
    engine = ExtractiveEngine()
    scheduler = MicroBatchScheduler(engine=engine, batcher=MicroBatcher(2, 0.0, 10**9), probe_prompt=prompts(1)[0], retry_timeout_s=60)
    bad = BatchItem(SourceRecord("in", 0, 1, None, b"", None, (), 1), error=ValueError("bad"))
    p = prompts(2)
    for it in (item(0, p[0]), bad, item(2, p[1])):
        scheduler.add(it)
    done = run_until_done(scheduler)
    assert [i.source.offset for i, _ in done] == [0, 1, 2]
    assert isinstance(done[1][1], ValueError) and isinstance(done[0][1], Generation)
    assert not isinstance(done[2][1], EventGenerationError)


class SilentEngine(ExtractiveEngine):
    """Says nothing (whitespace) for events whose id ends in 'silent', through generate() and step() alike."""

    def generate(self, prompts):
        return [Generation("  \n", "stop", p.prompt_tokens, 1) if p.event.event_id.endswith("silent") else out for p, out in zip(prompts, super().generate(prompts))]


def silent_prompts(n: int):
    return [p if i % 2 else type(p)(**{**p.__dict__, "event": p.event.model_copy(update={"event_id": f"e{i}-silent"})}) for i, p in enumerate(prompts(n))]


@pytest.mark.parametrize("mode", ["micro_batch", "continuous"])
def test_an_empty_summary_is_the_events_failure_in_both_modes(mode):
    engine = SilentEngine()
    probe_prompt = prompts(1)[0]
    if mode == "continuous":
        scheduler = ContinuousScheduler(feed=ContinuousFeed(engine, budget=None, max_new_tokens=1536), engine=engine, probe_prompt=probe_prompt, retry_timeout_s=60)
    else:
        scheduler = MicroBatchScheduler(engine=engine, batcher=MicroBatcher(4, 0.0, 10**9), probe_prompt=probe_prompt, retry_timeout_s=60)
    try:
        for offset, prompt in enumerate(silent_prompts(4)):
            scheduler.add(item(offset, prompt))
        done: list = []
        deadline = time.monotonic() + 10
        while len(done) < 4 and time.monotonic() < deadline:
            done += scheduler.take()
            scheduler.wait(0.01)
        outcomes = {i.source.offset: o for i, o in done}
        assert sorted(outcomes) == [0, 1, 2, 3]
        assert all(isinstance(outcomes[o], EmptySummaryError) for o in (0, 2)), outcomes
        assert all(isinstance(outcomes[o], Generation) and outcomes[o].text.strip() for o in (1, 3)), outcomes
    finally:
        scheduler.close()


def test_work_handed_over_after_an_engine_failure_is_held_with_the_rest_not_lost():
    # The feed fails on its own thread; the loop may submit more before it sees that. A reset() forgets the feed's
    # queue, so whatever the scheduler still owes must be held and retried — here, the poison and a good event.
    engine = DyingEngine(healthy_calls=10**6, poisoned=frozenset({"e0"}))
    feed = ContinuousFeed(engine, budget=None, max_new_tokens=1536)
    scheduler = ContinuousScheduler(feed=feed, engine=engine, probe_prompt=prompts(3)[2], retry_timeout_s=60)
    scheduler.backoff.first_s = 0.01
    try:
        first, second = prompts(2)
        scheduler.add(item(0, first))
        deadline = time.monotonic() + 10
        while feed.failure is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert feed.failure is not None, "the poisoned step failed the feed"
        scheduler.add(item(1, second))  # handed over after the failure, before take() saw it
        done: list = []
        while len(done) < 2 and time.monotonic() < deadline:
            done += scheduler.take()
            scheduler.wait(0.01)
        outcomes = {i.source.offset: o for i, o in done}
        assert sorted(outcomes) == [0, 1], f"nothing may be lost: {outcomes}"
        assert isinstance(outcomes[0], EngineCallError) and isinstance(outcomes[1], Generation)
        assert scheduler.in_flight() == 0 and scheduler.pending() == 0
    finally:
        scheduler.close()


# ------------------------------------------------------------------------- one policy, off the polling thread
import threading  # noqa: E402

from processor.engines.isolation import PROBE_AFTER_FAILED_IN_A_ROW  # noqa: E402


def make_scheduler(mode: str, engine, *, retry_timeout_s: float = 60, call_timeout_s: float | None = None, window: int = 4):
    probe_prompt = prompts(1)[0]
    if mode == "continuous":
        feed = ContinuousFeed(engine, budget=None, max_new_tokens=1536, max_sequences_default=window)
        scheduler = ContinuousScheduler(feed=feed, engine=engine, probe_prompt=probe_prompt, retry_timeout_s=retry_timeout_s, call_timeout_s=call_timeout_s)
    else:
        scheduler = MicroBatchScheduler(engine=engine, batcher=MicroBatcher(window, 0.0, 10**9), probe_prompt=probe_prompt,
                                        retry_timeout_s=retry_timeout_s, call_timeout_s=call_timeout_s)
    scheduler.backoff.first_s = 0.02
    return scheduler


class MuteEngine(ExtractiveEngine):
    """After `healthy_calls` generate() calls, every summary is empty — through generate() and step() alike, the probe's
    included: the engine is broken although no call raises."""

    def __init__(self, healthy_calls: int = 0) -> None:
        super().__init__()
        self.healthy_calls, self.calls = healthy_calls, 0

    def generate(self, prompts):
        self.calls += 1
        if self.calls > self.healthy_calls:
            return [Generation(" ", "length", p.prompt_tokens, 0) for p in prompts]
        return super().generate(prompts)


@pytest.mark.parametrize("mode", ["micro_batch", "continuous"])
def test_an_engine_that_answers_every_request_with_nothing_is_held_then_exit_never_dead_lettered(mode):
    scheduler = make_scheduler(mode, MuteEngine(), retry_timeout_s=0.3)
    try:
        for offset, prompt in enumerate(prompts(8)):
            scheduler.add(item(offset, prompt))
        released: list = []
        deadline = time.monotonic() + 10
        with pytest.raises(EngineUnavailableError):
            while time.monotonic() < deadline:
                released += scheduler.take()
                scheduler.wait(0.01)
        assert released == [], "the probe fails too: nothing may become a dead letter"
    finally:
        scheduler.close()


class SilentFor(ExtractiveEngine):
    """Empty summaries for the listed event ids (bad records); every other prompt, the probe's included, works."""

    def __init__(self, silent: set[str]) -> None:
        super().__init__()
        self.silent, self.calls = silent, []

    def generate(self, prompts):
        self.calls.append([p.event.event_id for p in prompts])
        return [Generation("", "stop", p.prompt_tokens, 0) if p.event.event_id in self.silent else out
                for p, out in zip(prompts, super().generate(prompts))]


def test_continuous_releases_failed_requests_once_a_summary_or_the_probe_clears_them():
    engine = SilentFor({"e1", "e2"})
    scheduler = make_scheduler("continuous", engine, window=16)
    try:
        for offset, prompt in enumerate(prompts(5)[1:]):
            scheduler.add(item(offset, prompt))
        done: list = []
        deadline = time.monotonic() + 10
        while len(done) < 4 and time.monotonic() < deadline:
            done += scheduler.take()
            scheduler.wait(0.01)
        outcomes = {i.source.offset: o for i, o in done}
        assert sorted(outcomes) == [0, 1, 2, 3]
        assert isinstance(outcomes[0], EmptySummaryError) and isinstance(outcomes[1], EmptySummaryError)
        assert isinstance(outcomes[2], Generation) and isinstance(outcomes[3], Generation)
        assert engine.calls.count(["e0"]) <= 3, "two failures cost at most three probes (before, between and after their tries alone)"
    finally:
        scheduler.close()


def test_continuous_probes_a_run_of_failures_before_they_become_dead_letters():
    n = PROBE_AFTER_FAILED_IN_A_ROW
    engine = SilentFor({f"e{i}" for i in range(1, n + 1)})  # bad records, healthy engine: the probe (e0) passes
    scheduler = make_scheduler("continuous", engine, window=64)
    assert scheduler.policy.probe_after == n
    try:
        batch = prompts(n + 1)[1:]
        for offset, prompt in enumerate(batch):
            scheduler.add(item(offset, prompt))
        done: list = []
        deadline = time.monotonic() + 10
        while len(done) < n and time.monotonic() < deadline:
            done += scheduler.take()
            scheduler.wait(0.01)
        assert len(done) == n and all(isinstance(o, EmptySummaryError) for _, o in done)
        assert 1 <= engine.calls.count(["e0"]) <= n + 1, "the known-good probe was asked before they became dead letters"
    finally:
        scheduler.close()


class StepFailsOnceThenSlowGenerate(ExtractiveEngine):
    """The first step() raises (the engine fails as a whole); then every generate() — the retry's, the probe's —
    blocks until `gate` is set: a retry that takes seconds on a real GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.failed = False
        self.threads: set[int] = set()
        self.warm = False

    def generate(self, prompts):
        self.threads.add(threading.get_ident())
        if self.warm and self.failed:
            self.entered.set()
            assert self.gate.wait(10)
        return super().generate(prompts)

    def step(self):
        if not self.failed:
            self.failed = True
            self._in_flight.clear()
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().step()


class BatchFailsThenSlowProbe(ExtractiveEngine):
    """The first real batch raises; every generate() after it (probe, bisection) blocks until `gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.failed = False
        self.threads: set[int] = set()
        self.warm = False

    def generate(self, prompts):
        self.threads.add(threading.get_ident())
        if self.warm and not self.failed:
            self.failed = True
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.warm:
            self.entered.set()
            assert self.gate.wait(10)
        return super().generate(prompts)


@pytest.mark.parametrize("mode", ["micro_batch", "continuous"])
def test_the_probe_and_the_retry_run_on_the_engines_thread_and_take_never_waits_for_them(mode):
    engine = StepFailsOnceThenSlowGenerate() if mode == "continuous" else BatchFailsThenSlowProbe()
    scheduler = make_scheduler(mode, engine)
    try:
        scheduler.warm_up(prompts(1)[0])
        engine.warm = True
        for offset, prompt in enumerate(prompts(4)):
            scheduler.add(item(offset, prompt))
        done: list = []
        slowest = 0.0
        deadline = time.monotonic() + 10
        while not engine.entered.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            done += scheduler.take()
            slowest = max(slowest, time.monotonic() - started)
            scheduler.wait(0.01)
        assert engine.entered.is_set(), "the retry/probe started"
        for _ in range(20):  # the retry is blocked in the engine: the polling thread goes on, without waiting for it
            started = time.monotonic()
            done += scheduler.take()
            assert scheduler.wanted() == (0 if mode == "continuous" else 4), "continuous: nothing new while work is held"
            scheduler.wait(0.01)
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.2, f"take()/wait() waited {slowest:.2f} s for the engine"
        assert done == []
        engine.gate.set()
        while len(done) < 4 and time.monotonic() < deadline:
            done += scheduler.take()
            scheduler.wait(0.01)
        assert sorted(i.source.offset for i, _ in done) == [0, 1, 2, 3]
        assert all(isinstance(o, Generation) for _, o in done), done
        assert threading.get_ident() not in engine.threads, "no engine call on the polling thread"
    finally:
        engine.gate.set()
        scheduler.close()


class HangingEngine(ExtractiveEngine):
    """After the warm-up, generate() (and so step()) blocks until `gate` is set: a hung GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.warm = False

    def generate(self, prompts):
        if self.warm:
            self.gate.wait(10)
        return super().generate(prompts)


@pytest.mark.parametrize("mode", ["micro_batch", "continuous"])
def test_an_engine_call_past_its_deadline_ends_generation_with_engine_unavailable(mode):
    engine = HangingEngine()
    scheduler = make_scheduler(mode, engine, call_timeout_s=0.3)
    try:
        scheduler.warm_up(prompts(1)[0])
        engine.warm = True
        assert scheduler.stalled_for() == 0.0
        for offset, prompt in enumerate(prompts(2)):
            scheduler.add(item(offset, prompt))
        started = time.monotonic()
        with pytest.raises(EngineUnavailableError, match="ENGINE_CALL_TIMEOUT_S"):
            while time.monotonic() - started < 5:
                assert scheduler.take() == []
                scheduler.wait(0.01)
        assert 0.3 < time.monotonic() - started < 2.0
        assert scheduler.stalled_for() > 0.3
    finally:
        engine.gate.set()
        scheduler.close()


class SilentOnceFor(ExtractiveEngine):
    """An empty summary the first time each listed event is generated (a transient fault); fine after that."""

    def __init__(self, silent: set[str]) -> None:
        super().__init__()
        self.silent = set(silent)

    def generate(self, prompts):
        outputs = []
        for p, out in zip(prompts, super().generate(prompts)):
            if p.event.event_id in self.silent:
                self.silent.discard(p.event.event_id)
                out = Generation("", "stop", p.prompt_tokens, 0)
            outputs.append(out)
        return outputs


@pytest.mark.parametrize("mode", ["micro_batch", "continuous"])
def test_an_event_that_failed_once_gets_a_second_try_before_it_is_blamed(mode):
    scheduler = make_scheduler(mode, SilentOnceFor({"e1", "e3"}))
    try:
        for offset, prompt in enumerate(prompts(4)):
            scheduler.add(item(offset, prompt))
        done: list = []
        deadline = time.monotonic() + 10
        while len(done) < 4 and time.monotonic() < deadline:
            done += scheduler.take()
            scheduler.wait(0.01)
        assert sorted(i.source.offset for i, _ in done) == [0, 1, 2, 3]
        assert all(isinstance(o, Generation) for _, o in done), "a transient failure must not dead-letter a good event"
    finally:
        scheduler.close()


class BlockingEngine(ExtractiveEngine):
    """Every call blocks until `release` is set (a hang that has not yet reached the call timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def generate(self, prompts):
        self.release.wait(10)
        return super().generate(prompts)


def test_closing_the_continuous_scheduler_waits_only_briefly_for_a_step_that_is_not_yet_hung():
    from processor.continuous_scheduler import CLOSE_WAIT_S

    engine = BlockingEngine()
    feed = ContinuousFeed(engine, budget=None, max_new_tokens=1536)
    scheduler = ContinuousScheduler(feed=feed, engine=engine, probe_prompt=prompts(1)[0], retry_timeout_s=60,
                                    call_timeout_s=300.0)
    try:
        scheduler.add(item(0, prompts(1)[0]))
        deadline = time.monotonic() + 5
        while scheduler.stalled_for() == 0.0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert scheduler.stalled_for() > 0.0, "the step started"
        started = time.monotonic()
        scheduler.close()
        assert time.monotonic() - started < CLOSE_WAIT_S + 0.5, "close() waited out the blocked step"
    finally:
        engine.release.set()
