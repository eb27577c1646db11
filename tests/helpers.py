"""Helpers for tests that run the real loop against a broker."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from confluent_kafka import Consumer, TopicPartition

from processor.ops.broker import ensure_topics
from processor.engines.base import Engine
from processor.loop import Worker
from processor.settings import Settings, load_settings
from processor.ops.tools import produce_events, read_topic

# Tansu joins a consumer group in ~3 s with these (instead of ~23 s); test configuration, not product defaults.
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def real_consumer(settings: Settings, **overrides: Any) -> Any:
    """The Kafka consumer the Worker would build, for tests that wrap it before injecting it."""
    from processor.clients import consumer_config, make_consumer

    return make_consumer(consumer_config(settings, overrides={**FAST_GROUP, **overrides}))


def real_producer(settings: Settings, **overrides: Any) -> Any:
    from processor.clients import make_producer, producer_config

    return make_producer(producer_config(settings, overrides=overrides))


def make_event(n: int, language: str = "en", results: int = 3, **extra: Any) -> dict[str, Any]:
    korean = language == "ko"
    return {
        "event_id": f"evt-{n:06d}",
        "query": f"배터리 수명 질문 {n}" if korean else f"kafka consumer lag question {n}",
        "results": [
            {
                "rank": r,
                "title": f"Result {r} for {n}",
                "url": f"https://example.com/{n}/{r}",
                "snippet": (f"배터리 수명은 충전 습관에 따라 크게 달라집니다 {n}." if korean else f"Consumer lag grows when processing is slower than production, case {n}."),
                "content": (f"배터리 수명에 대한 자세한 설명입니다 {r}. " * 3 if korean else f"Detailed explanation of consumer lag number {r}. " * 3),
            }
            for r in range(1, results + 1)
        ],
        "collected_at": datetime(2026, 11, 1, tzinfo=timezone.utc),
        "language": language,
        **extra,
    }


def settings_for(broker: Any, topics: dict[str, str], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": broker.bootstrap,
        "kafka_input_topic": topics["input"],
        "kafka_output_topic": topics["output"],
        "kafka_dlq_topic": topics["dlq"],
        "kafka_group_id": topics["group"],
        "batch_max_wait_ms": 100,
    }
    values.update(overrides)
    return load_settings(**values)


def create_topics(broker: Any, topics: dict[str, str], partitions: int = 3) -> None:
    ensure_topics(broker.bootstrap, {topics["input"]: partitions, topics["output"]: partitions, topics["dlq"]: 1})


def produce(broker: Any, topic: str, events: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    return produce_events({"bootstrap.servers": broker.bootstrap}, topic, events)


def end_offsets(placements: Sequence[tuple[int, int]]) -> dict[int, int]:
    """True end offsets from delivery reports (Tansu's watermarks lag after multi-record batches)."""
    ends: dict[int, int] = {}
    for partition, offset in placements:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return ends


def read_all(broker: Any, topic: str, expect: int | None = None, dead_letters: bool = False, idle: float = 2.0) -> list[dict[str, Any]]:
    return list(read_topic({"bootstrap.servers": broker.bootstrap}, topic, dead_letters=dead_letters, max_records=None, idle_timeout_s=idle))


def committed_offsets(broker: Any, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        consumer.close()


def run_until(worker: Worker, condition: Callable[[], bool], timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    return worker.run(until=lambda: condition() or time.monotonic() > deadline)


class WorkerThread:
    """A Worker running on a thread, stopped (and joined) by the test."""

    def __init__(self, settings: Settings, engine: Engine, **kwargs: Any) -> None:
        self.worker = Worker(settings, engine, consumer_overrides={**FAST_GROUP, **kwargs.pop("consumer_overrides", {})}, **kwargs)
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.exit_code = self.worker.run()

    def __enter__(self) -> "WorkerThread":
        self.thread.start()
        return self

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            if not self.thread.is_alive():
                return False
            time.sleep(0.05)
        return False

    def __exit__(self, *_: Any) -> None:
        self.worker.request_stop()
        self.thread.join(60)


class RebalanceLog:
    """Wraps a consumer: records every assign/revoke/lost callback the Worker receives (injected, nothing patched)."""

    def __init__(self, consumer: Any, on_revoke: Callable[[int], Any] | None = None) -> None:
        self._consumer = consumer
        self.assigned: list[int] = []
        self.revoked: list[tuple[int, Any]] = []
        self.lost: list[int] = []
        self._on_revoke = on_revoke

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None) -> None:
        def assign(consumer: Any, partitions: list[Any]) -> None:
            self.assigned.append(len(partitions))
            on_assign(consumer, partitions)

        def revoke(consumer: Any, partitions: list[Any]) -> None:
            self.revoked.append((len(partitions), self._on_revoke(len(partitions)) if self._on_revoke else None))
            on_revoke(consumer, partitions)

        def lost(consumer: Any, partitions: list[Any]) -> None:
            self.lost.append(len(partitions))
            on_lost(consumer, partitions)

        self._consumer.subscribe(topics, on_assign=assign, on_revoke=revoke, on_lost=lost)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


PROSE_WORDS = "consumer lag grows when processing is slower than production and the partition backlog rises".split()


def prose(words: int, offset: int = 0) -> str:
    """`words` words of plain English text, starting `offset` words into a fixed sentence (prompt-packing tests)."""
    return " ".join(PROSE_WORDS[(offset + i) % len(PROSE_WORDS)] for i in range(words)) + "."
