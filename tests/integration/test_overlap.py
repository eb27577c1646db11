"""The overlap: while the engine generates batch N, batch N+1 is consumed and prepared and batch N−1 published and
committed; at most one batch waits; commits stay in order; partitions are paused while the queue stays full.
Micro-batch mode's own behaviour (continuous mode has no batches; tests/unit/test_continuous.py covers its feed)."""

from __future__ import annotations

import threading
import time

import pytest

from processor.engines.extractive import ExtractiveEngine
from processor.loop import PAUSE_AFTER_S, Worker
from tests.helpers import FAST_GROUP, committed_offsets, real_consumer, create_topics, end_offsets, make_event, produce, run_until, settings_for

pytestmark = pytest.mark.broker


class ObservedEngine(ExtractiveEngine):
    """Takes `seconds` per generate() and, near the end of each call, looks at what the loop did meanwhile."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.worker: Worker | None = None
        self.observations: list[dict] = []
        self.lock = threading.Lock()

    def generate(self, prompts):
        worker = self.worker
        assert worker is not None
        if prompts[0].event.event_id.startswith("demo-"):  # the start-up warm-up call, before any partition
            return super().generate(prompts)
        committed_at_start = worker.records_committed
        time.sleep(self.seconds * 0.9)
        scheduler = worker.pipeline.scheduler
        ready = list(scheduler.ready_batches)
        self.observations.append(
            {
                "batch_events": len(prompts),
                "committed_during_generate": worker.records_committed - committed_at_start,
                "ready_batches": len(ready),
                "ready_prompts_built": sum(len(b.prompts) for b in ready),
                "open_records": scheduler.batcher.pending,
                "paused": worker.paused,
                "full_for_s": worker.full_for(),
                "paused_partitions": [tp.partition for tp in worker.consumer.assignment()] if worker.paused else [],
            }
        )
        time.sleep(self.seconds * 0.1)
        return super().generate(prompts)


class CommitLog:
    def __init__(self, consumer):
        self._consumer, self.commits, self.pauses = consumer, [], []

    def commit(self, *args, **kwargs):
        self.commits.append({tp.partition: tp.offset for tp in kwargs["offsets"]})
        return self._consumer.commit(*args, **kwargs)

    def pause(self, partitions):
        self.pauses.append(len(partitions))
        return self._consumer.pause(partitions)

    def __getattr__(self, name):
        return getattr(self._consumer, name)


def test_next_batch_is_prepared_and_previous_committed_while_the_engine_generates(broker, topics):
    create_topics(broker, topics, partitions=2)
    placements = produce(broker, topics["input"], [make_event(i) for i in range(60)])
    engine = ObservedEngine(1.5)
    settings = settings_for(broker, topics, batch_max_records=10, batch_max_wait_ms=50, generation_mode="micro_batch")
    log = CommitLog(real_consumer(settings))
    worker = Worker(settings, engine, consumer=log)
    engine.worker = worker
    assert run_until(worker, lambda: worker.records_committed >= 60, timeout_s=120) == 0
    steady = engine.observations[1:-1]  # the first has no predecessor, the last no successor
    assert steady, engine.observations
    for seen in steady:
        assert seen["ready_batches"] == 1 and seen["ready_prompts_built"] == 10, "batch N+1 decoded, validated, prompted"
        assert seen["committed_during_generate"] == 10, "batch N−1 published and committed meanwhile"
        assert seen["open_records"] <= 10, "memory bounded: one batch waiting, one forming at most"
        # Paused whenever the queue has stayed full past the grace period (brief fullness does not pause).
        if seen["full_for_s"] is not None and seen["full_for_s"] > PAUSE_AFTER_S + 0.1:
            assert seen["paused"] and seen["paused_partitions"] == [0, 1], seen
    assert any(seen["paused"] for seen in steady), "a 1.5 s generate() pauses the partitions"
    # Commits in order: per partition, offsets only grow.
    last: dict[int, int] = {}
    for commit in log.commits:
        for partition, offset in commit.items():
            assert offset > last.get(partition, -1)
            last[partition] = offset
    assert committed_offsets(broker, topics["group"], topics["input"], 2) == end_offsets(placements)


def test_brief_backpressure_does_not_pause(broker, topics):
    """A fast engine: the queue is full only for moments, so partitions are never paused (no refetch churn)."""
    create_topics(broker, topics, partitions=2)
    produce(broker, topics["input"], [make_event(i) for i in range(400)])
    settings = settings_for(broker, topics, batch_max_records=20, batch_max_wait_ms=20, generation_mode="micro_batch")
    log = CommitLog(real_consumer(settings))
    worker = Worker(settings, ExtractiveEngine(), consumer=log)
    assert run_until(worker, lambda: worker.records_committed >= 400) == 0
    assert len(log.pauses) <= 1, log.pauses  # (only the final shutdown pauses)
