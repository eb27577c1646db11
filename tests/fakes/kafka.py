"""Fakes of confluent-kafka's Producer and Consumer, injected through the Worker's and the pieces' keyword-only
constructors (no patching of private members). Deliveries are reported on poll(), as librdkafka does.

They follow librdkafka where the worker's correctness depends on it:
  * rebalance callbacks run INSIDE consume() (FakeGroupConsumer.during_consume runs after the call has fetched its
    messages, so a test can revoke, lose or re-assign partitions in the middle of a call that returns messages);
  * a (re-)assigned partition is fetched from its committed offset (or the earliest one), seek() moves the fetch
    position, and offsets committed inside a producer transaction count as committed;
  * the transactional producer is a state machine: an API call in the wrong state fails with _STATE, a failed
    delivery makes the transaction abortable, a commit_transaction() that timed out goes on in the background and
    is finished by calling commit_transaction() again, and every call can be made to raise a given KafkaError
    (`txn_errors`); `events` is one log of produce, ack, begin, send_offsets, commit and abort, in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, TopicPartition


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
    transaction: int | None = None  # the transaction it was produced in (transactional producers)
    outcome: KafkaError | None = field(default=None, repr=False)  # decided when a commit/abort settles it early
    settled: bool = field(default=False, repr=False)


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
    as librdkafka does); `broker_max_bytes` fails the delivery of a larger record, as a broker's size limit does.

    Transactional once init_transactions() is called. `txn_errors[name]` (name: init_transactions,
    begin_transaction, send_offsets_to_transaction, commit_transaction, abort_transaction) holds errors the next
    calls of that name raise, each applied as librdkafka would: fatal → every later call fails fatally;
    txn_requires_abort → only abort_transaction() is accepted; retriable on commit/abort_transaction → the operation
    goes on in the background and the same call, made again, completes it."""

    def __init__(self, max_bytes: int | None = None, *, whole_record: bool = False, broker_max_bytes: int | None = None) -> None:
        self.produced: list[Produced] = []
        self.waiting: list[Produced] = []
        self.delivered: list[Produced] = []
        self.failures: list[KafkaError] = []
        self.max_bytes = max_bytes
        self.whole_record = whole_record
        self.broker_max_bytes = broker_max_bytes
        self.hold = False  # deliveries stay outstanding while True
        self.transactions: list[str] = []  # what succeeded: init, begin, offsets:p=o,..., commit, abort
        self.events: list[tuple[Any, ...]] = []
        self.txn_errors: dict[str, list[KafkaError]] = {}
        self.state: str | None = None  # None: not transactional; else ready | in_txn | committing | aborting | abortable | fatal
        self.committed_transactions: list[list[Produced]] = []
        self.aborted: list[Produced] = []
        self._transaction = 0
        self._open: list[Produced] = []
        self._offsets: dict[tuple[str, int], int] = {}
        self._group: Any = None

    # ------------------------------------------------------------------------------------------- delivery
    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None, on_delivery: Any = None) -> None:
        size = librdkafka_size(key, value, headers) if self.whole_record else len(value or b"")
        if self.max_bytes is not None and size > self.max_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Message size too large"))
        if self.state is not None:
            self._require("produce", "in_txn")
        record = Produced(topic, value, key, list(headers or []), on_delivery, self._transaction if self.state else None)
        self.produced.append(record)
        self.waiting.append(record)
        if self.state is not None:
            self._open.append(record)
        self.events.append(("produce", topic, key))

    def poll(self, timeout: float = 0) -> int:
        if self.hold:
            return 0
        waiting, self.waiting = self.waiting, []
        for record in waiting:
            error = record.outcome if record.settled else self._outcome()
            if error is None and self.broker_max_bytes is not None and librdkafka_size(record.key, record.value, record.headers) > self.broker_max_bytes:
                error = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
            if error is None:
                self.delivered.append(record)
                self.events.append(("ack", record.topic, record.key))
            else:
                self.events.append(("fail", record.topic, record.key, error.code()))
                if record.transaction is not None and record.transaction == self._transaction and self.state == "in_txn":
                    self.state = "abortable"  # librdkafka: a failed delivery makes the transaction abortable
            record.on_delivery(error, None)
        return len(waiting)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return len(self.waiting)

    def visible(self) -> list[Produced]:
        """What a read_committed consumer sees: acknowledged outputs outside transactions and those of committed ones."""
        committed = {id(r) for transaction in self.committed_transactions for r in transaction}
        return [r for r in self.delivered if r.transaction is None or id(r) in committed]

    def _outcome(self) -> KafkaError | None:
        return self.failures.pop(0) if self.failures else None

    # ---------------------------------------------------------------------------------------- transactions
    def init_transactions(self, timeout: float) -> None:
        self._inject("init_transactions")
        self.state = "ready"
        self.transactions.append("init")
        self.events.append(("init",))

    def begin_transaction(self) -> None:
        self._require("begin_transaction", "ready")
        self._inject("begin_transaction")
        self._transaction += 1
        self._open, self._offsets, self._group = [], {}, None
        self.state = "in_txn"
        self.transactions.append("begin")
        self.events.append(("begin",))

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], group: Any, timeout: float) -> None:
        self._require("send_offsets_to_transaction", "in_txn")
        self._inject("send_offsets_to_transaction")
        self._offsets.update({(tp.topic, tp.partition): tp.offset for tp in offsets})
        self._group = group
        self.transactions.append("offsets:" + ",".join(f"{tp.partition}={tp.offset}" for tp in offsets))
        self.events.append(("send_offsets", {tp.partition: tp.offset for tp in offsets}))

    def commit_transaction(self, timeout: float) -> None:
        self._require("commit_transaction", "in_txn", "committing")
        # librdkafka flushes the transaction's outstanding messages first; their reports still wait for poll()
        for record in self._unreported():
            record.outcome, record.settled = self._outcome(), True
        if any(r.settled and r.outcome is not None for r in self._open):
            self.state = "abortable"
            self.events.append(("commit_transaction_failed", KafkaError._STATE))
            raise KafkaException(KafkaError(KafkaError._STATE, "Failed to flush all messages: abort the transaction", txn_requires_abort=True))
        self._inject("commit_transaction", retriable_state="committing")
        self.committed_transactions.append(list(self._open))
        if self._group is not None and hasattr(self._group, "transaction_committed"):
            self._group.transaction_committed(dict(self._offsets))
        self.state = "ready"
        self.transactions.append("commit")
        self.events.append(("commit",))

    def abort_transaction(self, timeout: float) -> None:
        self._require("abort_transaction", "in_txn", "abortable", "aborting")
        self._inject("abort_transaction", retriable_state="aborting")
        purge = KafkaError(KafkaError._PURGE_QUEUE, "purged by abort_transaction")
        for record in self._unreported():
            record.outcome, record.settled = purge, True
        self.aborted += self._open
        self._open = []
        self.state = "ready"
        self.transactions.append("abort")
        self.events.append(("abort",))

    def _unreported(self) -> list[Produced]:
        """The open transaction's records whose delivery is neither reported nor settled yet."""
        waiting = {id(r) for r in self.waiting}
        return [r for r in self._open if id(r) in waiting and not r.settled]

    def _require(self, name: str, *states: str) -> None:
        if self.state == "fatal":
            raise KafkaException(KafkaError(KafkaError._FENCED, f"{name}: the producer is fenced", fatal=True))
        if self.state not in states:
            raise KafkaException(KafkaError(KafkaError._STATE, f"{name}: Operation not valid in state {self.state}",
                                            txn_requires_abort=self.state == "abortable"))

    def _inject(self, name: str, retriable_state: str | None = None) -> None:
        errors = self.txn_errors.get(name)
        if not errors:
            return
        error = errors.pop(0)
        self.events.append((name + "_failed", error.code()))
        if error.fatal():
            self.state = "fatal"
        elif error.txn_requires_abort():
            self.state = "abortable"
        elif error.retriable() and retriable_state is not None:
            self.state = retriable_state
        raise KafkaException(error)


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[dict[tuple[str, int], int]] = []
        self.commit_failures: list[KafkaError] = []
        self.assigned: list[TopicPartition] = []
        self.paused: set[tuple[str, int]] = set()
        self.queue: list[FakeMessage] = []
        self.on_commit: Callable[[], None] | None = None
        self.before_commit: Callable[[dict[tuple[str, int], int]], None] | None = None  # sees the offsets

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> None:
        if self.on_commit:
            self.on_commit()
        if self.before_commit:
            self.before_commit({(tp.topic, tp.partition): tp.offset for tp in offsets or []})
        if self.commit_failures:
            raise KafkaException(self.commit_failures.pop(0))
        self.commits.append({(tp.topic, tp.partition): tp.offset for tp in offsets or []})

    def consumer_group_metadata(self) -> Any: return "group-metadata"
    def assignment(self) -> list[TopicPartition]: return list(self.assigned)
    def pause(self, partitions: list[TopicPartition]) -> None: self.paused |= {(p.topic, p.partition) for p in partitions}
    def resume(self, partitions: list[TopicPartition]) -> None: self.paused -= {(p.topic, p.partition) for p in partitions}

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        ready = [m for m in self.queue if (m.topic(), m.partition()) not in self.paused][:num_messages]
        for m in ready:
            self.queue.remove(m)
        return ready


