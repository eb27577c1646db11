"""ContinuousFeed: the one thread that keeps a StreamingEngine full (admission, refill, abort, failure, exclusive calls)."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace

import pytest

from processor.continuous import ContinuousFeed
from processor.engines.base import EventGenerationError, Finished, Generation, InFlightBudget, Prompt
from processor.engines.extractive import ExtractiveEngine
from processor.engines.isolation import generate_isolated
from processor.events import validate_event
from processor.prompt import PromptBuilder
from processor.ops.samples import sample_events

TIMEOUT = 10.0


def base_prompt() -> Prompt:
    engine = ExtractiveEngine()
    return PromptBuilder(engine.tokenizer, 6144, 1536).build(validate_event(sample_events()[0]))


def sized(tokens: int, steps: int = 1, tag: str = "") -> Prompt:
    """A prompt of exactly `tokens` tokens; the recording engine finishes it after `steps` steps."""
    prompt = base_prompt()
    event = prompt.event.model_copy(update={"event_id": f"{tag or 'p'}-{tokens}-{steps}"})
    return replace(prompt, event=event, token_ids=tuple([steps] + [7] * (tokens - 1)))


class RecordingEngine:
    """A StreamingEngine double: a request finishes after token_ids[0] steps; every call is recorded with the
    thread that made it and the engine's in-flight sequences and tokens at each step."""

    kind, model = "recording", "recording"

    def __init__(self, budget: InFlightBudget | None = None, step_delay: float = 0.0) -> None:
        self.budget = budget
        self.step_delay = step_delay
        self.live: dict[str, list] = {}  # id → [steps left, prompt]
        self.steps: list[tuple[int, int]] = []  # (sequences, prompt tokens) in flight at each step
        self.finished_per_step: list[int] = []
        self.added: list[str] = []
        self.aborted: list[list[str]] = []
        self.threads: set[int] = set()
        self.fail_next_step: BaseException | None = None
        self.refuse: set[str] = set()  # ids whose add_request raises EventGenerationError
        self.generate_calls: list[list[str]] = []
        self.poisoned: set[str] = set()  # event ids whose presence makes step()/generate() raise

    def _seen(self) -> None:
        self.threads.add(threading.get_ident())

    def add_request(self, request_id: str, prompt: Prompt) -> None:
        self._seen()
        if request_id in self.refuse:
            raise EventGenerationError(f"refused {request_id}")
        assert request_id not in self.live, "duplicate id in flight"
        self.added.append(request_id)
        self.live[request_id] = [prompt.token_ids[0], prompt]

    def step(self) -> list[Finished]:
        self._seen()
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail_next_step is not None:
            error, self.fail_next_step = self.fail_next_step, None
            raise error
        if any(p.event.event_id in self.poisoned for _, p in self.live.values()):
            raise RuntimeError("CUDA error: device-side assert triggered")
        self.steps.append((len(self.live), sum(p.prompt_tokens for _, p in self.live.values())))
        done = []
        for request_id, entry in list(self.live.items()):
            entry[0] -= 1
            if entry[0] <= 0:
                del self.live[request_id]
                done.append(Finished(request_id, Generation(f"summary of {request_id}", "stop", entry[1].prompt_tokens, 3)))
        self.finished_per_step.append(len(done))
        return done

    def abort(self, request_ids):
        self._seen()
        ids = list(request_ids)
        self.aborted.append(ids)
        for request_id in ids:
            self.live.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.live)

    def in_flight_budget(self):
        return self.budget

    def generate(self, prompts):
        self._seen()
        assert not self.live, "generate() while streaming requests are in flight"
        self.generate_calls.append([p.event.event_id for p in prompts])
        if any(p.event.event_id in self.poisoned for p in prompts):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return [Generation(f"summary of {p.event.event_id}", "stop", p.prompt_tokens, 3) for p in prompts]

    def capacity(self):
        return None

    def close(self) -> None:
        pass


