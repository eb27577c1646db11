"""A deterministic, seeded simulation of the real Worker under faults.

`run_schedule(seed, mode, guarantee)` builds a SimCluster (an input topic of a few partitions, committed offsets,
group membership, every output ever acknowledged) and runs the real `processor.loop.Worker` on it through its public
constructor, with SimConsumer/SimProducer as its clients and a SimEngine (ExtractiveEngine with faults) as its
engine. `worker.run(until=...)` calls `until()` once per step: that is the simulator's tick, where invariants are
checked and crashes may be injected. Faults are on for the first FAULT_TICKS ticks (the fault phase); after that only
the hostile records stay (they are data, not faults) and the worker must commit everything (liveness).

Determinism: every fault decision is `_rng(seed, what, incarnation, counter)`, a fresh `random.Random` seeded by
the schedule's seed, the deciding client and that client's own call counter (or the record's identity), never by
wall time. A failing seed replays the same decisions for the same sequence of calls. What can still vary between
replays is thread timing: the engine runs on the worker's own thread (micro_batch: the generation thread;
continuous: the feed's thread), so how many polling steps (ticks) and client calls happen while a call generates,
and so which counter value a fault lands on, depends on the machine's load; backoff timers are wall-clock too.

The group: one live worker at a time (a crash or an exit starts a fresh Worker with fresh clients, which resumes from
the committed offsets). A rebalance may take partitions from it; they then belong to no live member (they are not
processed elsewhere) until they come back, at the latest when the group settles once the faults stop.

Invariants (each violation is recorded with its class):
  loss            every offset below a committed offset has an acknowledged summary or dead letter
  blame           only records the schedule made hostile/poison are ever dead-lettered
  ownership       no commit for a partition the consumer does not own, or past what it read in this assignment
  duplicates      after a crash, records re-processed ≤ BATCH_MAX_RECORDS (micro_batch) / CONTINUOUS_MAX_UNCOMMITTED
  liveness        once faults stop, everything is committed within QUIET_TICKS ticks and QUIET_S seconds, and the
                  worker neither crash-loops nor exits non-zero
  responsiveness  the polling thread (the gap between two until() calls) is never blocked longer than RESPONSIVE_S
  protocol        the worker broke a client's contract (e.g. a call other than commit_transaction after a timed-out
                  commit_transaction)
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from processor.codec import EVENT_SCHEMA, AvroCodec
from processor.engines.base import EventGenerationError, Generation, Prompt
from processor.engines.extractive import ExtractiveEngine
from processor.loop import Worker
from processor.records import parse_dead_letter
from processor.settings import Settings, load_settings
from tests.helpers import make_event

CODEC = AvroCodec()
TOPIC, OUT, DLQ = "in", "out", "dlq"
MAX_MESSAGE_BYTES = 1_000_000  # the producer's message.max.bytes default

MODES = ("micro_batch", "continuous")
GUARANTEES = ("at_least_once", "exactly_once")

# Every fault class; a schedule draws from the enabled ones (SIM_FAULTS_OFF=a,b turns classes off).
FAULT_KINDS = frozenset({
    "rebalance_eager", "rebalance_cooperative", "lost",
    "delivery", "commit", "txn_abort", "txn_timeout", "fence",
    "engine_raise", "engine_error", "engine_empty", "engine_count", "engine_hang", "engine_slow",
    "crash",
    "hostile_framing", "hostile_key", "hostile_headers", "hostile_header_name", "poison",
})

BATCH_MAX_RECORDS = 3
CONTINUOUS_MAX_UNCOMMITTED = 6
FAULT_TICKS = 300
FAULT_S = 1.5  # the fault phase ends after FAULT_TICKS ticks or this long (a step can take 0.25 s while generation is full)
WRITE_RATE = 0.12  # per tick, until every record of the schedule is written
MAX_CRASHES = 3
ENGINE_SCALE = 3.0
QUIET_TICKS = 2000
QUIET_S = 4.0
RESPONSIVE_S = 0.5
ENGINE_CALL_TIMEOUT_S = 1.0  # a hung engine call ends the worker (exit 5) after this long; the next process resumes
MAX_RESTARTS = 12
MAX_SCHEDULE_S = 25.0
SHORT_HANG_S = 0.6
STUCK_S = 5.0  # the polling thread blocked this long: abandon the worker (its thread is a daemon)


class SimCrash(BaseException):
    """The process dies here (not an Exception: nothing in the worker may catch it)."""


def _rng(seed: int, *parts: Any) -> random.Random:
    return random.Random("/".join(map(str, (seed, *parts))))


@dataclass
class Violation:
    kind: str
    message: str


@dataclass
class InputRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    hostile: str | None = None


class SimMessage:
    """confluent_kafka.Message's read side. A header name that is not UTF-8 makes headers() raise, as the real one does."""

    def __init__(self, record: InputRecord) -> None:
        self._r = record

    def topic(self) -> str: return TOPIC
    def partition(self) -> int: return self._r.partition
    def offset(self) -> int: return self._r.offset
    def key(self) -> bytes | None: return self._r.key
    def value(self) -> bytes | None: return self._r.value
    def error(self) -> KafkaError | None: return None
    def timestamp(self) -> tuple[int, int]: return (1, 1_700_000_000_000 + self._r.offset)

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        if self._r.hostile == "hostile_header_name":
            raise UnicodeDecodeError("utf-8", b"\xff\xfename", 0, 1, "invalid start byte")
        return list(self._r.headers) or None