class FakeGroupConsumer(FakeConsumer):
    """A consumer of one topic whose group assigns `partitions` on the first consume() (and again on the first
    consume() after a new subscribe()). A test drives rebalances with revoke(), lose() and group_assign(), from
    `before_consume` (before the call fetches) or `during_consume` (after it fetched: the callbacks then run
    inside a call that returns messages, as librdkafka serves them)."""

    def __init__(self, topic: str, partitions: int = 1) -> None:
        self._log: list[FakeMessage] = []  # every message ever added, in order
        super().__init__()
        self.topic = topic
        self.partitions = partitions
        self.callbacks: dict[str, Any] = {}
        self.closed = False
        self.sought: list[TopicPartition] = []
        self._joined = False
        self.before_consume: Callable[["FakeGroupConsumer"], None] | None = None
        self.during_consume: Callable[["FakeGroupConsumer", list[FakeMessage]], None] | None = None
        self.delivered_per_partition: dict[int, int] = {}
        self.positions: dict[int, int] = {}  # partition → next offset to fetch
        self.committed_offsets: dict[int, int] = {}  # by consumer commits and committed transactions alike
        self.transactional_commits: list[dict[tuple[str, int], int]] = []

    @property
    def queue(self) -> list[FakeMessage]:  # type: ignore[override]
        """Messages not fetched yet (at or after their partition's position)."""
        return [m for m in self._log if m.offset() >= self.positions.get(m.partition(), 0)]

    @queue.setter
    def queue(self, messages: list[FakeMessage]) -> None:
        self._log = list(messages)

    def add(self, partition: int, key: bytes | None, value: bytes | None, headers: list | None = None,
            headers_error: Exception | None = None) -> FakeMessage:
        offset = sum(1 for m in self._log if m.partition() == partition)
        message = FakeMessage(self.topic, partition, offset, key, value, headers, _headers_error=headers_error)
        self._log.append(message)
        return message

    def messages(self, partition: int) -> list[FakeMessage]:
        """Every message of the partition ever added, in offset order."""
        return [m for m in self._log if m.partition() == partition]

    def end_offset(self, partition: int) -> int:
        return sum(1 for m in self._log if m.partition() == partition)

    # ----------------------------------------------------------------------------------------- group
    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None) -> None:
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        self._joined = False  # a new member joins: its first consume() gets an assignment

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = []
        self.incremental_assign(partitions)

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned = [a for a in self.assigned if a.partition != tp.partition] + [TopicPartition(tp.topic, tp.partition)]
            self.positions[tp.partition] = tp.offset if tp.offset >= 0 else self.committed_offsets.get(tp.partition, 0)

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions}
        self.assigned = [a for a in self.assigned if a.partition not in gone]

    def unassign(self) -> None:
        self.assigned = []

    def revoke(self, partitions: list[int]) -> None:
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self.callbacks["revoke"](self, tps)
        self.incremental_unassign(tps)

    def lose(self, partitions: list[int]) -> None:
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self.callbacks["lost"](self, tps)
        self.incremental_unassign(tps)

    def group_assign(self, partitions: list[int]) -> None:
        """The group hands these partitions over (eager: the whole new assignment; cooperative: the added ones)."""
        self.callbacks["assign"](self, [TopicPartition(self.topic, p) for p in partitions])

    # ----------------------------------------------------------------------------------------- fetch
    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        if self.before_consume is not None:
            self.before_consume(self)
        if not self._joined:
            self._joined = True
            self.group_assign(list(range(self.partitions)))
        owned = {tp.partition for tp in self.assigned}
        ready: list[FakeMessage] = []
        for m in self._log:
            if len(ready) >= num_messages:
                break
            p = m.partition()
            if p in owned and (m.topic(), p) not in self.paused and m.offset() == self.positions.get(p, 0):
                ready.append(m)
                self.positions[p] = m.offset() + 1
                self.delivered_per_partition[p] = self.delivered_per_partition.get(p, 0) + 1
        if self.during_consume is not None:
            self.during_consume(self, ready)
        if not ready and timeout and timeout > 0:
            time.sleep(min(timeout, 0.01))
        return ready

    def seek(self, tp: TopicPartition) -> None:
        self.sought.append(tp)
        offset = tp.offset
        if offset == OFFSET_BEGINNING:
            offset = 0
        elif offset == OFFSET_END:
            offset = self.end_offset(tp.partition)
        self.positions[tp.partition] = offset

    # ---------------------------------------------------------------------------------------- commits
    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> None:
        super().commit(offsets, asynchronous)
        for tp in offsets or []:
            self.committed_offsets[tp.partition] = tp.offset

    def consumer_group_metadata(self) -> Any:
        return self  # the fake producer reports a committed transaction's offsets back here

    def transaction_committed(self, offsets: dict[tuple[str, int], int]) -> None:
        self.transactional_commits.append(dict(offsets))
        for (_topic, partition), offset in offsets.items():
            self.committed_offsets[partition] = offset

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.committed_offsets.get(tp.partition, -1001)) for tp in partitions]

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        return None

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        return (0, -1)

    def close(self) -> None:
        self.closed = True
