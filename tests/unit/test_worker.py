"""The Worker end to end with injected fake Kafka clients: the guarantees that a planted bug must break.

Each test names the behaviour it guards; each fails when that behaviour is removed from the loop (ownership filter at
publish, SIGTERM publishing a finished batch, commit only after acknowledgement, the probe, registry holding)."""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections import Counter
import time
from typing import Any

from processor.assignment import RESULT_WAIT_S
from processor.checkpoint import CommitPolicy
from processor.codec import EVENT_SCHEMA, AvroCodec
from processor.engines.extractive import ExtractiveEngine
from processor.errors import EXIT_BROKER_UNAVAILABLE, EXIT_ENGINE_FAILED, EXIT_REGISTRY_UNAVAILABLE, RegistryUnavailableError
from processor.loop import GIL_SWITCH_INTERVAL_S, Worker
from processor.records import parse_dead_letter
from processor.retry import Backoff
from processor.settings import load_settings
from tests.fakes.kafka import FakeGroupConsumer, FakeProducer
from tests.helpers import make_event

import pytest

CODEC = AvroCodec()
MODE = {"mode": "micro_batch"}


@pytest.fixture(autouse=True, params=["micro_batch", "continuous"])
def mode(request: pytest.FixtureRequest) -> str:
    """Every test runs in both generation modes (the continuous feed drives the extractive engine's step())."""
    MODE["mode"] = request.param
    return request.param


def settings(**overrides: Any):
    values = {"generation_mode": MODE["mode"], "kafka_input_topic": "in", "kafka_output_topic": "out", "kafka_dlq_topic": "dlq", "batch_max_wait_ms": 0,
              "batch_max_records": 2, "shutdown_timeout_s": 5, "infrastructure_retry_timeout_s": 1.0}
    values.update(overrides)
    return load_settings(**values)


def feed(consumer: FakeGroupConsumer, count: int, partitions: int = 1) -> None:
    for n in range(count):
        consumer.add(n % partitions, f"k{n}".encode(), CODEC.encode(make_event(n), EVENT_SCHEMA))


def summaries(producer: FakeProducer) -> list[str]:
    return [CODEC.decode(p.value, "ai_worker.SearchSummary")["event_id"] for p in producer.delivered if p.topic == "out"]