def submit_all(feed: ContinuousFeed, prompts: dict[str, Prompt]) -> None:
    """Submit while holding the feed's lock, so its thread sees them all at once (no race with the first step)."""
    with feed._cond:
        for request_id, prompt in prompts.items():
            feed.submit(request_id, prompt)


def collect(feed: ContinuousFeed, count: int, timeout: float = TIMEOUT) -> dict[str, Finished]:
    got: dict[str, Finished] = {}
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} finished"
        feed.wait(0.5)
        for item in feed.take_finished():
            assert item.request_id not in got, "reported twice"
            got[item.request_id] = item
        assert feed.failure is None, feed.failure
    return got


@pytest.fixture()
def feeds():
    made: list[ContinuousFeed] = []

    def make(engine, **kwargs) -> ContinuousFeed:
        kwargs.setdefault("budget", engine.in_flight_budget())
        kwargs.setdefault("max_new_tokens", 10)
        feed = ContinuousFeed(engine, **kwargs)
        made.append(feed)
        return feed

    yield make
    for feed in made:
        feed.close()


def test_the_budget_holds_at_every_step_and_everything_finishes_once(feeds):
    budget = InFlightBudget(max_sequences=5, kv_tokens=600)
    engine = RecordingEngine(budget)
    feed = feeds(engine, max_new_tokens=10)
    rng = random.Random(7)
    prompts = {f"r{i}": sized(rng.randint(20, 150), rng.randint(1, 6), f"r{i}") for i in range(60)}
    submit_all(feed, prompts)
    got = collect(feed, len(prompts))
    assert set(got) == set(prompts)
    assert all(isinstance(f.outcome, Generation) for f in got.values())
    for sequences, tokens in engine.steps:
        assert sequences <= 5
        assert tokens + 10 * sequences <= 600, "prompt + max_new_tokens of everything in flight fits the KV budget"
    assert max(s for s, _ in engine.steps) >= 4, "the budget is actually used"
    assert engine.added == list(prompts), "admitted in submission order"
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads, "one feed thread makes every call"


@pytest.mark.parametrize("reserve, most_in_flight", [(100, 3), (0, 6)])
def test_a_smaller_new_token_reserve_admits_more_requests_at_once(feeds, reserve, most_in_flight):
    # 100-token prompts in 600 KV tokens: reserving 100 new tokens each, three fit; reserving none (vLLM's own policy,
    # which then preempts when the cache runs out), six — while the sequence limit (8) still holds.
    engine = RecordingEngine(InFlightBudget(max_sequences=8, kv_tokens=600))
    feed = feeds(engine, max_new_tokens=reserve)
    prompts = {f"r{i}": sized(100, 5, f"r{i}") for i in range(12)}
    submit_all(feed, prompts)
    assert set(collect(feed, len(prompts))) == set(prompts)
    assert max(s for s, _ in engine.steps) == most_in_flight


def test_requests_finish_out_of_order_and_freed_room_is_refilled_at_once(feeds):
    engine = RecordingEngine()
    feed = feeds(engine, budget=InFlightBudget(max_sequences=3, kv_tokens=10**9))
    # The first is long; short ones behind it keep the other two slots busy.
    submit_all(feed, {"long": sized(10, 20, "long")} | {f"s{i}": sized(10, 2, f"s{i}") for i in range(8)})
    got = collect(feed, 9)
    assert list(got)[-1] == "long", "the long request finishes last, the short ones overtake it"
    busy_steps = [s for s, _ in engine.steps][:-1]
    # While work is queued, every step runs the full three sequences: nothing waits for the long one.
    assert all(s == 3 for s in busy_steps[: 4 * 2]), busy_steps