@dataclass
class Output:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


class Plan:
    """The fault schedule: which classes this seed uses, and whether faults are still on (the fault phase)."""

    def __init__(self, seed: int, enabled: frozenset[str], transactional: bool) -> None:
        self.seed = seed
        rng = _rng(seed, "plan")
        usable = set(enabled) if transactional else set(enabled) - {"txn_abort", "txn_timeout", "fence"}
        # Each class is on in about half the schedules, so that a violation can be traced to few classes. Every class
        # is drawn whether enabled or not: turning one off leaves the rest of the schedule as it was.
        drawn = {k for k in sorted(FAULT_KINDS) if rng.random() < 0.5}
        self.kinds = drawn & usable
        self.faults_on = True
        self.rate = rng.choice((0.02, 0.05, 0.1))
        self.crashes = 0

    def crash_allowed(self) -> bool:
        return self.crashes < MAX_CRASHES

    def fault(self, kind: str, *parts: Any, scale: float = 1.0) -> bool:
        return self.faults_on and kind in self.kinds and _rng(self.plan_seed, kind, *parts).random() < self.rate * scale

    @property
    def plan_seed(self) -> int:
        return self.seed


class SimCluster:
    def __init__(self, seed: int, plan: Plan, partitions: int, per_partition: int) -> None:
        self.plan = plan
        self.partitions = partitions
        self.log: dict[int, list[InputRecord]] = {p: [] for p in range(partitions)}
        self.committed: dict[int, int] = {p: 0 for p in range(partitions)}
        self.ever_committed: set[int] = set()
        self.published_by: dict[tuple[int, int], Any] = {}
        self.epochs = 0
        self.outputs: list[Output] = []
        self.covered: dict[tuple[int, int], int] = {}  # (partition, offset) → outputs acknowledged for it
        self.hostile: set[tuple[int, int]] = set()
        self.violations: list[Violation] = []
        self._seen: set[tuple[str, str]] = set()
        self.generation = 0
        self._rng = _rng(seed, "log")
        self._hostile_kinds = sorted(k for k in plan.kinds if k.startswith("hostile_") or k == "poison")
        self.to_write = partitions * per_partition  # records still to be produced to the input topic
        self.written = 0
        for _ in range(self.to_write // 3):
            self.append()

    def append(self) -> None:
        """One more input record (the upstream producer keeps writing through the fault phase)."""
        if self.written >= self.to_write:
            return
        rng, kinds = self._rng, self._hostile_kinds
        p = rng.randrange(self.partitions)
        o = len(self.log[p])
        kind = kinds[rng.randrange(len(kinds))] if kinds and rng.random() < 0.06 else None
        self.log[p].append(self._record(p, o, self.written, kind))
        if kind is not None:
            self.hostile.add((p, o))
        self.written += 1

    def _record(self, p: int, o: int, n: int, kind: str | None) -> InputRecord:
        key: bytes | None = f"k{n % 5}".encode()
        event = make_event(n, results=2)
        headers: list[tuple[str, bytes | None]] = [("trace", f"t{n}".encode())]
        value: bytes | None = None
        if kind == "poison":
            event["event_id"] = f"poison-{n:06d}"
        if kind == "hostile_framing":
            value = b"not avro at all"
        if kind == "hostile_key":
            key = b"K" * 1_100_000
        if kind == "hostile_headers":
            # Input headers reach the output only on a dead letter: make this record one (not Avro either).
            headers.append(("big", b"H" * 1_100_000))
            value = b"not avro, and over 1 MB of headers"
        if value is None:
            value = CODEC.encode(event, EVENT_SCHEMA)
        return InputRecord(p, o, key, value, headers, kind)

    def violation(self, kind: str, message: str) -> None:
        if (kind, message) not in self._seen:
            self._seen.add((kind, message))
            self.violations.append(Violation(kind, message))

    def publish(self, outputs: Sequence[Output], tag: Callable[[int], Any] | None = None) -> None:
        """Outputs become visible downstream. `tag(partition)`: who published it (incarnation, assignment epoch)."""
        for out in outputs:
            self.outputs.append(out)
            source = _source_of(out)
            if source is None:
                self.violation("protocol", f"an output on {out.topic} without lineage")
                continue
            self.covered[source] = self.covered.get(source, 0) + 1
            if tag is not None:
                self.published_by[source] = tag(source[0])
            if out.topic == DLQ and source not in self.hostile:
                reason = parse_dead_letter(out.key, out.value, out.headers).get("error_class")
                self.violation("blame", f"{source[0]}@{source[1]} (a good record) dead-lettered as {reason}")

    def end(self, p: int) -> int:
        return len(self.log[p])

    def all_committed(self) -> bool:
        return all(self.committed[p] >= self.end(p) for p in self.log)


def _source_of(out: Output) -> tuple[int, int] | None:
    if out.topic == OUT:
        record = CODEC.decode(out.value, "ai_worker.SearchSummary")
        return record["source_partition"], record["source_offset"]
    fields = parse_dead_letter(out.key, out.value, out.headers)
    if isinstance(fields.get("source_partition"), int) and isinstance(fields.get("source_offset"), int):
        return fields["source_partition"], fields["source_offset"]
    return None


class Life:
    """One process incarnation: its clients go dead together when it crashes."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.dead = False


class _Client:
    def __init__(self, cluster: SimCluster, life: Life, name: str) -> None:
        self.cluster = cluster
        self.plan = cluster.plan
        self.life = life
        self.name = name
        self.calls: dict[str, int] = {}

    def _enter(self, call: str, crash_here: bool = True) -> int:
        if self.life.dead:
            raise SimCrash(f"{self.name}.{call} after the crash")
        n = self.calls[call] = self.calls.get(call, 0) + 1
        if crash_here and self.plan.crash_allowed() and self.plan.fault("crash", self.life.number, self.name, call, n) and _rng(self.plan.seed, "crash-client", self.life.number, call, n).random() < 0.05:
            self.plan.crashes += 1
            self.life.dead = True
            raise SimCrash(f"crashed in {self.name}.{call} #{n}")
        return n

    def _decide(self, kind: str, call: str, n: int) -> bool:
        return self.plan.fault(kind, self.life.number, self.name, call, n)


class SimConsumer(_Client):
    def __init__(self, cluster: SimCluster, life: Life, cooperative: bool) -> None:
        super().__init__(cluster, life, "consumer")
        self.cooperative = cooperative
        self.callbacks: dict[str, Any] = {}
        self.assignment_: set[int] = set()
        self.position: dict[int, int] = {}
        self.read_upto: dict[int, int] = {}  # this assignment epoch: the offset after the last message returned
        self.epoch: dict[int, int] = {}  # partition → its assignment epoch (cluster-wide counter)
        self.paused: set[int] = set()
        self.joined = False
        self.closed = False
        self._rr = 0

    # group membership -------------------------------------------------------------------------------
    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None) -> None:
        self._enter("subscribe", crash_here=False)
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}

    def _tps(self, partitions: Sequence[int]) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, p) for p in sorted(partitions)]

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._enter("assign", crash_here=False)
        self.assignment_ = set()
        self.incremental_assign(partitions, counted=False)

    def incremental_assign(self, partitions: list[TopicPartition], counted: bool = True) -> None:
        if counted:
            self._enter("incremental_assign", crash_here=False)
        for tp in partitions:
            self.cluster.epochs += 1
            self.epoch[tp.partition] = self.cluster.epochs
            self.assignment_.add(tp.partition)
            self.position[tp.partition] = self.cluster.committed[tp.partition]
            self.read_upto[tp.partition] = self.cluster.committed[tp.partition]

    def _unassign(self, partitions: Sequence[int]) -> None:
        for p in partitions:
            self.assignment_.discard(p)
            self.epoch.pop(p, None)
            self.position.pop(p, None)
            self.read_upto.pop(p, None)

    def _rebalance(self, n: int) -> None:
        all_parts = list(range(self.cluster.partitions))
        if not self.joined:
            self.joined = True
            self.cluster.generation += 1
            self.callbacks["assign"](self, self._tps(all_parts))
            return
        rng = _rng(self.plan.seed, "rebalance", self.life.number, n)
        owned = sorted(self.assignment_)
        if not self.plan.faults_on:
            missing = [p for p in all_parts if p not in self.assignment_]
            if missing:  # the group settles: every partition back to this (the only live) member
                self.cluster.generation += 1
                if self.cooperative:
                    self.callbacks["assign"](self, self._tps(missing))
                else:
                    self.callbacks["revoke"](self, self._tps(owned))
                    self._unassign(owned)
                    self.callbacks["assign"](self, self._tps(all_parts))
            return
        if self.cooperative and self._decide("rebalance_cooperative", "consume", n):
            self.cluster.generation += 1
            if owned and rng.random() < 0.6:
                gone = rng.sample(owned, rng.randint(1, len(owned)))
                self.callbacks["revoke"](self, self._tps(gone))
                self._unassign(gone)  # the library unassigns incrementally after the callback
            else:
                missing = [p for p in all_parts if p not in self.assignment_]
                if missing:
                    self.callbacks["assign"](self, self._tps(rng.sample(missing, rng.randint(1, len(missing)))))
        elif not self.cooperative and self._decide("rebalance_eager", "consume", n):
            self.cluster.generation += 1
            self.callbacks["revoke"](self, self._tps(owned))
            self._unassign(owned)
            new = [p for p in all_parts if rng.random() < 0.7]
            self.callbacks["assign"](self, self._tps(new))
        elif owned and self._decide("lost", "consume", n):
            self.cluster.generation += 1
            gone = rng.sample(owned, rng.randint(1, len(owned)))
            self.callbacks["lost"](self, self._tps(gone))
            self._unassign(gone)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[SimMessage]:
        n = self._enter("consume")
        # librdkafka serves rebalance callbacks from inside consume(), then returns messages from the same call.
        self._rebalance(n)
        out: list[SimMessage] = []
        ready = [p for p in sorted(self.assignment_) if p not in self.paused]
        while ready and len(out) < num_messages:
            progressed = False
            for p in ready[self._rr % len(ready):] + ready[: self._rr % len(ready)]:
                if len(out) >= num_messages:
                    break
                position = self.position[p]
                if position < self.cluster.end(p):
                    out.append(SimMessage(self.cluster.log[p][position]))
                    self.position[p] = position + 1
                    self.read_upto[p] = max(self.read_upto[p], position + 1)
                    progressed = True
            self._rr += 1
            if not progressed:
                break
        if not out and timeout and timeout > 0:
            time.sleep(min(timeout, 0.001))
        return out

    def assignment(self) -> list[TopicPartition]:
        return self._tps(self.assignment_)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {tp.partition for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {tp.partition for tp in partitions}

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> None:
        n = self._enter("commit")
        if self._decide("commit", "commit", n):
            retriable = _rng(self.plan.seed, "commit-kind", self.life.number, n).random() < 0.7
            code = KafkaError.REQUEST_TIMED_OUT if retriable else KafkaError.REBALANCE_IN_PROGRESS
            raise KafkaException(KafkaError(code, "simulated commit failure", retriable=retriable))
        self.check_owned(offsets or [], "commit")
        for tp in offsets or []:
            self.cluster.committed[tp.partition] = tp.offset
            self.cluster.ever_committed.add(tp.partition)

    def check_owned(self, offsets: list[TopicPartition], how: str) -> None:
        for tp in offsets:
            if tp.partition not in self.assignment_:
                self.cluster.violation("ownership", f"{how} of partition {tp.partition}, not assigned to the committing consumer")
            elif tp.offset > self.read_upto[tp.partition]:
                self.cluster.violation("ownership", f"{how} of {tp.partition}@{tp.offset}, past what this assignment epoch read "
                                                    f"({self.read_upto[tp.partition]})")

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        self._enter("committed", crash_here=False)
        # A partition without a committed offset answers OFFSET_INVALID (-1001), as the broker does.
        return [TopicPartition(TOPIC, tp.partition, self.cluster.committed[tp.partition] if tp.partition in self.cluster.ever_committed else -1001)
                for tp in partitions]

    def seek(self, tp: TopicPartition) -> None:
        self._enter("seek", crash_here=False)
        if tp.partition in self.assignment_:
            # Logical offsets as librdkafka resolves them: OFFSET_BEGINNING (-2) and OFFSET_END (-1).
            offset = {-2: 0, -1: self.cluster.end(tp.partition)}.get(tp.offset, tp.offset)
            self.position[tp.partition] = offset

    def consumer_group_metadata(self) -> Any:
        return ("group", self.cluster.generation)

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        self._enter("list_topics", crash_here=False)
        return None

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        return (0, self.cluster.end(tp.partition))

    def close(self) -> None:
        self._enter("close", crash_here=False)
        self.closed = True
        self._unassign(list(self.assignment_))


@dataclass
class _Pending:
    output: Output
    on_delivery: Callable[[KafkaError | None, Any], None]
    polls_left: int


class SimProducer(_Client):
    """Deliveries are reported on poll()/flush(). Under exactly-once, acknowledged outputs count only once their
    transaction commits."""

    def __init__(self, cluster: SimCluster, life: Life, consumer: SimConsumer, transactional: bool) -> None:
        super().__init__(cluster, life, "producer")
        self.consumer = consumer
        self.transactional = transactional
        self.pending: list[_Pending] = []
        self.in_txn = False
        self.txn_outputs: list[Output] = []
        self.txn_offsets: dict[int, int] = {}
        self.commit_retry = False  # a commit_transaction timed out: only commit_transaction is accepted now
        self.fenced = False
        self.produced = 0

    def _txn_state(self, call: str) -> None:
        if self.fenced:
            raise KafkaException(KafkaError(KafkaError._FENCED, "simulated: fenced", fatal=True))
        if self.commit_retry:
            self.cluster.violation("protocol", f"{call}() after a timed-out commit_transaction (only commit_transaction is accepted)")
            raise KafkaException(KafkaError(KafkaError._STATE, f"{call}: commit_transaction must be retried"))

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None, on_delivery: Any = None) -> None:
        n = self._enter("produce")
        hdrs = list(headers or [])
        size = len(key or b"") + len(value or b"") + sum(len(k.encode()) + len(v or b"") for k, v in hdrs)
        if size > MAX_MESSAGE_BYTES:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, f"Message size too large ({size})"))
        if self.transactional:
            self._txn_state("produce")
            if not self.in_txn:
                self.cluster.violation("protocol", "produce() outside a transaction")
                raise KafkaException(KafkaError(KafkaError._STATE, "no transaction"))
        self.produced += 1
        delay = _rng(self.plan.seed, "delivery-delay", self.life.number, n).randint(0, 2)
        self.pending.append(_Pending(Output(topic, key, value, hdrs), on_delivery, delay))

    def poll(self, timeout: float = 0) -> int:
        n = self._enter("poll")
        served = self._deliver(n, force=False)
        if not served and timeout and timeout > 0:
            time.sleep(min(timeout, 0.001))
        return served

    def flush(self, timeout: float = 0) -> int:
        n = self._enter("flush")
        self._deliver(n, force=True)
        return len(self.pending)

    def _deliver(self, n: int, force: bool) -> int:
        ready = [d for d in self.pending if force or d.polls_left <= 0]
        for d in self.pending:
            d.polls_left -= 1
        self.pending = [d for d in self.pending if d not in ready]
        for i, d in enumerate(ready):
            if self._decide("delivery", "deliver", f"{n}.{i}"):
                timed_out = _rng(self.plan.seed, "delivery-kind", self.life.number, n, i).random() < 0.5
                code = KafkaError._MSG_TIMED_OUT if timed_out else KafkaError.NOT_ENOUGH_REPLICAS
                d.on_delivery(KafkaError(code, "simulated delivery failure", retriable=not timed_out), None)
                continue
            if self.transactional:
                self.txn_outputs.append(d.output)
            else:
                self.cluster.publish([d.output], self.tag)
            d.on_delivery(None, None)
        return len(ready)

    def crashed(self) -> None:
        """The process died: an un-acknowledged delivery may or may not have reached the broker; an open
        transaction is aborted by the next init_transactions."""
        for i, d in enumerate(self.pending):
            if not self.transactional and _rng(self.plan.seed, "reached", self.life.number, i).random() < 0.5:
                self.cluster.publish([d.output], self.tag)
        self.pending = []
        self.txn_outputs = []

    def tag(self, partition: int) -> tuple[int, int | None]:
        return self.life.number, self.consumer.epoch.get(partition)

    # transactions ---------------------------------------------------------------------------------------
    def init_transactions(self, timeout: float) -> None:
        self._enter("init_transactions", crash_here=False)

    def begin_transaction(self) -> None:
        self._enter("begin_transaction")
        self._txn_state("begin_transaction")
        if self.in_txn:
            self.cluster.violation("protocol", "begin_transaction() inside a transaction")
        self.in_txn, self.txn_outputs, self.txn_offsets = True, [], {}

    def _txn_fault(self, call: str, n: int) -> None:
        if self._decide("fence", call, n):
            self.fenced = True
            raise KafkaException(KafkaError(KafkaError._FENCED, "simulated: producer fenced", fatal=True))
        if self._decide("txn_abort", call, n):
            raise KafkaException(KafkaError(KafkaError._STATE, f"simulated abortable error in {call}", txn_requires_abort=True))

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], group: Any, timeout: float) -> None:
        n = self._enter("send_offsets_to_transaction")
        self._txn_state("send_offsets_to_transaction")
        self._txn_fault("send_offsets_to_transaction", n)
        if group != self.consumer.consumer_group_metadata():
            raise KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION, "stale group metadata", txn_requires_abort=True))
        self.consumer.check_owned(offsets, "send_offsets_to_transaction")
        for tp in offsets:
            self.txn_offsets[tp.partition] = tp.offset

    def commit_transaction(self, timeout: float) -> None:
        n = self._enter("commit_transaction")
        if self.fenced:
            raise KafkaException(KafkaError(KafkaError._FENCED, "simulated: fenced", fatal=True))
        if not self.in_txn:
            self.cluster.violation("protocol", "commit_transaction() outside a transaction")
            raise KafkaException(KafkaError(KafkaError._STATE, "no transaction"))
        if not self.commit_retry:
            self._txn_fault("commit_transaction", n)
            if self._decide("txn_timeout", "commit_transaction", n):
                self.commit_retry = True
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "simulated commit_transaction timeout", retriable=True))
        self._deliver(n, force=True)  # commit_transaction flushes
        self.commit_retry = False
        self.in_txn = False
        self.cluster.publish(self.txn_outputs)
        for p, o in self.txn_offsets.items():
            self.cluster.committed[p] = o
            self.cluster.ever_committed.add(p)
        self.txn_outputs, self.txn_offsets = [], {}

    def abort_transaction(self, timeout: float) -> None:
        self._enter("abort_transaction", crash_here=False)
        self._txn_state("abort_transaction")
        self.pending, self.txn_outputs, self.txn_offsets, self.in_txn = [], [], {}, False


class Hangs:
    """Engine calls blocked until the harness releases them (by deadline, or at teardown)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[tuple[float, threading.Event]] = []

    def block(self, seconds: float) -> None:
        event = threading.Event()
        with self._lock:
            self._waiting.append((time.monotonic() + seconds, event))
        event.wait(120)

    def release_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            keep = []
            for deadline, event in self._waiting:
                if everything or now >= deadline:
                    event.set()
                else:
                    keep.append((deadline, event))
            self._waiting = keep


class SimEngine(ExtractiveEngine):
    """The extractive engine with faults per generate() call (continuous mode's step() calls generate() for the
    requests that finish, so step() fails, hangs or slows the same way). A fault lasts a spell of 2-4 calls, so
    the probe (the warm-up prompt, through generate()) sometimes fails with the batch. Poison events always fail."""

    def __init__(self, plan: Plan, life: Life, hangs: Hangs) -> None:
        super().__init__()
        self.plan = plan
        self.life = life
        self.hangs = hangs
        self.calls = 0
        self._spell: tuple[str, int] | None = None  # kind, calls left

    def _fault(self) -> str | None:
        if self.calls == 1:
            return None  # the warm-up
        if self._spell is not None:  # a spell runs its course, also past the end of the fault phase
            kind, left = self._spell
            self._spell = (kind, left - 1) if left > 1 else None
            return kind
        if not self.plan.faults_on:
            return None
        for kind in ("engine_raise", "engine_error", "engine_empty", "engine_count", "engine_hang"):
            # Engine calls are few (one per batch or step that finishes something): faults land on them more often.
            if self.plan.fault(kind, self.life.number, "engine", self.calls, scale=ENGINE_SCALE):
                # At least two calls: a fault of exactly one call that strikes an event's last retry alone, with
                # the known-good probe passing in the calls just before and after it, looks exactly like that event's
                # own failure to any bounded retry policy (the worker probes before and after that retry).
                length = _rng(self.plan.seed, "spell", self.life.number, self.calls).randint(2, 4)
                self._spell = (kind, length - 1) if length > 1 else None
                return kind
        return None

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation | EventGenerationError]:
        self.calls += 1
        fault = self._fault()
        rng = _rng(self.plan.seed, "engine-detail", self.life.number, self.calls)
        # Slowness comes on top of any other fault (a slow call that then fails, say), in spells of its own.
        if self.plan.faults_on and self.calls > 1 and self.plan.fault("engine_slow", self.life.number, "engine-slow", self.calls, scale=2 * ENGINE_SCALE):
            time.sleep(rng.uniform(0.1, 0.6))
        if fault == "engine_hang":
            self.hangs.block(SHORT_HANG_S if rng.random() < 0.7 else 3600.0)
        if fault == "engine_raise":
            raise RuntimeError("simulated CUDA error")
        if any(p.event.event_id.startswith("poison") for p in prompts):
            raise RuntimeError("simulated: the engine fails on this event")
        out = super().generate(prompts)
        if fault == "engine_error":
            return [EventGenerationError("simulated engine failure") for _ in prompts]
        if fault == "engine_empty":
            return [Generation("", "length", p.prompt_tokens, 0) for p in prompts]
        if fault == "engine_count":
            return out[:-1] if rng.random() < 0.5 else out + out[:1]
        return out


