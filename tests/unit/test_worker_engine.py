"""The Worker and a misbehaving engine, in both generation modes, with injected fake Kafka clients: the probe decides
engine-or-records in one place, retries never run on the polling thread, a lone failure gets a second try, and a
hung engine ends the worker (exit 5) with /healthz and /readyz saying so."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from processor.codec import EVENT_SCHEMA, AvroCodec
from processor.engines.base import Generation
from processor.engines.extractive import ExtractiveEngine
from processor.errors import EXIT_ENGINE_FAILED
from processor.loop import Worker
from processor.settings import load_settings
from tests.fakes.kafka import FakeGroupConsumer, FakeProducer
from tests.helpers import make_event

CODEC = AvroCodec()


@pytest.fixture(params=["micro_batch", "continuous"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def settings(mode: str, **overrides: Any):
    values = {"generation_mode": mode, "kafka_input_topic": "in", "kafka_output_topic": "out", "kafka_dlq_topic": "dlq",
              "batch_max_wait_ms": 0, "batch_max_records": 2, "shutdown_timeout_s": 5, "infrastructure_retry_timeout_s": 1.0}
    values.update(overrides)
    return load_settings(**values)


def feed(consumer: FakeGroupConsumer, count: int) -> None:
    for n in range(count):
        consumer.add(0, f"k{n}".encode(), CODEC.encode(make_event(n), EVENT_SCHEMA))


def summaries(producer: FakeProducer) -> list[str]:
    return [CODEC.decode(p.value, "ai_worker.SearchSummary")["event_id"] for p in producer.delivered if p.topic == "out"]


def dead_letters(producer: FakeProducer) -> list:
    return [p for p in producer.produced if p.topic == "dlq"]


def run(worker: Worker, until, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    return worker.run(until=lambda: until() or time.monotonic() > deadline)


class MuteEngine(ExtractiveEngine):
    """After the warm-up every summary is empty, the probe's included — through generate() and step() alike. Nothing
    raises: the engine is broken (a corrupted model, a bad driver) while every call seems to succeed."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def generate(self, prompts):
        self.calls += 1
        if self.calls > 1:
            return [Generation("", "length", p.prompt_tokens, 0) for p in prompts]
        return super().generate(prompts)


def test_an_engine_that_answers_every_request_with_nothing_exits_5_and_dead_letters_nothing(mode):
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, 12)
    worker = Worker(settings(mode), MuteEngine(), consumer=consumer, producer=producer)
    assert run(worker, lambda: False) == EXIT_ENGINE_FAILED
    assert dead_letters(producer) == [], "the probe fails too: the engine's failure, never the records'"
    assert summaries(producer) == [] and worker.records_committed == 0 and consumer.commits == []


class FailsOnceThenSlow(ExtractiveEngine):
    """The first engine call after the warm-up fails as a whole (micro_batch: generate(); continuous: the step() that
    finishes a request); every generate() after that — probe, bisection, retry — blocks until `gate` is set, as a
    GPU's retry takes seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.slow = threading.Event()  # set while a call is blocked on the gate
        self.calls = 0

    def generate(self, prompts):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.calls > 2:
            self.slow.set()
            assert self.gate.wait(10)
            self.slow.clear()
        return super().generate(prompts)


def test_the_probe_and_the_retry_never_stop_the_polling_thread(mode):
    consumer, producer, engine = FakeGroupConsumer("in"), FakeProducer(), FailsOnceThenSlow()
    feed(consumer, 4)
    worker = Worker(settings(mode, infrastructure_retry_timeout_s=30), engine, consumer=consumer, producer=producer)
    polls_while_slow: list[float] = []

    def poll(_consumer: FakeGroupConsumer) -> None:
        if engine.slow.is_set():
            polls_while_slow.append(time.monotonic())
            if len(polls_while_slow) >= 10:
                engine.gate.set()  # ten polls while the engine was busy retrying: the loop did not wait for it

    consumer.before_consume = poll
    try:
        assert run(worker, lambda: worker.records_committed >= 4) == 0
    finally:
        engine.gate.set()
    assert len(polls_while_slow) >= 10, "the consumer kept polling while the probe/retry ran on the engine's thread"
    gaps = [b - a for a, b in zip(polls_while_slow, polls_while_slow[1:])]
    assert max(gaps) < 0.5, f"the polling thread stopped for {max(gaps):.2f} s"
    assert sorted(summaries(producer)) == [f"evt-00000{i}" for i in range(4)], "each record summarised exactly once"
    assert dead_letters(producer) == []


class FailsFirstCallsOf(ExtractiveEngine):
    """Every engine call holding event `target` raises, `failures` times (a transient error), then it works."""

    def __init__(self, target: str, failures: int) -> None:
        super().__init__()
        self.target, self.failures = target, failures

    def generate(self, prompts):
        if self.failures > 0 and any(p.event.event_id == self.target for p in prompts):
            self.failures -= 1
            raise RuntimeError("CUDA error: unspecified launch failure")
        return super().generate(prompts)


def test_a_good_event_whose_call_failed_on_its_own_gets_a_second_try_not_a_dead_letter(mode):
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, 1)
    # micro_batch: its batch of one raises; continuous: its step() raises, then its retry through generate() —
    # either way its last failed call was on its own, and the next call on its own succeeds.
    engine = FailsFirstCallsOf("evt-000000", failures=1 if mode == "micro_batch" else 2)
    worker = Worker(settings(mode, infrastructure_retry_timeout_s=30), engine, consumer=consumer, producer=producer)
    assert run(worker, lambda: worker.records_committed >= 1) == 0
    assert summaries(producer) == ["evt-000000"] and dead_letters(producer) == []


class HangingEngine(ExtractiveEngine):
    """After the warm-up, generate() (and so step()) blocks until `gate` is set: a hung GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.calls = 0

    def generate(self, prompts):
        self.calls += 1
        if self.calls > 1:
            self.gate.wait(10)
        return super().generate(prompts)


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_hung_engine_turns_health_and_readiness_red_then_ends_the_worker_with_exit_5(mode):
    consumer, producer, engine = FakeGroupConsumer("in"), FakeProducer(), HangingEngine()
    feed(consumer, 4)
    worker = Worker(settings(mode, engine_call_timeout_s=0.5, infrastructure_retry_timeout_s=60), engine, consumer=consumer, producer=producer)
    port = worker.metrics.serve(0, host="127.0.0.1")
    seen: dict[str, tuple[int, int]] = {}

    def watch() -> bool:
        stalled = worker.pipeline.stalled_for()
        if 0.05 < stalled < 0.3 and "busy" not in seen:
            seen["busy"] = (status(port, "/healthz"), status(port, "/readyz"))
        elif stalled > 0.5 and "hung" not in seen:
            seen["hung"] = (status(port, "/healthz"), status(port, "/readyz"))
        return False

    started = time.monotonic()
    try:
        assert run(worker, watch) == EXIT_ENGINE_FAILED
    finally:
        engine.gate.set()
        worker.metrics.close()
    assert time.monotonic() - started < 5, "the deadline, not the retry timeout, ended it"
    assert seen.get("busy") == (200, 200), "a call within its deadline is a busy engine, not a broken one"
    assert seen.get("hung") == (503, 503), "past the deadline: unhealthy, and not ready while it holds its partitions"
    assert producer.produced == [] and consumer.commits == [], "the work in flight is left for the next owner"