def test_a_request_larger_than_the_whole_budget_runs_alone(feeds):
    engine = RecordingEngine()
    feed = feeds(engine, budget=InFlightBudget(max_sequences=4, kv_tokens=100), max_new_tokens=10)
    feed.submit("small", sized(20, 3))
    feed.submit("huge", sized(500, 2))
    feed.submit("after", sized(20, 1))
    got = collect(feed, 3)
    assert set(got) == {"small", "huge", "after"}
    for sequences, tokens in engine.steps:
        assert tokens <= 90 or sequences == 1, "the oversized request never shares the engine"
    assert engine.added == ["small", "huge", "after"], "no overtaking: the big one is not starved"


def test_kv_tokens_are_reserved_in_whole_blocks():
    budget = InFlightBudget(max_sequences=8, kv_tokens=64, block_size=16)
    assert budget.request_tokens(17, 0) == 32 and budget.request_tokens(16, 0) == 16 and budget.request_tokens(1, 16) == 32
    engine = RecordingEngine(budget)
    feed = ContinuousFeed(engine, budget=budget, max_new_tokens=0)
    try:
        for i in range(4):
            feed.submit(f"b{i}", sized(17, 3, f"b{i}"))  # 32 tokens each in blocks of 16: two fit in 64, not three
        collect(feed, 4)
        assert max(s for s, _ in engine.steps) == 2
    finally:
        feed.close()


def test_abort_withdraws_queued_and_in_flight_requests_and_reports_nothing_for_them(feeds):
    engine = RecordingEngine(step_delay=0.01)
    feed = feeds(engine, budget=InFlightBudget(max_sequences=2, kv_tokens=10**9))
    for i in range(6):
        feed.submit(f"a{i}", sized(10, 30, f"a{i}"))
    deadline = time.monotonic() + TIMEOUT
    while not engine.steps:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    feed.abort(["a0", "a3", "unknown"])  # a0 in flight, a3 queued
    deadline = time.monotonic() + TIMEOUT
    while "a0" in engine.live:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert ["a0"] in engine.aborted, "the engine's abort gets the in-flight id (and only ids it holds)"
    got = collect(feed, 4, timeout=20)
    assert set(got) == {"a1", "a2", "a4", "a5"}
    assert "a3" not in engine.added, "a queued request never reaches the engine"
    assert feed.in_flight == 0 and feed.queued == 0


def test_abort_drops_an_outcome_not_yet_taken(feeds):
    engine = RecordingEngine()
    feed = feeds(engine)
    feed.submit("x", sized(10, 1))
    assert feed.wait(TIMEOUT)
    feed.abort(["x"])
    assert feed.take_finished() == []


def test_an_id_can_be_submitted_again_after_it_was_aborted(feeds):
    engine = RecordingEngine(step_delay=0.005)
    feed = feeds(engine)
    feed.submit("same", sized(10, 50))
    with pytest.raises(ValueError):
        feed.submit("same", sized(10, 1))
    deadline = time.monotonic() + TIMEOUT
    while not engine.steps:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    feed.abort(["same"])
    feed.submit("same", sized(12, 1))
    got = collect(feed, 1)
    assert got["same"].outcome.prompt_tokens == 12 and engine.added == ["same", "same"]
    assert engine.aborted == [["same"]], "the old one was aborted in the engine before the new one was added"


def test_a_request_the_engine_refuses_is_that_requests_failure_only(feeds):
    engine = RecordingEngine()
    engine.refuse = {"bad"}
    feed = feeds(engine)
    for request_id in ("ok1", "bad", "ok2"):
        feed.submit(request_id, sized(10, 2, request_id))
    got = collect(feed, 3)
    assert isinstance(got["bad"].outcome, EventGenerationError)
    assert isinstance(got["ok1"].outcome, Generation) and isinstance(got["ok2"].outcome, Generation)
    assert feed.failure is None