def run(worker: Worker, until, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    return worker.run(until=lambda: until() or time.monotonic() > deadline)


class GatedEngine(ExtractiveEngine):
    """generate() blocks on `gate` after the warm-up; `started` is set when a batch is inside generate()."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls = 0

    def generate(self, prompts):
        self.calls += 1
        if self.calls > 1:
            self.started.set()
            assert self.gate.wait(20)
        return super().generate(prompts)


def test_a_partition_revoked_while_its_batch_generates_is_published_by_nobody_here_and_the_rest_exactly_once():
    consumer, producer, engine = FakeGroupConsumer("in", partitions=2), FakeProducer(), GatedEngine()
    feed(consumer, 4, partitions=2)
    worker = Worker(settings(batch_max_records=4), engine, consumer=consumer, producer=producer)
    revoked: list[int] = []

    def revoke_while_generating(c: FakeGroupConsumer) -> None:
        if engine.started.is_set() and not revoked:
            revoked.append(1)
            c.revoke([1])
            engine.gate.set()

    consumer.before_consume = revoke_while_generating
    worker.checkpoint.drop = lambda tps: None  # keep the revoked partition's track: only ownership may stop its publication
    assert run(worker, lambda: worker.records_committed >= 2 and bool(revoked)) == 0
    published = summaries(producer)
    assert sorted(published) == ["evt-000000", "evt-000002"], "partition 0 exactly once; partition 1 belongs to its new owner"
    assert all(("in", 1) not in commit for commit in consumer.commits)


def test_sigterm_publishes_and_commits_a_batch_that_finished_generating():
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, 4)
    worker = Worker(settings(), ExtractiveEngine(), consumer=consumer, producer=producer)
    producer.hold = True  # batch 1 published, not acknowledged: batch 2 finishes and waits behind it

    def stop_when_both_generated() -> bool:
        if worker.checkpoint.uncommitted == 4 and worker.pipeline.idle():
            producer.hold = False
            worker.request_stop()
            return True  # no further step: the shutdown alone must publish and commit batch 2
        return False

    assert run(worker, stop_when_both_generated) == 0
    assert sorted(summaries(producer)) == [f"evt-00000{i}" for i in range(4)]
    assert consumer.commits[-1] == {("in", 0): 4} and worker.records_committed == 4


def test_offsets_are_committed_only_after_their_outputs_are_acknowledged():
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, 10)
    worker = Worker(settings(), ExtractiveEngine(), consumer=consumer, producer=producer)
    violations: list[str] = []

    def check_at_commit(offsets: dict) -> None:
        # Every record below a committed offset has its output acknowledged already (keys repeat: count them).
        acked = Counter(event[2] for event in producer.events if event[0] == "ack")
        for (_topic, partition), end in offsets.items():
            below = Counter(m.key() for m in consumer.messages(partition) if m.offset() < end)
            if any(acked[key] < n for key, n in below.items()):
                violations.append(f"committed {partition}@{end} before its outputs were acknowledged")

    consumer.before_commit = check_at_commit
    producer.hold = True
    deadline = time.monotonic() + 1.0
    code = worker.run(until=lambda: time.monotonic() > deadline)
    assert consumer.commits == [] and producer.produced, "outputs in flight, not acknowledged: nothing committed"
    assert code == 0
    producer.hold = False
    consumer2 = consumer  # the same group continues
    worker2 = Worker(settings(), ExtractiveEngine(), consumer=consumer2, producer=producer)
    feed(consumer2, 2)
    assert run(worker2, lambda: worker2.records_committed >= 12) == 0
    assert violations == [] and consumer.commits[-1] == {("in", 0): 12}


class DyingEngine(ExtractiveEngine):
    """Healthy for `healthy_prompts` prompts, then every call raises (a GPU lost to an illegal memory access)."""

    def __init__(self, healthy_prompts: int) -> None:
        super().__init__()
        self.healthy_prompts, self.prompts_seen = healthy_prompts, 0

    def generate(self, prompts):
        self.prompts_seen += len(prompts)
        if self.prompts_seen > self.healthy_prompts:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().generate(prompts)


def test_a_gpu_that_dies_mid_run_drains_nothing_into_the_dlq_and_exits_5():
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, 10)
    worker = Worker(settings(), DyingEngine(healthy_prompts=3), consumer=consumer, producer=producer)  # warm-up + 2 events
    assert run(worker, lambda: False) == EXIT_ENGINE_FAILED
    assert [p for p in producer.produced if p.topic == "dlq"] == []
    published = summaries(producer)
    assert len(published) <= 2 and worker.records_committed == len(published), "nothing committed past the failure"


class FlakyRegistryCodec(AvroCodec):
    def __init__(self, down_for_decodes: int) -> None:
        super().__init__()
        self.down_for = down_for_decodes

    def decode(self, payload, schema_name, topic=""):
        if self.down_for > 0:
            self.down_for -= 1
            raise RegistryUnavailableError("Schema Registry unreachable: ConnectError: [Errno 111] Connection refused")
        return super().decode(payload, schema_name, topic)


def test_an_unreachable_registry_holds_the_records_and_never_dead_letters_them():
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, 4)
    worker = Worker(settings(infrastructure_retry_timeout_s=30), ExtractiveEngine(), consumer=consumer, producer=producer,
                    codec=FlakyRegistryCodec(down_for_decodes=3), registry_retry=Backoff(give_up_after_s=30, first_s=0.05))
    assert run(worker, lambda: worker.records_committed >= 4) == 0
    assert sorted(summaries(producer)) == [f"evt-00000{i}" for i in range(4)]
    assert [p for p in producer.produced if p.topic == "dlq"] == []


def test_a_registry_that_stays_down_ends_the_worker_with_exit_6():
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, 4)
    worker = Worker(settings(), ExtractiveEngine(), consumer=consumer, producer=producer, codec=FlakyRegistryCodec(down_for_decodes=10**6))
    assert run(worker, lambda: False) == EXIT_REGISTRY_UNAVAILABLE
    assert producer.produced == [] and consumer.commits == []


def quick_retries(values) -> CommitPolicy:
    """The settings' commit policy, with failed commits retried after 50 ms instead of 500."""
    return dataclasses.replace(CommitPolicy.from_settings(values), retry_first_s=0.05)


def test_failing_commits_hold_the_pipeline_then_recover_without_extra_duplicates():
    from confluent_kafka import KafkaError

    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, 8)
    worker = Worker(settings(broker_unavailable_timeout_s=30), ExtractiveEngine(), consumer=consumer, producer=producer,
                    commit_policy=quick_retries(settings(broker_unavailable_timeout_s=30)))
    for _ in range(3):
        consumer.commit_failures.append(KafkaError(KafkaError.REQUEST_TIMED_OUT, "commit timed out", retriable=True))
    uncommitted_seen: list[int] = []
    consumer.on_commit = lambda: uncommitted_seen.append(len(producer.produced) - worker.records_committed)
    assert run(worker, lambda: worker.records_committed >= 8) == 0
    if MODE["mode"] == "micro_batch":
        assert max(uncommitted_seen) <= 2, "at most one batch (2 records) published and not committed, even while commits fail"
    assert sorted(summaries(producer)) == [f"evt-00000{i}" for i in range(8)]


