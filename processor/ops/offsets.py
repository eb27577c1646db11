"""Operator tools over a consumer group's offsets: lag, reset (replay) and a bounded backfill.

Where a partition ends is read from the records, not taken from the broker's high watermark alone:
* on transactional input the watermark counts the last commit marker, which no consumer ever receives, so a worker
  that has processed everything has committed one less than the watermark (lag 1 forever, a backfill that never
  completes); the end that matters is the offset after the last record a read_committed consumer receives;
* some brokers report an impossible watermark (Tansu: the last batch's base offset + 1, below records it holds).
So the end is found by reading the tail of each partition from just below the watermark up to the broker's
end-of-partition signal, looking further back only where the tail holds no record (markers, aborted records).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, TextIO

from confluent_kafka import ConsumerGroupTopicPartitions, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from processor.failures import CommandError
from processor.logs import StatusLine, open_status_line
from processor.ops.reachability import cluster_metadata, require_topic, translate

END_SCAN_TIMEOUT_S = 10.0
_MAX_LOOK_BACK = 1 << 20  # records read back past a tail of markers before giving up on finding the last record


class GroupActiveError(CommandError):
    """The group has live members; stop its workers before moving its offsets."""


class OffsetLookupError(CommandError):
    """The broker could not map a timestamp to an offset."""


@dataclass(frozen=True)
class PartitionEnd:
    partition: int
    low: int  # the first offset still held
    data_end: int  # after the last record a read_committed consumer receives: what a worker commits when done
    log_end: int  # where the next record will be written (markers included)
    watermark: int  # the high watermark the broker reported when asked (ListOffsets)
    exact: bool = True  # False: the tail could not be read in time; data_end is the watermark

    @property
    def impossible_watermark(self) -> bool:
        """The broker reported a high watermark below records it holds."""
        return self.log_end > self.watermark


def _scan_consumer(common: dict[str, Any]) -> Consumer:
    return Consumer(
        {
            **common,
            "group.id": "ai-worker-offsets",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 100,
        }
    )


def partition_ends(common: dict[str, Any], topic: str, partitions: list[int], floors: dict[int, int] | None = None) -> dict[int, PartitionEnd]:
    """Per partition, where its records end (see the module doc). `floors`: offsets below which nothing counts
    (a backfill's start); a partition without a record at or after its floor ends at the floor."""
    bootstrap = str(common.get("bootstrap.servers"))
    floors = floors or {}
    consumer = _scan_consumer(common)
    try:
        marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions}
    except KafkaException as exc:
        raise translate(exc, bootstrap) from None
    finally:
        consumer.close()
    floor = {p: max(low, floors.get(p, low)) for p, (low, _high) in marks.items()}
    start = {p: max(floor[p], high - 1) for p, (_low, high) in marks.items()}
    found: dict[int, PartitionEnd] = {}
    step = 1
    deadline = time.monotonic() + END_SCAN_TIMEOUT_S
    while len(found) < len(partitions) and time.monotonic() < deadline:
        todo = [p for p in partitions if p not in found]
        last, eof = _read_tails(common, topic, {p: start[p] for p in todo}, deadline)
        for p in todo:
            low, high = marks[p]
            if p not in eof:
                continue  # not answered before the deadline
            if p in last or start[p] <= floor[p] or step >= _MAX_LOOK_BACK:
                data_end = last[p] + 1 if p in last else floor[p]
                found[p] = PartitionEnd(p, low, max(data_end, floor[p]), max(eof[p], data_end), high)
            else:
                start[p] = max(floor[p], eof[p] - step * 8)  # only markers (or aborted records) here: look further back
        step *= 8
    for p in partitions:
        if p not in found:
            low, high = marks[p]
            found[p] = PartitionEnd(p, low, max(high, floor[p]), high, high, exact=False)
    return found


def _read_tails(common: dict[str, Any], topic: str, starts: dict[int, int], deadline: float) -> tuple[dict[int, int], dict[int, int]]:
    """Read each partition from its start to the end-of-partition signal: (last record offset, end offset) each."""
    consumer = _scan_consumer(common)
    last: dict[int, int] = {}
    eof: dict[int, int] = {}
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
        while len(eof) < len(starts) and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    eof[message.partition()] = message.offset()
                continue
            last[message.partition()] = max(last.get(message.partition(), -1), message.offset())
            eof.pop(message.partition(), None)  # records after an end signal: that end was not the end
    finally:
        consumer.close()
    return last, eof


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None
    end: int
    low: int = 0
    reported_end: int | None = None  # set when the broker's high watermark was impossible (below its records)

    @property
    def lag(self) -> int:
        # A commit past the last record (a client that commits its position past a transaction marker) is no lag.
        return max(0, self.end - (self.committed if self.committed is not None else self.low))


def _topic_partitions(client: Any, topic: str, bootstrap: str) -> list[int]:
    return require_topic(cluster_metadata(client, bootstrap), topic, "KAFKA_INPUT_TOPIC", bootstrap)


