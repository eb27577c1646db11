"""Operator tools over a consumer group's offsets: lag, reset (replay) and a bounded backfill.

End offsets come from the broker's high watermarks: correct on Apache Kafka. (Tansu, the embedded test broker,
reports too low a watermark after multi-record batches; see ../shared/kafka-broker-here.md.)
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, TextIO

from confluent_kafka import OFFSET_INVALID, ConsumerGroupTopicPartitions, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient


class GroupActiveError(Exception):
    """The group has live members; stop its workers before moving its offsets."""


class OffsetLookupError(Exception):
    """The broker could not map a timestamp to an offset."""


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None
    end: int

    @property
    def lag(self) -> int:
        return self.end - (self.committed if self.committed is not None else 0)


def _consumer(common: dict[str, Any], group: str) -> Consumer:
    return Consumer({**common, "group.id": group, "enable.auto.commit": False})


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=10).topics[topic]
    if metadata.error is not None:
        raise RuntimeError(f"topic {topic}: {metadata.error.str()}")
    return sorted(metadata.partitions)


def group_lag(common: dict[str, Any], group: str, topic: str) -> list[PartitionLag]:
    consumer = _consumer(common, group)
    try:
        tps = [TopicPartition(topic, p) for p in _partitions(consumer, topic)]
        rows = []
        for tp in consumer.committed(tps, timeout=10):
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
            rows.append(PartitionLag(tp.partition, tp.offset if tp.offset >= 0 else None, high))
        return rows
    finally:
        consumer.close()


def format_lag(rows: list[PartitionLag], group: str, topic: str) -> str:
    lines = [f"group {group} on {topic}", f"{'partition':>9} {'committed':>12} {'end':>12} {'lag':>10}"]
    for row in rows:
        committed = "-" if row.committed is None else str(row.committed)
        lines.append(f"{row.partition:>9} {committed:>12} {row.end:>12} {row.lag:>10}")
    lines.append(f"{'total':>9} {'':>12} {'':>12} {sum(r.lag for r in rows):>10}")
    return "\n".join(lines)


def group_activity(common: dict[str, Any], group: str) -> tuple[int, str]:
    """Live members and the group's state. A group is live when it has members or is in any state but Empty/Dead
    (some brokers, Tansu among them, describe a live group as Stable with no member list)."""
    from confluent_kafka import ConsumerGroupState

    admin = AdminClient(common)
    description = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    idle = description.state in (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD, ConsumerGroupState.UNKNOWN)
    return (len(description.members) or (0 if idle else 1)), description.state.name


def target_offsets(common: dict[str, Any], group: str, topic: str, to: str | int | datetime) -> dict[int, int]:
    """Per partition, the offset `to` means: 'earliest', 'latest', an offset, or a time."""
    consumer = _consumer(common, group)
    try:
        partitions = _partitions(consumer, topic)
        if isinstance(to, datetime):
            millis = int(to.timestamp() * 1000)
            found = consumer.offsets_for_times([TopicPartition(topic, p, millis) for p in partitions], timeout=10)
            result = {}
            for tp in found:
                if tp.error is not None:
                    raise OffsetLookupError(f"partition {tp.partition}: {tp.error}")
                # -1: no record at or after that time; the partition's end is where such records would start.
                result[tp.partition] = tp.offset if tp.offset >= 0 else consumer.get_watermark_offsets(tp, timeout=10)[1]
            return result
        result = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            result[p] = low if to == "earliest" else high if to == "latest" else min(max(int(to), low), high)
        return result
    finally:
        consumer.close()


def reset_offsets(common: dict[str, Any], group: str, topic: str, to: str | int | datetime) -> dict[int, int]:
    """Move the group's committed offsets, refusing while any worker of the group is alive."""
    members, state = group_activity(common, group)
    if members:
        raise GroupActiveError(f"group {group} is {state} with live member(s): stop its workers, then replay")
    offsets = target_offsets(common, group, topic, to)
    admin = AdminClient(common)
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p, o) for p, o in offsets.items()])
    admin.alter_consumer_group_offsets([request], request_timeout=30)[group].result()
    return offsets


class Progress:
    """A one-line progress bar on a terminal: records done, rate, ETA."""

    def __init__(self, total: int, out: TextIO = sys.stderr, width: int = 30) -> None:
        self.total, self.out, self.width = total, out, width
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.5:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        filled = int(self.width * done / self.total) if self.total else self.width
        eta_text = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        self.out.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {rate:8.1f} rec/s ETA {eta_text}")
        self.out.flush()


def backfill_done(start: dict[int, int], end: dict[int, int], committed: Callable[[], dict[int, int]]) -> tuple[int, bool]:
    """Records done so far and whether every partition reached the end captured at the start."""
    now = committed()
    done = sum(min(now.get(p, start[p]), end[p]) - start[p] for p in end)
    return done, all(now.get(p, start[p]) >= end[p] for p in end)