@dataclass
class Result:
    seed: int
    mode: str
    guarantee: str
    violations: list[Violation]
    ticks: int
    restarts: int
    seconds: float
    events: list[str] = field(default_factory=list)

    def replay(self) -> str:
        prefix = "".join(f"{name}={os.environ[name]} " for name in ("SIM_FAULTS_ONLY", "SIM_FAULTS_OFF") if os.environ.get(name))
        return f"{prefix}SIM_SEED={self.seed} .venv/bin/python -m pytest tests/simulation -k '{self.mode} and {self.guarantee}'"


def sim_settings(mode: str, guarantee: str) -> Settings:
    values: dict[str, Any] = {
        "generation_mode": mode, "processing_guarantee": guarantee, "kafka_input_topic": TOPIC, "kafka_output_topic": OUT,
        "kafka_dlq_topic": DLQ, "batch_max_wait_ms": 0, "batch_max_records": BATCH_MAX_RECORDS, "shutdown_timeout_s": 0.5,
        "infrastructure_retry_timeout_s": 1.2, "broker_unavailable_timeout_s": 1.2, "delivery_timeout_ms": 1000,
        "produce_max_attempts": 3, "log_level": "WARNING", "engine_call_timeout_s": ENGINE_CALL_TIMEOUT_S,
    }
    if guarantee == "exactly_once":
        values["transactional_id_suffix"] = "sim"
    if mode == "continuous":
        values["continuous_max_uncommitted"] = CONTINUOUS_MAX_UNCOMMITTED
    return load_settings(**values)