def test_commits_that_keep_failing_end_the_worker_with_exit_3():
    from confluent_kafka import KafkaError

    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, 4)
    worker = Worker(settings(broker_unavailable_timeout_s=1), ExtractiveEngine(), consumer=consumer, producer=producer,
                    commit_policy=quick_retries(settings(broker_unavailable_timeout_s=1)))
    consumer.commit_failures.extend(KafkaError(KafkaError.REQUEST_TIMED_OUT, "commit timed out", retriable=True) for _ in range(1000))
    assert run(worker, lambda: False) == EXIT_BROKER_UNAVAILABLE
    assert worker.records_committed == 0
    if MODE["mode"] == "micro_batch":
        assert len(producer.produced) <= 2, "one batch out, then the pipeline holds"


def test_a_record_with_hostile_dlq_headers_is_dead_lettered_once_with_the_real_reason():
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    consumer.add(0, b"k", b"not avro", headers=[("dlq.error_class", None), ("dlq.error_message", b"\xff\xfe"), ("dlq.reason", b"fine")])
    feed(consumer, 1)
    worker = Worker(settings(), ExtractiveEngine(), consumer=consumer, producer=producer)
    assert run(worker, lambda: worker.records_committed >= 2) == 0
    [dead] = [p for p in producer.delivered if p.topic == "dlq"]
    assert parse_dead_letter(dead.key, dead.value, dead.headers)["error_class"] == "BadMagicError"
    assert worker.metrics.dead_letters.labels("BadMagicError")._value.get() == 1  # noqa: SLF001 - prometheus child value


def test_a_gpu_engine_warms_up_at_the_batch_shape_and_a_model_free_one_with_one_prompt():
    from processor.engines.base import InFlightBudget

    class BudgetEngine(ExtractiveEngine):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        def generate(self, prompts):
            self.sizes.append(len(prompts))
            return super().generate(prompts)

        def in_flight_budget(self):
            return InFlightBudget(max_sequences=8, kv_tokens=10**6)

    gpu_like, model_free = BudgetEngine(), ExtractiveEngine()
    Worker(settings(batch_max_records=4), gpu_like, consumer=FakeGroupConsumer("in"), producer=FakeProducer()).warm_up()
    assert gpu_like.sizes[0] == 4, "the first batch shape is paid for at start-up, not by the first real batch"
    calls: list[int] = []
    model_free.generate = lambda prompts: (calls.append(len(prompts)), ExtractiveEngine.generate(model_free, prompts))[1]  # type: ignore[method-assign]
    Worker(settings(batch_max_records=4), model_free, consumer=FakeGroupConsumer("in"), producer=FakeProducer()).warm_up()
    assert calls[0] == 1


def test_the_engine_thread_gets_the_gil_quickly_while_the_worker_runs_and_the_default_comes_back():
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, 2)
    worker = Worker(settings(), ExtractiveEngine(), consumer=consumer, producer=producer)
    before, seen = sys.getswitchinterval(), []

    def done() -> bool:
        seen.append(sys.getswitchinterval())
        return worker.records_committed == 2

    assert run(worker, done) == 0
    assert max(seen) <= GIL_SWITCH_INTERVAL_S < before
    assert sys.getswitchinterval() == before


class OneSlowRequestEngine(ExtractiveEngine):
    """Streaming: the first event's request does not finish until `release` is set; every other one finishes at once."""

    SLOW = "evt-000000"

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def add_request(self, request_id, prompt):
        super().add_request(request_id, prompt)
        self._in_flight[request_id][0] = 10**9 if prompt.event.event_id == self.SLOW else 1

    def step(self):
        time.sleep(0.001)  # a GPU step takes time; without it this thread would spin on the GIL
        if self.release.is_set():
            for entry in self._in_flight.values():
                entry[0] = min(entry[0], 1)
        return super().step()