def test_an_engine_failure_stops_the_feed_and_lists_every_unfinished_id(feeds):
    engine = RecordingEngine(step_delay=0.005)
    feed = feeds(engine, budget=InFlightBudget(max_sequences=2, kv_tokens=10**9))
    for i in range(5):
        feed.submit(f"f{i}", sized(10, 1000, f"f{i}"))
    deadline = time.monotonic() + TIMEOUT
    while len(engine.steps) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    engine.fail_next_step = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert feed.wait(TIMEOUT)
    assert isinstance(feed.failure, RuntimeError)
    assert feed.failed_ids() == [f"f{i}" for i in range(5)], "in flight and queued, in submission order"
    assert not engine.live, "what the engine held was aborted"
    assert feed.wanted() == 0 and feed.in_flight == 0 and feed.queued == 0
    steps = len(engine.steps)
    feed.submit("later", sized(10, 1, "later"))
    time.sleep(0.1)
    assert len(engine.steps) == steps and "later" not in engine.added, "no stepping while failed"
    # A known-good probe on the feed's thread clears the failure; the held submission then runs.
    probe = feed.run_exclusive(lambda e: e.generate([sized(10, 1, "probe")]), timeout=TIMEOUT)
    assert isinstance(probe[0], Generation)
    assert feed.failure is None and feed.failed_ids() == []
    assert set(collect(feed, 1)) == {"later"}


def test_a_failing_probe_keeps_the_failure_and_reraises(feeds):
    engine = RecordingEngine()
    feed = feeds(engine)
    engine.fail_next_step = RuntimeError("boom")
    feed.submit("a", sized(10, 1))
    assert feed.wait(TIMEOUT) and feed.failure is not None

    def broken(e):
        raise RuntimeError("still broken")

    with pytest.raises(RuntimeError, match="still broken"):
        feed.run_exclusive(broken, timeout=TIMEOUT)
    assert feed.failure is not None and feed.failed_ids() == ["a"]


def test_bisection_after_a_failure_finds_the_poisoned_event(feeds):
    engine = RecordingEngine()
    feed = feeds(engine, budget=InFlightBudget(max_sequences=8, kv_tokens=10**9))
    prompts = {f"e{i}": sized(10, 3, f"e{i}") for i in range(8)}
    engine.poisoned = {"e5-10-3"}
    for request_id, prompt in prompts.items():
        feed.submit(request_id, prompt)
    assert feed.wait(TIMEOUT) and feed.failure is not None
    failed = feed.failed_ids()
    assert set(failed) == set(prompts)
    outcomes = feed.run_exclusive(lambda e: generate_isolated(e, [prompts[i] for i in failed]), timeout=TIMEOUT)
    bad = [i for i, o in zip(failed, outcomes) if not isinstance(o, Generation)]
    assert bad == ["e5"]


def test_run_exclusive_waits_for_in_flight_work_and_pauses_admission(feeds):
    engine = RecordingEngine(step_delay=0.002)
    feed = feeds(engine, budget=InFlightBudget(max_sequences=2, kv_tokens=10**9))
    for i in range(2):
        feed.submit(f"w{i}", sized(10, 20, f"w{i}"))
    deadline = time.monotonic() + TIMEOUT
    while not engine.steps:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    feed.submit("queued", sized(10, 1, "queued"))
    seen: dict[str, object] = {}

    def warm_up(e):
        seen["live"] = dict(e.live)
        seen["thread"] = threading.get_ident()
        return e.generate([sized(10, 1, "warm")])

    result = feed.run_exclusive(warm_up, timeout=TIMEOUT)
    assert seen["live"] == {}, "nothing in flight while fn runs"
    assert seen["thread"] in engine.threads and len(engine.threads) == 1
    assert "queued" not in engine.added[:2] and isinstance(result[0], Generation)
    assert set(collect(feed, 3)) == {"w0", "w1", "queued"}