def group_lag(common: dict[str, Any], group: str, topic: str) -> list[PartitionLag]:
    bootstrap = str(common.get("bootstrap.servers"))
    consumer = Consumer({**common, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = _topic_partitions(consumer, topic, bootstrap)
        committed = {tp.partition: tp.offset for tp in consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)}
    except KafkaException as exc:
        raise translate(exc, bootstrap) from None
    finally:
        consumer.close()
    ends = partition_ends(common, topic, partitions)
    return [
        PartitionLag(
            p,
            committed[p] if committed.get(p, -1) >= 0 else None,
            ends[p].data_end,
            ends[p].low,
            ends[p].watermark if ends[p].impossible_watermark else None,
        )
        for p in partitions
    ]


def format_lag(rows: list[PartitionLag], group: str, topic: str) -> str:
    lines = [f"group {group} on {topic}", f"{'partition':>9} {'committed':>12} {'end':>12} {'lag':>10}"]
    notes = []
    for row in rows:
        committed = "-" if row.committed is None else str(row.committed)
        mark = " *" if row.reported_end is not None else ""
        lines.append(f"{row.partition:>9} {committed:>12} {row.end:>12} {row.lag:>10}{mark}")
        if row.reported_end is not None:
            notes.append(
                f"* partition {row.partition}: the broker reported high watermark {row.reported_end}, below the records it "
                f"holds; the end shown is the offset after its last record (read from the partition)"
            )
    lines.append(f"{'total':>9} {'':>12} {'':>12} {sum(r.lag for r in rows):>10}")
    return "\n".join(lines + notes)


def group_activity(common: dict[str, Any], group: str) -> tuple[int, str]:
    """Live members and the group's state. A group is live when it has members or is in any state but Empty/Dead
    (some brokers, Tansu among them, describe a live group as Stable with no member list)."""
    from confluent_kafka import ConsumerGroupState

    admin = AdminClient(common)
    try:
        description = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    except KafkaException as exc:
        raise translate(exc, str(common.get("bootstrap.servers"))) from None
    idle = description.state in (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD, ConsumerGroupState.UNKNOWN)
    return (len(description.members) or (0 if idle else 1)), description.state.name


def target_offsets(common: dict[str, Any], group: str, topic: str, to: str | int | datetime) -> dict[int, int]:
    """Per partition, the offset `to` means: 'earliest', 'latest' (where the next record goes), an offset
    (clamped to what the partition holds), or a time."""
    bootstrap = str(common.get("bootstrap.servers"))
    consumer = Consumer({**common, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = _topic_partitions(consumer, topic, bootstrap)
        if to == "earliest":
            return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[0] for p in partitions}
        if isinstance(to, datetime):
            millis = int(to.timestamp() * 1000)
            found = consumer.offsets_for_times([TopicPartition(topic, p, millis) for p in partitions], timeout=10)
            by_time = {}
            for tp in found:
                if tp.error is not None:
                    raise OffsetLookupError(f"partition {tp.partition}: {tp.error}")
                by_time[tp.partition] = tp.offset
    except KafkaException as exc:
        raise translate(exc, bootstrap) from None
    finally:
        consumer.close()
    ends = partition_ends(common, topic, partitions)
    if isinstance(to, datetime):
        # -1: no record at or after that time; the partition's end is where such records would start.
        return {p: by_time[p] if by_time[p] >= 0 else ends[p].log_end for p in partitions}
    if to == "latest":
        return {p: end.log_end for p, end in ends.items()}
    return {p: min(max(int(to), end.low), end.log_end) for p, end in ends.items()}


def reset_offsets(common: dict[str, Any], group: str, topic: str, to: str | int | datetime) -> dict[int, int]:
    """Move the group's committed offsets, refusing while any worker of the group is alive."""
    members, state = group_activity(common, group)
    if members:
        raise GroupActiveError(f"refused: group {group} is {state} with live member(s): stop its workers, then replay")
    offsets = target_offsets(common, group, topic, to)
    admin = AdminClient(common)
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p, o) for p, o in offsets.items()])
    try:
        admin.alter_consumer_group_offsets([request], request_timeout=30)[group].result()
    except KafkaException as exc:
        raise translate(exc, str(common.get("bootstrap.servers"))) from None
    return offsets


def backfill_ends(common: dict[str, Any], topic: str, start: dict[int, int]) -> dict[int, int]:
    """Where a backfill from `start` stops: per partition, the offset after its last record now (a worker has
    committed exactly that once it has processed everything up to there), never below the start."""
    return {p: end.data_end for p, end in partition_ends(common, topic, sorted(start), floors=start).items()}


class Progress:
    """Records done, rate and ETA: a bar redrawn in place on a terminal (log lines scroll above it), a plain line
    every few seconds elsewhere (a log file, a CI job)."""

    def __init__(self, total: int, out: TextIO = sys.stderr, width: int = 30, every_s: float | None = None) -> None:
        self.total, self.out, self.width = total, out, width
        self.started = time.monotonic()
        self._last = 0.0
        self._status: StatusLine | None = open_status_line(out) if _is_terminal(out) else None
        self.every_s = every_s if every_s is not None else (0.5 if self._status else 5.0)

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        filled = int(self.width * done / self.total) if self.total else self.width
        eta_text = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        text = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {rate:8.1f} rec/s ETA {eta_text}"
        if self._status is not None:
            self._status.show(text)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def close(self) -> None:
        if self._status is not None:
            self._status.close()


def _is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def backfill_done(start: dict[int, int], end: dict[int, int], committed: Callable[[], dict[int, int]]) -> tuple[int, bool]:
    """Records done so far and whether every partition reached the end captured at the start."""
    now = committed()
    done = sum(min(max(now.get(p, start[p]), start[p]), end[p]) - start[p] for p in end)
    return done, all(now.get(p, start[p]) >= end[p] for p in end)