def test_continuous_reads_no_more_than_the_uncommitted_bound_behind_a_slow_request_then_commits_everything(mode):
    if mode != "continuous":
        pytest.skip("micro_batch: one batch at a time is its bound (test_checkpoint)")
    consumer, producer, engine = FakeGroupConsumer("in"), FakeProducer(), OneSlowRequestEngine()
    feed(consumer, 30)
    worker = Worker(settings(batch_max_records=2, continuous_max_uncommitted=6), engine, consumer=consumer, producer=producer)
    assert worker.max_uncommitted == 6
    uncommitted: list[int] = []
    bound_reached_at: list[float] = []

    def watch() -> bool:
        uncommitted.append(worker.checkpoint.uncommitted)
        if uncommitted[-1] >= 6 and not bound_reached_at:
            bound_reached_at.append(time.monotonic())
        if bound_reached_at and time.monotonic() - bound_reached_at[0] > 0.5:
            engine.release.set()  # after half a second at the bound: nothing more was read meanwhile (asserted below)
        return worker.records_committed == 30

    assert run(worker, watch) == 0
    assert max(uncommitted) == 6, "the slow request's partition holds its commit: reading stops at the bound, not before"
    held = [n for n in uncommitted[uncommitted.index(6):] if n == 6]
    assert len(held) > 10, "the loop kept stepping at the bound without reading more"
    assert sorted(summaries(producer)) == [f"evt-{n:06d}" for n in range(30)]
    assert consumer.commits[-1] == {("in", 0): 30}


def test_reads_up_to_eight_windows_uncommitted_by_default_in_both_modes(mode):
    from processor.checkpoint import UNCOMMITTED_WINDOWS

    worker = Worker(settings(batch_max_records=4), ExtractiveEngine(), consumer=FakeGroupConsumer("in"), producer=FakeProducer())
    # One bound for both modes: windows of the engine's unit of work (a micro-batch, or the requests it holds).
    assert UNCOMMITTED_WINDOWS == 8 and worker.max_uncommitted == 8 * 4
    worker.pipeline.close()


def test_the_uncommitted_bound_is_named_at_start_up_where_it_limits_the_engine_or_does_not_apply(mode, caplog):
    with caplog.at_level("WARNING", logger="processor.pipeline"):
        worker = Worker(settings(batch_max_records=8, continuous_max_uncommitted=3), ExtractiveEngine(),
                        consumer=FakeGroupConsumer("in"), producer=FakeProducer())
        worker.pipeline.close()
    messages = [r.getMessage() for r in caplog.records]
    if mode == "continuous":
        assert any("CONTINUOUS_MAX_UNCOMMITTED=3 is below the 8 requests the engine can hold" in m for m in messages)
    else:
        assert any("ignored in micro_batch mode (GENERATION_MODE=continuous settings): CONTINUOUS_MAX_UNCOMMITTED" in m for m in messages)


def test_continuous_at_the_uncommitted_bound_commits_without_waiting_out_the_commit_interval(mode):
    if mode != "continuous":
        pytest.skip("a slow request among others is continuous mode's")
    consumer, producer, engine = FakeGroupConsumer("in", partitions=2), FakeProducer(), OneSlowRequestEngine()
    engine.SLOW = "evt-000099"
    consumer.add(1, b"k99", CODEC.encode(make_event(99), EVENT_SCHEMA))
    for n in range(12):
        consumer.add(0, f"k{n}".encode(), CODEC.encode(make_event(n), EVENT_SCHEMA))
    # An interval no run outlives: after the first commit only the bound (or an idle engine) may commit before the
    # shutdown, and a slow request on partition 1 keeps the engine busy throughout.
    values = settings(batch_max_records=2, continuous_max_uncommitted=4)
    policy = dataclasses.replace(CommitPolicy.from_settings(values), interval_s=3600.0)
    worker = Worker(values, engine, consumer=consumer, producer=producer, commit_policy=policy)

    commits_while_slow: list[dict] = []

    def release_once_partition_0_committed_9() -> bool:
        if not engine.release.is_set() and worker.committed.get(("in", 0), 0) >= 9:
            commits_while_slow.extend(consumer.commits)
            engine.release.set()
        return worker.records_committed == 13

    assert run(worker, release_once_partition_0_committed_9, timeout_s=10.0) == 0
    assert worker.records_committed == 13
    assert len(commits_while_slow) >= 3 and all(("in", 1) not in c for c in commits_while_slow), \
        "each time reading stopped at the bound a commit made room, while the slow request was still generating"