class Simulation:
    def __init__(self, seed: int, mode: str, guarantee: str, enabled: frozenset[str] = FAULT_KINDS) -> None:
        self.seed, self.mode, self.guarantee = seed, mode, guarantee
        self.transactional = guarantee == "exactly_once"
        self.plan = Plan(seed, enabled, self.transactional)
        rng = _rng(seed, "shape")
        self.cluster = SimCluster(seed, self.plan, partitions=rng.randint(1, 3), per_partition=rng.randint(4, 10))
        self.cooperative = rng.random() < 0.5
        self.settings = sim_settings(mode, guarantee)
        self.dup_bound = BATCH_MAX_RECORDS if mode == "micro_batch" else CONTINUOUS_MAX_UNCOMMITTED
        self.hangs = Hangs()
        self.ticks = 0
        self.quiet_since: tuple[int, float] | None = None
        self.last_tick = time.monotonic()
        self.life: Life | None = None
        self.worker: Worker | None = None
        self.checked = {p: 0 for p in range(self.cluster.partitions)}
        self.events: list[str] = []
        self.finished = False
        self.started = time.monotonic()
        self.max_gap = 0.0

    # -------------------------------------------------------------------------------------------- ticks
    def _check(self) -> None:
        for p, committed in self.cluster.committed.items():
            while self.checked[p] < committed:
                o = self.checked[p]
                if (p, o) not in self.cluster.covered:
                    kind = self.cluster.log[p][o].hostile
                    self.cluster.violation("loss", f"{p}@{o}{' (' + kind + ')' if kind else ''} committed without a summary or dead letter")
                self.checked[p] += 1

    def _until(self) -> bool:
        now = time.monotonic()
        gap = now - self.last_tick
        self.max_gap = max(self.max_gap, gap) if self.ticks else self.max_gap
        if self.ticks and gap > RESPONSIVE_S:
            self.cluster.violation("responsiveness", f"the polling thread was blocked {gap:.1f} s > {RESPONSIVE_S} s between two steps")
        self.last_tick = now
        self.ticks += 1
        assert self.life is not None
        if self.life.dead:
            raise SimCrash("abandoned")
        self._check()
        if self.cluster.written < self.cluster.to_write and _rng(self.seed, "write", self.ticks).random() < WRITE_RATE:
            self.cluster.append()
        if self.plan.faults_on and (self.ticks >= FAULT_TICKS or now - self.started > FAULT_S):
            while self.cluster.written < self.cluster.to_write:
                self.cluster.append()
            self.plan.faults_on = False
            self.quiet_since = (self.ticks, now)
        if self.plan.crash_allowed() and self.plan.fault("crash", self.life.number, "tick", self.ticks) and _rng(self.seed, "crash-tick", self.ticks).random() < 0.1:
            self.plan.crashes += 1
            self.life.dead = True
            self.hangs.release_due(everything=True)  # the dead process's engine calls end with it
            raise SimCrash(f"crashed at tick {self.ticks}")
        if self.cluster.all_committed() and not self.plan.faults_on and self.cluster.written >= self.cluster.to_write:
            self.finished = True
            return True
        if self.quiet_since is not None and (self.ticks - self.quiet_since[0] > QUIET_TICKS or now - self.quiet_since[1] > QUIET_S):
            self.hangs.release_due(everything=True)  # liveness has failed: let the stop be quick
            return True
        return False

    # --------------------------------------------------------------------------------------------- run
    def _start_worker(self, number: int) -> tuple[Worker, SimConsumer, SimProducer]:
        self.life = Life(number)
        consumer = SimConsumer(self.cluster, self.life, self.cooperative)
        producer = SimProducer(self.cluster, self.life, consumer, self.transactional)
        engine = SimEngine(self.plan, self.life, self.hangs)
        overrides = {"partition.assignment.strategy": "cooperative-sticky"} if self.cooperative else None
        worker = Worker(self.settings, engine, consumer=consumer, producer=producer, codec=CODEC, consumer_overrides=overrides)
        return worker, consumer, producer

    def _run_one(self, worker: Worker) -> tuple[str, Any]:
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["code"] = worker.run(until=self._until)
            except SimCrash as exc:
                outcome["crash"] = exc
            except BaseException as exc:  # noqa: BLE001 - an unexpected exception ends the process: a finding
                outcome["exception"] = exc

        self.last_tick = time.monotonic()
        thread = threading.Thread(target=target, name=f"sim-worker-{self.seed}", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.02)
            assert self.life is not None
            if self.life.dead:  # crashed: the dead process's engine calls end with it, and its clean-up is not polling
                self.hangs.release_due(everything=True)
                continue
            self.hangs.release_due()
            blocked = time.monotonic() - self.last_tick
            if blocked > STUCK_S:
                self.cluster.violation("responsiveness", f"the polling thread was blocked > {STUCK_S:.0f} s: worker abandoned")
                self.life.dead = True
                self.hangs.release_due(everything=True)
                thread.join(5)
                return "stuck", None
        if "crash" in outcome:
            return "crash", outcome["crash"]
        if "exception" in outcome:
            return "exception", outcome["exception"]
        return "exit", outcome.get("code")

    def run(self) -> Result:
        started = self.started = time.monotonic()
        restarts = 0
        quiet_restarts = 0
        number = 0
        try:
            while True:
                number += 1
                worker, consumer, producer = self._start_worker(number)
                how, detail = self._run_one(worker)
                assert self.life is not None
                self.life.dead = True
                self._check()
                if how == "exit" and detail == 0:  # until() said stop: everything committed, or liveness ran out
                    if not self.finished:
                        ends = {p: self.cluster.end(p) for p in self.cluster.log}
                        self.cluster.violation("liveness", f"not everything committed {QUIET_TICKS} ticks / {QUIET_S:.0f} s after the "
                                                           f"faults stopped: committed {self.cluster.committed}, ends {ends}")
                    break
                label = {"crash": "crash", "exception": f"unexpected {type(detail).__name__}: {str(detail)[:160]}",
                         "exit": f"exit {detail}", "stuck": "stuck"}[how]
                self.events.append(f"tick {self.ticks}: {label}")
                if how == "stuck":
                    break
                if how in ("crash", "exception"):
                    producer.crashed()
                if how == "crash":
                    self._check_duplicates(consumer)
                if how == "exception":
                    # No injected fault raises an Exception out of run(): the documented families end it with an exit code.
                    frames = traceback.extract_tb(detail.__traceback__) if isinstance(detail, BaseException) else []
                    where = next((f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames)
                                  if "/processor/" in f.filename), "")
                    self.cluster.violation("crash", f"run() raised {type(detail).__name__}: {str(detail)[:160]}"
                                           + (f" (at {where})" if where else ""))
                restarts += 1
                if not self.plan.faults_on:
                    quiet_restarts += 1
                    if quiet_restarts > 2:
                        self.cluster.violation("liveness", f"the worker keeps ending after the faults stopped ({label})")
                        break
                if restarts > MAX_RESTARTS or time.monotonic() - started > MAX_SCHEDULE_S:
                    self.cluster.violation("liveness", f"{restarts} restarts / {time.monotonic() - started:.0f} s without finishing (last: {label})")
                    break
        finally:
            self.hangs.release_due(everything=True)
        self._check()
        return Result(self.seed, self.mode, self.guarantee, self.cluster.violations, self.ticks, restarts, time.monotonic() - started, self.events)

    def _check_duplicates(self, consumer: SimConsumer) -> None:
        """What the crash leaves published but uncommitted, of the crashed worker's current assignment (records
        published under an earlier assignment and not committed are a rebalance's duplicates, not the crash's)."""
        assert self.life is not None
        redo = [(p, o) for (p, o), tag in self.cluster.published_by.items()
                if o >= self.cluster.committed[p] and tag == (self.life.number, consumer.epoch.get(p))]
        if len(redo) > self.dup_bound:
            self.cluster.violation("duplicates", f"a crash leaves {len(redo)} published records uncommitted (to be re-processed) > "
                                                 f"{self.dup_bound}")