def test_run_exclusive_times_out_and_withdraws_a_call_that_never_started(feeds):
    engine = RecordingEngine(step_delay=0.01)
    feed = feeds(engine)
    feed.submit("slow", sized(10, 1000))
    deadline = time.monotonic() + TIMEOUT
    while not engine.steps:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    ran = []
    with pytest.raises(TimeoutError):
        feed.run_exclusive(lambda e: ran.append(1), timeout=0.1)
    feed.abort(["slow"])
    time.sleep(0.1)
    assert ran == [], "withdrawn: it does not run later"


def test_reset_aborts_everything_and_forgets_the_queue(feeds):
    engine = RecordingEngine(step_delay=0.005)
    feed = feeds(engine, budget=InFlightBudget(max_sequences=2, kv_tokens=10**9))
    for i in range(5):
        feed.submit(f"q{i}", sized(10, 1000, f"q{i}"))
    deadline = time.monotonic() + TIMEOUT
    while not engine.steps:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    feed.reset()
    assert not engine.live and feed.in_flight == 0 and feed.queued == 0
    assert sorted(sum(engine.aborted, [])) == ["q0", "q1"]
    feed.submit("q0", sized(10, 1, "again"))
    assert set(collect(feed, 1)) == {"q0"}


def test_wanted_fills_the_budget_plus_a_lookahead_and_is_zero_when_full(feeds):
    engine = RecordingEngine(step_delay=0.005)
    feed = feeds(engine, budget=InFlightBudget(max_sequences=8, kv_tokens=10**9))
    assert feed.wanted() == 8 + 4
    for i in range(12):
        feed.submit(f"n{i}", sized(10, 1000, f"n{i}"))
    assert feed.wanted() == 0
    token_bound = feeds(RecordingEngine(), budget=InFlightBudget(max_sequences=256, kv_tokens=10_000), max_new_tokens=100)
    token_bound.submit("t", sized(100, 1000))
    assert 40 <= token_bound.wanted() <= 80, "about kv_tokens / cost sequences, not max_sequences"


def test_an_idle_feed_blocks_instead_of_spinning(feeds):
    engine = RecordingEngine()
    feed = feeds(engine)
    feed.submit("one", sized(10, 2))
    collect(feed, 1)
    steps, threads = len(engine.steps), threading.active_count()
    idle_before = feed.idle_seconds
    time.sleep(0.3)
    assert len(engine.steps) == steps, "no steps without work"
    assert feed.idle_seconds - idle_before >= 0.25, "the wait counts as idle time"
    assert feed.busy_seconds > 0
    assert threading.active_count() == threads
    assert feed.wait(0.05) is False


def test_close_stops_the_thread_and_aborts_what_is_in_flight():
    engine = RecordingEngine(step_delay=0.005)
    feed = ContinuousFeed(engine, budget=None, max_new_tokens=10)
    feed.submit("c", sized(10, 10_000))
    deadline = time.monotonic() + TIMEOUT
    while not engine.steps:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    feed.close()
    assert not feed._thread.is_alive() and not engine.live
    with pytest.raises(RuntimeError):
        feed.submit("d", sized(10, 1))


# ------------------------------------------------------------------------------------- with real engines
def test_the_extractive_engine_runs_continuously_with_the_same_summaries_as_micro_batches(feeds):
    engine = ExtractiveEngine()
    builder = PromptBuilder(engine.tokenizer, 6144, 1536)
    events = [e | {"event_id": f"x{i}"} for i, e in enumerate(sample_events() * 4)]
    prompts = {e["event_id"]: builder.build(validate_event(e)) for e in events}
    expected = dict(zip(prompts, ExtractiveEngine().generate(list(prompts.values()))))
    feed = feeds(engine, budget=engine.in_flight_budget(), max_new_tokens=1536, max_sequences_default=7)
    order: list[str] = []
    submit_all(feed, prompts)
    deadline = time.monotonic() + TIMEOUT
    got: dict[str, Finished] = {}
    while len(got) < len(prompts):
        assert time.monotonic() < deadline
        feed.wait(0.5)
        for item in feed.take_finished():
            got[item.request_id] = item
            order.append(item.request_id)
    assert {k: v.outcome for k, v in got.items()} == expected
    assert order != list(prompts), "finished out of order"
    assert not engine.has_unfinished()