# ------------------------------------------------------------------------ rebalance callbacks inside consume()
def committed_offsets_in_order(consumer: FakeGroupConsumer) -> list[dict]:
    return consumer.commits + consumer.transactional_commits


def visible_summaries(producer: FakeProducer) -> list[str]:
    return [CODEC.decode(p.value, "ai_worker.SearchSummary")["event_id"] for p in producer.visible() if p.topic == "out"]


GUARANTEES = {"at_least_once": {}, "exactly_once": {"processing_guarantee": "exactly_once", "transactional_id_suffix": "w0"}}


@pytest.mark.parametrize("guarantee", sorted(GUARANTEES))
@pytest.mark.parametrize("rebalance", ["cooperative_revoke", "eager_reassign", "lost_reassign"])
def test_a_rebalance_served_inside_consume_loses_nothing_and_processes_nothing_twice(rebalance, guarantee):
    """librdkafka runs on_revoke/on_lost/on_assign inside consume(), and that call still returns what it fetched:
    messages of the partitions kept must reach the inbox the loop reads (not one a callback replaced), and messages
    of a partition revoked and re-assigned in the call were fetched under the old assignment: the new one starts
    again at the committed offset, so they must not be processed as well (they would be, twice, and the partition's
    track would run out of offset order)."""
    consumer, producer = FakeGroupConsumer("in", partitions=2), FakeProducer()
    feed(consumer, 20, partitions=2)
    cooperative = rebalance == "cooperative_revoke"
    overrides = {"partition.assignment.strategy": "cooperative-sticky"} if cooperative else {}
    worker = Worker(settings(**GUARANTEES[guarantee]), ExtractiveEngine(), consumer=consumer, producer=producer,
                    consumer_overrides=overrides)
    fetches: list[int] = []

    def rebalance_inside(c: FakeGroupConsumer, fetched: list) -> None:
        if fetched:
            fetches.append(len(fetched))
        if len(fetches) != 2 or not any(m.partition() == 0 for m in fetched):
            return
        fetches.append(-1)  # once
        if cooperative:
            c.revoke([1])  # partition 0's messages in this call stay this worker's
            c.group_assign([1])  # and partition 1 comes back (incrementally) at its committed offset
        elif rebalance == "eager_reassign":
            c.revoke([0, 1])
            c.group_assign([0, 1])
        else:
            c.lose([0, 1])
            c.group_assign([0, 1])

    consumer.during_consume = rebalance_inside
    outputs = visible_summaries if guarantee == "exactly_once" else summaries
    assert run(worker, lambda: worker.records_committed >= 20 and len(outputs(producer)) >= 20, timeout_s=10) == 0
    assert -1 in fetches, "the rebalance ran inside a consume() that returned messages"
    assert sorted(outputs(producer)) == [f"evt-{n:06d}" for n in range(20)], "every event once: none lost, none twice"
    for partition in (0, 1):
        offsets = [c[("in", partition)] for c in committed_offsets_in_order(consumer) if ("in", partition) in c]
        assert offsets == sorted(offsets) and offsets[-1] == 10, f"partition {partition} commits forward, to its end"


@pytest.mark.parametrize("guarantee", sorted(GUARANTEES))
def test_sigterm_while_a_batch_is_inside_generate_lets_it_finish_then_publishes_and_commits_it(guarantee):
    consumer, producer, engine = FakeGroupConsumer("in"), FakeProducer(), GatedEngine()
    feed(consumer, 2)
    worker = Worker(settings(**GUARANTEES[guarantee]), engine, consumer=consumer, producer=producer)

    def sigterm_while_generating() -> None:
        assert engine.started.wait(10)
        worker.request_stop()  # what the SIGTERM handler does, from another thread, mid-generate()
        time.sleep(0.3)
        engine.gate.set()

    signal = threading.Thread(target=sigterm_while_generating, daemon=True)
    signal.start()
    assert run(worker, lambda: False, timeout_s=15) == 0
    signal.join(5)
    outputs = visible_summaries if guarantee == "exactly_once" else summaries
    assert sorted(outputs(producer)) == ["evt-000000", "evt-000001"], "the batch in generate() finished and was published"
    assert worker.records_committed == 2 and consumer.committed_offsets == {0: 2}, "... and committed before run() returned"