def run_schedule(seed: int, mode: str, guarantee: str, enabled: frozenset[str] = FAULT_KINDS) -> Result:
    return Simulation(seed, mode, guarantee, enabled).run()


def signature(violation: Violation) -> str:
    """A violation's class for grouping: its kind and its message with the numbers left out."""
    return violation.kind + ": " + re.sub(r"\{[^}]*\}|\d+(\.\d+)?", "N", violation.message)


def _classes(spec: str | None) -> list[str]:
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    unknown = [n for n in names if not any(k.startswith(n) for k in FAULT_KINDS)]
    if unknown:
        raise ValueError(f"unknown fault classes {unknown}; known: {sorted(FAULT_KINDS)}")
    return names


def enabled_kinds(off: str | None, only: str | None = None) -> frozenset[str]:
    """The fault classes a run uses: those named in `only` (SIM_FAULTS_ONLY; all when empty) less those in `off`
    (SIM_FAULTS_OFF). Both are comma-separated; a prefix such as `engine_` or `hostile_` names every class it starts."""
    off_names, only_names = _classes(off), _classes(only)
    return frozenset(k for k in FAULT_KINDS
                     if not any(k.startswith(n) for n in off_names) and (not only_names or any(k.startswith(n) for n in only_names)))


def report(results: Sequence[Result]) -> str:
    """Violations grouped by class, each with the first seed that shows it and the command that replays it."""
    groups: dict[str, list[Result]] = {}
    for result in results:
        for sig in dict.fromkeys(signature(v) for v in result.violations):
            groups.setdefault(sig, []).append(result)
    lines = []
    for sig, hits in sorted(groups.items(), key=lambda item: (item[0].split(":")[0], -len(item[1]))):
        first = hits[0]
        example = next(v.message for v in first.violations if signature(v) == sig)
        lines.append(f"[{len(hits)} schedule(s)] {sig}\n    e.g. seed {first.seed} ({first.mode}, {first.guarantee}): {example}\n"
                     f"    replay: {first.replay()}")
    return "\n".join(lines)


def quiet_logs() -> int:
    """The worker logs every injected fault; the simulation reports violations instead. Returns the level it
    replaced, for a caller that restores it (tests that run after the simulation assert on the worker's log)."""
    logger = logging.getLogger("processor")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    return previous