def test_refill_min_lets_new_requests_enter_together(feeds):
    engine = RecordingEngine()
    feed = feeds(engine, budget=InFlightBudget(max_sequences=4, kv_tokens=10**9), refill_min=3)
    rng = random.Random(3)
    submit_all(feed, {f"g{i}": sized(10, rng.randint(1, 5), f"g{i}") for i in range(30)})
    collect(feed, 30)
    counts = [s for s, _ in engine.steps]
    refills = 0
    for before, finished, after in zip(counts, engine.finished_per_step, counts[1:]):
        left = before - finished
        if after > left:  # requests were admitted between these steps: only once 3 slots were free
            refills += 1
            assert left <= 1, (before, finished, after)
    assert refills >= 5 and max(counts) == 4


def test_start_exclusive_returns_at_once_and_its_outcome_settles_the_feed(feeds):
    engine = RecordingEngine(step_delay=0.01)
    feed = feeds(engine)
    submit_all(feed, {"slow": sized(10, 20)})  # ~0.2 s of steps before the exclusive call may run
    started = time.monotonic()
    job = feed.start_exclusive(lambda e: e.generate([sized(10, 1, "probe")]))
    assert time.monotonic() - started < 0.05 and not job.done.is_set(), "the caller does not wait for the engine"
    assert set(collect(feed, 1)) == {"slow"}
    assert job.done.wait(TIMEOUT) and job.error is None and isinstance(job.result[0], Generation)

    def broken(e):
        raise RuntimeError("still broken")

    failing = feed.start_exclusive(broken)
    assert failing.done.wait(TIMEOUT) and isinstance(failing.error, RuntimeError)
    assert feed.failure is failing.error and feed.wanted() == 0, "a call that found the engine broken fails the feed"
    healed = feed.start_exclusive(lambda e: None)
    assert healed.done.wait(TIMEOUT) and feed.failure is failing.error, "the failure stays for the caller (reset) to handle"
    feed.reset()
    feed.submit("after", sized(10, 1))
    assert set(collect(feed, 1)) == {"after"}


def test_a_step_that_fails_while_an_exclusive_call_waits_is_not_cleared_by_that_calls_success(feeds):
    """Found by the simulation: a probe queued behind requests in flight ran once a failing step() had released them,
    succeeded, and cleared the failure — the requests in flight at the failure were then known to nobody."""
    gate = threading.Event()

    class FailsOnce(RecordingEngine):
        failed = False

        def step(self):
            if not self.failed:
                self.failed = True
                gate.wait(TIMEOUT)  # fails only once the exclusive call waits behind it
                raise RuntimeError("the engine as a whole")
            return super().step()

    feed = feeds(FailsOnce(step_delay=0.01))
    submit_all(feed, {"in-flight": sized(10, 20)})
    deadline = time.monotonic() + TIMEOUT
    while feed.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    job = feed.start_exclusive(lambda e: e.generate([sized(10, 1, "probe")]))
    gate.set()
    assert job.done.wait(TIMEOUT) and job.error is None
    assert feed.failure is not None and feed.failed_ids() == ["in-flight"], "the caller must still see what failed"


def test_stalled_for_is_how_long_the_engine_call_running_now_has_not_returned(feeds):
    gate = threading.Event()

    class Hanging(RecordingEngine):
        def step(self):
            gate.wait(TIMEOUT)
            return super().step()

    feed = feeds(Hanging())
    assert feed.stalled_for() == 0.0
    feed.submit("a", sized(10, 1))
    time.sleep(0.3)
    try:
        assert 0.2 < feed.stalled_for() < TIMEOUT, "a step() that has not returned"
    finally:
        gate.set()
    collect(feed, 1)
    assert feed.stalled_for() == 0.0
