"""Sink: delivery only. `add()` produces records, `poll()`/`flush()` serve the broker's acknowledgements, and the
first delivery failure that cannot be retried is latched and raised by `raise_for_error()` (quix-streams' sink and
producer do the same), so the worker stops rather than commit past an output that never arrived.

The producer is idempotent (acks=all): librdkafka retries inside `message.timeout.ms` and keeps order. A record
whose delivery still fails is re-sent up to PRODUCE_MAX_ATTEMPTS times; the sink then takes nothing new and waits
for every record in flight before it re-sends the failed ones in their original order, so per-key order holds.
A record the producer or the broker refuses as too large is handed to `shrink` (records.py sizes every output
before this, but a topic's own max.message.bytes may be lower): a dead letter comes back without its largest part,
a summary as its event's dead letter, each flagged, and is re-sent in its place; only when nothing is left to shrink
is the refusal latched. Refusing the same record on every restart would be a crash loop that never moves the partition.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

from confluent_kafka import KafkaError, KafkaException, Message

from processor.errors import OutputUnavailableError
from processor.records import OutgoingRecord

log = logging.getLogger(__name__)

_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE, getattr(KafkaError, "_MSG_SIZE_TOO_LARGE", KafkaError.MSG_SIZE_TOO_LARGE)}


class Sink:
    def __init__(
        self,
        *,
        producer: Any,
        max_attempts: int,
        on_acknowledged: Callable[[OutgoingRecord], None] | None = None,
        shrink: Callable[[OutgoingRecord], OutgoingRecord | None] = OutgoingRecord.smaller,
    ) -> None:
        self.producer = producer
        self.max_attempts = max_attempts
        self.on_acknowledged = on_acknowledged
        self.shrink = shrink
        self.in_flight = 0
        self.acknowledged = 0
        self._sequence = 0
        self._attempts: dict[int, int] = {}
        self._failed: dict[int, OutgoingRecord] = {}  # sequence → record to re-send once nothing is in flight
        self._error: str | None = None

    @property
    def accepting(self) -> bool:
        """False while failed records wait for a re-send: taking new ones then would break per-key order."""
        return not self._failed and self._error is None

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and not self._failed

    def add(self, records: Iterable[OutgoingRecord]) -> None:
        for record in records:
            self._sequence += 1
            self._produce(self._sequence, record)

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports; once nothing is in flight, re-send what failed, in order."""
        self.producer.poll(timeout)
        if self._failed and self.in_flight == 0 and self._error is None:
            failed, self._failed = self._failed, {}
            for sequence in sorted(failed):
                self._produce(sequence, failed[sequence])

    def flush(self, timeout: float, keep_alive: Callable[[], None] | None = None) -> bool:
        """Wait until every record is acknowledged (re-sending failures) or `timeout`; True when nothing is left.
        `keep_alive` runs between waits (the consumer's poll, so a long flush never costs group membership)."""
        deadline = time.monotonic() + timeout
        while not self.idle and self._error is None and time.monotonic() < deadline:
            self.poll(min(0.1, max(0.0, deadline - time.monotonic())))
            if keep_alive is not None:
                keep_alive()
        return self.idle and self._error is None

    def raise_for_error(self) -> None:
        if self._error is not None:
            raise OutputUnavailableError(self._error)

    def _produce(self, sequence: int, record: OutgoingRecord) -> None:
        self._attempts[sequence] = self._attempts.get(sequence, 0) + 1
        self.in_flight += 1

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            self.in_flight -= 1
            if err is None:
                self._attempts.pop(sequence, None)
                self.acknowledged += 1
                if self.on_acknowledged:
                    self.on_acknowledged(record)
                return
            smaller = self.shrink(record) if err.code() in _TOO_LARGE else None
            if smaller is not None:
                log.warning("%s refused the record for %s[%d]@%d as too large (%s): re-sent as %s",
                            record.topic, record.source.topic, record.source.partition, record.source.offset, err.str(),
                            _described(smaller))
                self._attempts[sequence] = 0  # a different record now: its own attempts
                self._failed[sequence] = smaller
                return
            attempts = self._attempts[sequence]
            if attempts >= self.max_attempts or err.fatal() or err.code() in _TOO_LARGE:
                if self._error is None:  # latch the first
                    self._error = f"{record.topic}: {err.str()} after {attempts} attempt(s)"
                    log.error("delivery failed for good: %s", self._error)
                return
            log.warning("delivery to %s failed (%s); re-sending, attempt %d", record.topic, err.str(), attempts + 1)
            self._failed[sequence] = record

        while True:
            try:
                self.producer.produce(record.topic, record.value, record.key, headers=record.headers, on_delivery=delivered)
                return
            except BufferError:
                # Local queue full: serve delivery reports to make room rather than drop the record.
                self.producer.poll(0.05)
            except KafkaException as exc:  # refused locally, before any delivery report (too large, say)
                self.in_flight -= 1
                error = exc.args[0]
                smaller = self.shrink(record) if error.code() in _TOO_LARGE else None
                if smaller is not None:
                    log.warning("record for %s[%d]@%d over the producer's size limit: sent as %s",
                                record.source.topic, record.source.partition, record.source.offset, _described(smaller))
                    self._attempts[sequence] = 0
                    self._produce(sequence, smaller)
                elif self._error is None:
                    self._error = f"{record.topic}: {error.str()}"
                    log.error("produce refused: %s", self._error)
                return


def _described(record: OutgoingRecord) -> str:
    kind = f"a dead letter ({record.reason})" if record.is_dead_letter else "a summary"
    return f"{kind} of {record.size} bytes" + (f" (shrunk: {', '.join(record.shrunk)})" if record.shrunk else "")
