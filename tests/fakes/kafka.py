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
    _headers_error: Exception | None = None  # headers() raises it, as confluent-kafka does for a non-UTF-8 name

    def topic(self) -> str: return self._topic
    def partition(self) -> int: return self._partition
    def offset(self) -> int: return self._offset
    def key(self) -> bytes | None: return self._key
    def value(self) -> bytes | None: return self._value
    def headers(self) -> list[tuple[str, bytes | None]] | None:
        if self._headers_error is not None:
            raise self._headers_error
        return self._headers
    def error(self) -> KafkaError | None: return self._error
    def timestamp(self) -> tuple[int, int]: return (1, 1_700_000_000_000)


@dataclass
class Produced:
    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes | None]]
    on_delivery: Callable[[KafkaError | None, Any], None]


def librdkafka_size(key: bytes | None, value: bytes | None, headers: Any) -> int:
    """What librdkafka checks against message.max.bytes: 36 bytes of framing, key, value, and each header's name and
    value with their zigzag-varint lengths (checked against a real Producer in tests/unit/test_records_and_sink.py)."""

    def varint(n: int) -> int:
        n, size = (n << 1) ^ (n >> 63), 1
        while n >= 0x80:
            n, size = n >> 7, size + 1
        return size

    size = 36 + len(key or b"") + len(value or b"")
    for name, data in headers or []:
        size += varint(len(name.encode())) + len(name.encode()) + (varint(len(data)) + len(data) if data is not None else 1)
    return size


class FakeProducer:
    """Every produce() waits for poll(); `failures` makes the next deliveries fail with the given errors (None: that
    one is delivered). `max_bytes` refuses a larger value at produce() (the whole record with `whole_record`, sized
    as librdkafka does); `broker_max_bytes` fails the delivery of a larger record, as a broker's size limit does."""

    def __init__(self, max_bytes: int | None = None, *, whole_record: bool = False, broker_max_bytes: int | None = None) -> None:
        self.produced: list[Produced] = []
        self.waiting: list[Produced] = []
        self.delivered: list[Produced] = []
        self.failures: list[KafkaError] = []
        self.max_bytes = max_bytes
        self.whole_record = whole_record
        self.broker_max_bytes = broker_max_bytes
        self.hold = False  # deliveries stay outstanding while True
        self.transactions: list[str] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None, on_delivery: Any = None) -> None:
        size = librdkafka_size(key, value, headers) if self.whole_record else len(value or b"")
        if self.max_bytes is not None and size > self.max_bytes:
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
            if error is None and self.broker_max_bytes is not None and librdkafka_size(record.key, record.value, record.headers) > self.broker_max_bytes:
                error = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
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


class FakeGroupConsumer(FakeConsumer):
    """A consumer of one topic whose group assigns `partitions` on the first consume(); a test can revoke later."""

    def __init__(self, topic: str, partitions: int = 1) -> None:
        super().__init__()
        self.topic = topic
        self.partitions = partitions
        self.callbacks: dict[str, Any] = {}
        self.closed = False
        self.sought: list[TopicPartition] = []
        self._joined = False
        self.before_consume: Callable[["FakeGroupConsumer"], None] | None = None
        self.delivered_per_partition: dict[int, int] = {}

    def add(self, partition: int, key: bytes | None, value: bytes | None, headers: list | None = None,
            headers_error: Exception | None = None) -> FakeMessage:
        offset = sum(1 for m in self.queue if m.partition() == partition) + self.delivered_per_partition.get(partition, 0)
        message = FakeMessage(self.topic, partition, offset, key, value, headers, _headers_error=headers_error)
        self.queue.append(message)
        return message

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None) -> None:
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned += list(partitions)

    def revoke(self, partitions: list[int]) -> None:
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self.callbacks["revoke"](self, tps)
        self.assigned = [tp for tp in self.assigned if tp.partition not in partitions]

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        if self.before_consume is not None:
            self.before_consume(self)
        if not self._joined:
            self._joined = True
            self.callbacks["assign"](self, [TopicPartition(self.topic, p) for p in range(self.partitions)])
        owned = {tp.partition for tp in self.assigned}
        ready = [m for m in self.queue if m.partition() in owned and (m.topic(), m.partition()) not in self.paused][:num_messages]
        for m in ready:
            self.queue.remove(m)
            self.delivered_per_partition[m.partition()] = self.delivered_per_partition.get(m.partition(), 0) + 1
        if not ready and timeout and timeout > 0:
            import time

            time.sleep(min(timeout, 0.01))
        return ready

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        return None

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        return (0, -1)

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        last: dict[int, int] = {}
        for commit in self.commits:
            for (_t, p), o in commit.items():
                last[p] = o
        return [TopicPartition(tp.topic, tp.partition, last.get(tp.partition, -1001)) for tp in partitions]

    def seek(self, tp: TopicPartition) -> None:
        self.sought.append(tp)

    def close(self) -> None:
        self.closed = True
