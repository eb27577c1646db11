"""Stop means stop: SIGTERM/SIGINT during the model load, the engine warm-up or the group join ends the worker
within seconds with exit 0, and a second signal exits at once. Real signals are sent to this process (the handlers
run on the main thread, where the worker runs); the process's own handlers are restored after each test."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from processor.engines.extractive import ExtractiveEngine
from processor.errors import EXIT_OK
from processor.generation import WARM_UP_MAX_TOKENS
from processor.loop import FINISH_JOIN_MAX_S, Worker, load_or_stop
from processor.settings import load_settings
from tests.fakes.kafka import FakeGroupConsumer, FakeProducer


class Exited(Exception):
    """What the injected exit_now raises instead of ending the test process."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def exit_now(code: int) -> None:
    raise Exited(code)


@pytest.fixture(autouse=True)
def own_handlers() -> Iterator[None]:
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.fixture(params=["micro_batch", "continuous"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def settings(mode: str, **overrides: Any):
    values = {"generation_mode": mode, "kafka_input_topic": "in", "kafka_output_topic": "out", "kafka_dlq_topic": "dlq",
              "batch_max_wait_ms": 0, "batch_max_records": 2, "shutdown_timeout_s": 5}
    values.update(overrides)
    return load_settings(**values)


def signal_when(ready: Callable[[], bool], *signums: int, gap_s: float = 0.3) -> list[float]:
    """From a helper thread: once ready() (within 10 s), send each signal to this process, gap_s apart. Returns the
    times sent (filled as they go)."""
    sent: list[float] = []

    def send() -> None:
        deadline = time.monotonic() + 10
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        for n, signum in enumerate(signums):
            if n:
                time.sleep(gap_s)
            sent.append(time.monotonic())
            os.kill(os.getpid(), signum)

    threading.Thread(target=send, daemon=True).start()
    return sent


class SlowWarmUpEngine(ExtractiveEngine):
    """The warm-up (generate_short) blocks until `release` (a CPU model at full length); records what it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.warming = threading.Event()
        self.release = threading.Event()
        self.short_calls: list[int] = []

    def generate_short(self, prompts, max_new_tokens):
        self.short_calls.append(max_new_tokens)
        self.warming.set()
        self.release.wait(30)
        return self.generate(prompts)


class NeverJoins(FakeGroupConsumer):
    """A group join that does not complete (a slow broker): consume() waits its timeout and assigns nothing."""

    def __init__(self) -> None:
        super().__init__("in")
        self.subscribed = threading.Event()
        self.consumes_after_stop = 0

    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None) -> None:
        super().subscribe(topics, on_assign, on_revoke, on_lost)
        self.subscribed.set()

    def consume(self, num_messages: int = 1, timeout: float = -1):
        time.sleep(min(max(timeout, 0), 0.05))
        return []


# ------------------------------------------------------------------------------------------------- warm-up
def test_a_signal_during_the_warm_up_ends_the_worker_at_once_with_0_and_it_never_joins(mode):
    engine, consumer = SlowWarmUpEngine(), FakeGroupConsumer("in")
    worker = Worker(settings(mode), engine, consumer=consumer, producer=FakeProducer(), exit_now=exit_now)
    worker.install_signal_handlers()
    sent = signal_when(engine.warming.is_set, signal.SIGTERM)
    try:
        code = worker.run()
        returned = time.monotonic()
    finally:
        engine.release.set()
    assert code == EXIT_OK
    assert returned - sent[0] < 1.0, "the warm-up is abandoned, not waited for"
    assert consumer.callbacks == {}, "a worker stopped before its warm-up finished never joins the group"


def test_the_warm_up_generates_a_few_tokens_only(mode):
    engine = SlowWarmUpEngine()
    engine.release.set()
    worker = Worker(settings(mode, sampling_max_tokens=1536), engine, consumer=FakeGroupConsumer("in"), producer=FakeProducer())
    assert worker.warm_up() is not None
    assert engine.short_calls == [WARM_UP_MAX_TOKENS] and WARM_UP_MAX_TOKENS <= 8


# ---------------------------------------------------------------------------------------------------- join
def test_a_signal_during_the_join_waits_a_few_seconds_at_most_and_exits_0(mode):
    consumer = NeverJoins()
    worker = Worker(settings(mode, kafka_session_timeout_ms=45_000), ExtractiveEngine(), consumer=consumer,
                    producer=FakeProducer(), exit_now=exit_now)
    worker.install_signal_handlers()
    sent = signal_when(consumer.subscribed.is_set, signal.SIGINT)
    code = worker.run()
    waited = time.monotonic() - sent[0]
    assert code == EXIT_OK and consumer.closed
    assert waited > FINISH_JOIN_MAX_S - 0.5, "the join is given its chance to complete (leaving mid-join costs the group)"
    assert waited < 7.0, "... for a few seconds, not the 45 s session timeout"


def test_a_second_signal_during_the_join_exits_at_once(mode):
    consumer = NeverJoins()
    worker = Worker(settings(mode), ExtractiveEngine(), consumer=consumer, producer=FakeProducer(), exit_now=exit_now)
    worker.install_signal_handlers()
    sent = signal_when(consumer.subscribed.is_set, signal.SIGTERM, signal.SIGINT, gap_s=0.5)
    with pytest.raises(Exited) as exited:
        worker.run()
    assert exited.value.code == EXIT_OK
    assert len(sent) == 2 and time.monotonic() - sent[1] < 0.5


# ---------------------------------------------------------------------------------------------- model load
def slow_load(seconds: float = 10.0) -> Callable[[], str]:
    """A model load: many short blocking calls (as torch's and safetensors' are), `seconds` in all."""

    def load() -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)
        return "engine"

    return load


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_model_load_exits_0_at_once(signum):
    started = time.monotonic()
    sent = signal_when(lambda: time.monotonic() - started > 0.3, signum)
    with pytest.raises(Exited) as exited:
        load_or_stop(slow_load(), "loading the engine", exit_now=exit_now)
    assert exited.value.code == EXIT_OK and time.monotonic() - sent[0] < 0.5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the previous handlers are back"


def test_a_load_that_is_not_interrupted_returns_its_engine_and_restores_the_handlers():
    assert load_or_stop(slow_load(0.1), "loading the engine", exit_now=exit_now) == "engine"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------------------- the engines' short warm-up
def test_vllm_generate_short_caps_max_tokens_for_that_call_only(fake_vllm, tiny_model_dir):
    from processor.engines.vllm_engine import VllmEngine
    from processor.events import validate_event
    from processor.ops.samples import sample_events
    from processor.prompt import PromptBuilder

    engine = VllmEngine.from_settings(load_settings(engine="vllm", vllm_model=str(tiny_model_dir), sampling_max_tokens=1536))
    prompt = PromptBuilder(engine.tokenizer, 6144, 1536).build(validate_event(sample_events()[0]))
    engine.generate_short([prompt, prompt], WARM_UP_MAX_TOKENS)
    _sent, params = engine.llm.calls[-1]
    assert [p.max_tokens for p in params] == [WARM_UP_MAX_TOKENS] * 2
    assert engine.sampling_override is None
    engine.generate([prompt])
    assert engine.llm.calls[-1][1].max_tokens == 1536, "later calls sample at SAMPLING_MAX_TOKENS again"


def test_transformers_generate_short_stops_after_a_few_tokens(tiny_model_dir):
    from processor.engines import create_engine
    from processor.events import validate_event
    from processor.ops.samples import sample_events
    from processor.prompt import PromptBuilder

    engine = create_engine(load_settings(engine="transformers", transformers_model=str(tiny_model_dir), sampling_max_tokens=64,
                                         vllm_max_model_len=2048, sampling_temperature=0.0))
    prompt = PromptBuilder(engine.tokenizer, 2048, 64).build(validate_event(sample_events()[0]))
    out = engine.generate_short([prompt], WARM_UP_MAX_TOKENS)[0]
    assert out.completion_tokens <= WARM_UP_MAX_TOKENS and (out.completion_tokens == WARM_UP_MAX_TOKENS or out.finish_reason == "stop")
