"""Fakes of confluent-kafka's Producer and Consumer, injected through the Worker's and the pieces' keyword-only
constructors (no patching of private members). Deliveries are reported on poll(), as librdkafka does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from confluent_kafka import KafkaError, KafkaException, TopicPartition


@dataclass
class FakeMessage:
    _topic: str
    _partition: int
    _offset: int
    _key: bytes | None
    _value: bytes | None
    _headers: list[tuple[str, bytes | None]] | None = None
    _error: KafkaError | None = None

    def topic(self) -> str: return self._topic
    def partition(self) -> int: return self._partition
    def offset(self) -> int: return self._offset
    def key(self) -> bytes | None: return self._key
    def value(self) -> bytes | None: return self._value
    def headers(self) -> list[tuple[str, bytes | None]] | None: return self._headers
    def error(self) -> KafkaError | None: return self._error
    def timestamp(self) -> tuple[int, int]: return (1, 1_700_000_000_000)


@dataclass
class Produced:
    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes | None]]
    on_delivery: Callable[[KafkaError | None, Any], None]


class FakeProducer:
    """Every produce() waits for poll(); `fail_next` makes the next N deliveries fail with the given error."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.produced: list[Produced] = []
        self.waiting: list[Produced] = []
        self.delivered: list[Produced] = []
        self.failures: list[KafkaError] = []
        self.max_bytes = max_bytes
        self.hold = False  # deliveries stay outstanding while True
        self.transactions: list[str] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None, on_delivery: Any = None) -> None:
        if self.max_bytes is not None and len(value or b"") > self.max_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Message size too large"))
        record = Produced(topic, value, key, list(headers or []), on_delivery)
        self.produced.append(record)
        self.waiting.append(record)

    def poll(self, timeout: float = 0) -> int:
        if self.hold:
            return 0
        waiting, self.waiting = self.waiting, []
        for record in waiting:
            error = self.failures.pop(0) if self.failures else None
            if error is None:
                self.delivered.append(record)
            record.on_delivery(error, None)
        return len(waiting)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return len(self.waiting)

    # transactions
    def init_transactions(self, timeout: float) -> None: self.transactions.append("init")
    def begin_transaction(self) -> None: self.transactions.append("begin")
    def send_offsets_to_transaction(self, offsets: list[TopicPartition], group: Any, timeout: float) -> None:
        self.transactions.append("offsets:" + ",".join(f"{tp.partition}={tp.offset}" for tp in offsets))
    def commit_transaction(self, timeout: float) -> None: self.transactions.append("commit")
    def abort_transaction(self, timeout: float) -> None: self.transactions.append("abort")


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[dict[tuple[str, int], int]] = []
        self.commit_failures: list[KafkaError] = []
        self.assigned: list[TopicPartition] = []
        self.paused: set[tuple[str, int]] = set()
        self.queue: list[FakeMessage] = []
        self.on_commit: Callable[[], None] | None = None

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> None:
        if self.on_commit:
            self.on_commit()
        if self.commit_failures:
            raise KafkaException(self.commit_failures.pop(0))
        self.commits.append({(tp.topic, tp.partition): tp.offset for tp in offsets or []})

    def consumer_group_metadata(self) -> str: return "group-metadata"
    def assignment(self) -> list[TopicPartition]: return list(self.assigned)
    def pause(self, partitions: list[TopicPartition]) -> None: self.paused |= {(p.topic, p.partition) for p in partitions}
    def resume(self, partitions: list[TopicPartition]) -> None: self.paused -= {(p.topic, p.partition) for p in partitions}

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        ready = [m for m in self.queue if (m.topic(), m.partition()) not in self.paused][:num_messages]
        for m in ready:
            self.queue.remove(m)
        return ready
