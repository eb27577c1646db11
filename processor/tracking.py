"""Offset tracking: every consumed record from the moment it is read until its offset is committed, and whose it is.

    pending ──(its summary or dead letter is built)──▶ finished ──(handed to the sink)──▶ released ──(acked)──▶ acked

Per partition only the contiguous prefix of acked offsets is committable, so work that finishes out of order
(continuous generation) never commits past a record whose output is not safely on the broker. Ownership rides
along: a partition's records carry the assignment epoch they were read under; after a revoke the partition's
track is dropped, and anything of the old epoch is neither released nor committed by this worker. Only the
checkpoint (checkpoint.py) uses the tracker; the loop asks the checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable

from processor.records import OutgoingRecord
from processor.source import TP, SourceRecord


class State(IntEnum):
    PENDING = 0
    FINISHED = 1
    RELEASED = 2
    ACKED = 3


@dataclass
class _Entry:
    source: SourceRecord
    state: State = State.PENDING
    record: OutgoingRecord | None = None


@dataclass
class _Partition:
    epoch: int
    entries: "OrderedDict[int, _Entry]" = field(default_factory=OrderedDict)  # offset → entry, in offset order
    committed: int | None = None  # the last offset this worker committed (next to read)
    unreleased: int = 0  # entries FINISHED and not yet released: releasable() skips a partition with none


class Ownership:
    """Assignment epochs: a record is this worker's only while its partition's epoch is the one it was read under."""

    def __init__(self) -> None:
        self._epochs: dict[TP, int] = {}
        self._counter = 0

    def assign(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._counter += 1
            self._epochs[tp] = self._counter

    def revoke(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._epochs.pop(tp, None)

    def epoch(self, tp: TP) -> int | None:
        return self._epochs.get(tp)

    def owns(self, source: SourceRecord) -> bool:
        return self._epochs.get((source.topic, source.partition)) == source.epoch

    @property
    def partitions(self) -> list[TP]:
        return sorted(self._epochs)


class OffsetTracker:
    """Per partition, the records read and not yet committed, each with its state, in offset order."""

    def __init__(self, ownership: Ownership) -> None:
        self.ownership = ownership
        self._partitions: dict[TP, _Partition] = {}

    def track(self, source: SourceRecord) -> None:
        tp = (source.topic, source.partition)
        partition = self._partitions.get(tp)
        if partition is None or partition.epoch != source.epoch:
            partition = self._partitions[tp] = _Partition(source.epoch)
        partition.entries[source.offset] = _Entry(source)

    def _entry(self, source: SourceRecord) -> _Entry | None:
        partition = self._partitions.get((source.topic, source.partition))
        if partition is None or partition.epoch != source.epoch or not self.ownership.owns(source):
            return None
        return partition.entries.get(source.offset)

    def finish(self, source: SourceRecord, record: OutgoingRecord) -> bool:
        """Attach a finished record's output; False when it is no longer this worker's (revoked meanwhile)."""
        entry = self._entry(source)
        if entry is None or entry.state is not State.PENDING:
            return False
        entry.state, entry.record = State.FINISHED, record
        self._partitions[(source.topic, source.partition)].unreleased += 1
        return True

    def acked(self, source: SourceRecord) -> None:
        entry = self._entry(source)
        if entry is not None and entry.state is State.RELEASED:
            entry.state = State.ACKED

    def releasable(self, in_offset_order: bool) -> list[OutgoingRecord]:
        """Finished outputs that may go to the sink now, marked released.

        `in_offset_order`: only each partition's finished prefix (exactly-once: a transaction must not carry an
        output whose offset it does not commit). Otherwise every finished output, except one whose key is shared
        with an earlier unfinished record of its partition, so that per-key order holds downstream.
        """
        out: list[OutgoingRecord] = []
        for tp, partition in self._partitions.items():
            if not partition.unreleased or self.ownership.epoch(tp) != partition.epoch:
                continue  # nothing finished waits here: no walk over its (up to four windows of) entries
            blocked_keys: set[bytes] = set()
            for entry in partition.entries.values():
                if entry.state is State.PENDING:
                    if in_offset_order:
                        break
                    if entry.source.key is not None:
                        blocked_keys.add(entry.source.key)
                    continue
                if entry.state is State.FINISHED:
                    if entry.source.key is not None and entry.source.key in blocked_keys:
                        continue
                    assert entry.record is not None
                    entry.state = State.RELEASED
                    partition.unreleased -= 1
                    out.append(entry.record)
        return out

    def committable(self, upto: State = State.ACKED) -> dict[TP, int]:
        """Per owned partition, the offset after its contiguous prefix of records in state ≥ `upto` (if any)."""
        offsets: dict[TP, int] = {}
        for tp, partition in self._partitions.items():
            if self.ownership.epoch(tp) != partition.epoch:
                continue
            end = None
            for offset, entry in partition.entries.items():
                if entry.state < upto:
                    break
                end = offset + 1
            if end is not None:
                offsets[tp] = end
        return offsets

    def committed(self, offsets: dict[TP, int]) -> int:
        """Forget what was committed; return how many records that was."""
        count = 0
        for tp, end in offsets.items():
            partition = self._partitions.get(tp)
            if partition is None:
                continue
            while partition.entries and next(iter(partition.entries)) < end:
                partition.entries.popitem(last=False)
                count += 1
            partition.committed = end
        return count

    def first_offsets(self) -> dict[TP, int]:
        """Per owned partition, the first offset read and not yet committed (where a rewind must start)."""
        return {tp: next(iter(p.entries)) for tp, p in self._partitions.items()
                if p.entries and self.ownership.epoch(tp) == p.epoch}

    def drop(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._partitions.pop(tp, None)

    def __len__(self) -> int:
        """Records read and not yet committed."""
        return sum(len(partition.entries) for partition in self._partitions.values())

    def counts(self) -> dict[State, int]:
        totals = {state: 0 for state in State}
        for partition in self._partitions.values():
            for entry in partition.entries.values():
                totals[entry.state] += 1
        return totals

    def uncommitted_published(self) -> int:
        counts = self.counts()
        return counts[State.RELEASED] + counts[State.ACKED]

    def last_committed(self) -> dict[TP, int]:
        return {tp: p.committed for tp, p in self._partitions.items() if p.committed is not None}