def test_a_commit_releases_one_micro_batch_even_when_two_finished_behind_it(mode):
    """README Reliability: a crash duplicates at most one micro-batch. While the released batch waits for its
    acknowledgement, the engine finishes the next two; the commit must then release one batch, not both."""
    if mode != "micro_batch":
        pytest.skip("continuous mode commits a bound of records, not one release at a time")
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    feed(consumer, 6)
    worker = Worker(settings(), ExtractiveEngine(), consumer=consumer, producer=producer)
    produced_at_commit: list[int] = []
    consumer.before_commit = lambda _offsets: produced_at_commit.append(len(producer.produced))
    producer.hold = True
    held_until = time.monotonic() + 0.5  # long enough for the engine to finish every batch behind the first

    def until() -> bool:
        if time.monotonic() > held_until:
            producer.hold = False
        return worker.records_committed >= 6

    assert run(worker, until) == 0
    released = [b - a for a, b in zip([0] + produced_at_commit, produced_at_commit)]
    assert released and max(released) <= 2, f"records released per commit: {released}"


class SlowAckProducer(FakeProducer):
    """As librdkafka: poll(timeout) waits out its timeout when no delivery report comes (here: while `hold`)."""

    def poll(self, timeout: float = 0) -> int:
        if self.hold and timeout and timeout > 0:
            time.sleep(timeout)
        return super().poll(timeout)


class CountingConsumer(FakeGroupConsumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def consume(self, num_messages: int = 1, timeout: float = -1):
        self.calls += 1
        return super().consume(num_messages, timeout)


def test_while_outputs_await_their_acknowledgement_the_loop_waits_for_it_instead_of_spinning():
    # A loop that polls back to back while outputs are in flight holds the interpreter the engine's thread needs.
    consumer, producer = CountingConsumer("in", partitions=1), SlowAckProducer()
    feed(consumer, 2)
    producer.hold = True  # the broker is slow to acknowledge
    worker = Worker(settings(batch_max_records=2), ExtractiveEngine(), consumer=consumer, producer=producer)
    window: dict[str, float] = {}

    def until() -> bool:
        if "start" not in window and any(e[0] == "produce" and e[1] == "out" for e in producer.events):
            window["start"], window["calls"] = time.monotonic(), consumer.calls
        if "start" in window and time.monotonic() - window["start"] >= 0.3:
            window["turns"] = consumer.calls - window["calls"]
            producer.hold = False
            return True
        return False

    assert run(worker, until) == 0
    # Waiting up to 5 ms for an acknowledgement each turn: at most ~60 turns in 0.3 s (spinning made thousands).
    assert "turns" in window and window["turns"] <= 120, window
    assert sorted(summaries(producer)) == ["evt-000000", "evt-000001"]


class LibrdkafkaConsumer(FakeGroupConsumer):
    """As librdkafka's consume(): it returns before its timeout only with as many records as asked for. Remembers
    the timeouts of the waits made while `engine` was generating."""

    def __init__(self, *args: Any, engine: GatedEngine, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine = engine
        self.waits_while_generating: list[float] = []

    def consume(self, num_messages: int = 1, timeout: float = -1):
        got = super().consume(num_messages, timeout)
        if len(got) < num_messages and timeout > 0:
            if self.engine.started.is_set() and not self.engine.gate.is_set():
                self.waits_while_generating.append(timeout)
            time.sleep(min(timeout, 0.2))
        return got


def test_while_the_engine_generates_a_wait_for_records_is_short_so_what_it_finishes_goes_out_soon():
    # librdkafka's consume() cannot be woken from another thread: a long wait for records that do not come (the
    # topic's end, a slow stream) held back what the engine finished meanwhile, by up to POLL_INTERVAL_S.
    engine = GatedEngine()
    consumer, producer = LibrdkafkaConsumer("in", engine=engine), FakeProducer()
    feed(consumer, 2)
    worker = Worker(settings(batch_max_records=4), engine, consumer=consumer, producer=producer)

    def finish_later() -> None:
        if engine.started.wait(10):
            time.sleep(0.3)
        engine.gate.set()

    opener = threading.Thread(target=finish_later, daemon=True)
    opener.start()
    assert run(worker, lambda: worker.records_committed >= 2) == 0
    opener.join(5)
    assert consumer.waits_while_generating, "the loop waited for records while the engine generated"
    assert max(consumer.waits_while_generating) <= RESULT_WAIT_S, consumer.waits_while_generating
    assert sorted(summaries(producer)) == ["evt-000000", "evt-000001"]
