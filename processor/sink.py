"""Sink: turns a generated batch into output records — one summary per event, one dead-letter record per failure —
produces them, and tracks the broker's acknowledgements so the loop commits a batch only once all of it is acked.

The producer is idempotent (acks=all); a record whose delivery fails is re-sent up to PRODUCE_MAX_ATTEMPTS times,
after which the batch is marked failed and the worker stops rather than skip data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from confluent_kafka import KafkaError, Message, Producer

from processor import __version__
from processor.batcher import Batch, BatchItem
from processor.engines.base import Generation
from processor.errors import OutputUnavailableError

log = logging.getLogger(__name__)

DLQ_HEADER_PREFIX = "dlq."


@dataclass(frozen=True)
class OutgoingRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    is_dead_letter: bool = False


@dataclass
class Publication:
    """The output of one batch on its way to the broker."""

    batch: Batch
    records: list[OutgoingRecord]
    pending: int = 0
    attempts: dict[int, int] = field(default_factory=dict)
    retry: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def acknowledged(self) -> bool:
        return self.pending == 0 and not self.retry and self.error is None


def dead_letter_headers(item: BatchItem, error: BaseException, now: datetime) -> list[tuple[str, bytes]]:
    source = item.source
    fields: dict[str, Any] = {
        "error_class": type(error).__name__,
        "error_message": str(error)[:4000] or type(error).__name__,
        "source_topic": source.topic,
        "source_partition": source.partition,
        "source_offset": source.offset,
        "source_timestamp_ms": source.timestamp_ms,
        "event_id": item.event_id,
        "processor_version": __version__,
        "failed_at": now.isoformat(timespec="milliseconds"),
    }
    headers = [(DLQ_HEADER_PREFIX + name, str(value).encode()) for name, value in fields.items() if value is not None]
    return headers + list(source.headers)  # keep the producer's own headers (trace ids) after ours


class Sink:
    def __init__(
        self,
        producer: Producer,
        encode_summary: Callable[[dict[str, Any]], bytes],
        output_topic: str,
        dlq_topic: str,
        engine_kind: str,
        model: str,
        prompt_version: str,
        max_attempts: int,
        on_delivered: Callable[[OutgoingRecord], None] | None = None,
    ) -> None:
        self.producer = producer
        self.encode_summary = encode_summary
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic
        self.engine_kind = engine_kind
        self.model = model
        self.prompt_version = prompt_version
        self.max_attempts = max_attempts
        self.on_delivered = on_delivered
        self._in_flight: list[Publication] = []

    def records_for(self, batch: Batch, results: Sequence[Generation | Exception]) -> list[OutgoingRecord]:
        """Summaries and dead letters for a batch; `results` lines up with batch.prompts."""
        now = datetime.now(timezone.utc)
        outcomes = iter(results)
        records: list[OutgoingRecord] = []
        for item in batch.items:
            outcome: Generation | BaseException = item.error if item.error is not None else next(outcomes)
            if isinstance(outcome, Generation):
                records.append(self._summary(item, outcome, now))
            else:
                records.append(
                    OutgoingRecord(self.dlq_topic, item.source.key, item.source.value, dead_letter_headers(item, outcome, now), True)
                )
        return records

    def publish(self, batch: Batch, records: list[OutgoingRecord]) -> Publication:
        publication = Publication(batch, records)
        for index in range(len(records)):
            self._produce(publication, index)
        self._in_flight.append(publication)
        return publication

    def service(self, timeout: float = 0.0) -> None:
        """Serve delivery reports and re-send what failed."""
        self.producer.poll(timeout)
        for publication in self._in_flight:
            while publication.retry and publication.error is None:
                self._produce(publication, publication.retry.pop())
        self._in_flight = [p for p in self._in_flight if p.pending or p.retry]

    def flush(self, timeout: float) -> bool:
        """Wait for outstanding deliveries (re-sending failures) until `timeout`; True when nothing is left."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            self.service(min(0.1, max(0.0, deadline - time.monotonic())))
        return not self._in_flight

    def _summary(self, item: BatchItem, generation: Generation, now: datetime) -> OutgoingRecord:
        assert item.prompt is not None
        event = item.prompt.event
        source = item.source
        value = self.encode_summary(
            {
                "event_id": event.event_id,
                "query": event.query,
                "summary": generation.text.strip(),
                "language": item.prompt.language,
                "engine": self.engine_kind,
                "model": self.model,
                "prompt_version": self.prompt_version,
                "finish_reason": generation.finish_reason,
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
                "results_used": item.prompt.results_used,
                "results_truncated": item.prompt.results_truncated,
                "source_topic": source.topic,
                "source_partition": source.partition,
                "source_offset": source.offset,
                "collected_at": event.collected_at,
                "processed_at": now,
                "processor_version": __version__,
            }
        )
        # Same key as the input, so per-key order and partitioning hold downstream.
        key = source.key if source.key is not None else event.event_id.encode()
        return OutgoingRecord(self.output_topic, key, value, [("event_id", event.event_id.encode())])

    def _produce(self, publication: Publication, index: int) -> None:
        record = publication.records[index]
        publication.attempts[index] = publication.attempts.get(index, 0) + 1
        publication.pending += 1

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            publication.pending -= 1
            if err is None:
                if self.on_delivered:
                    self.on_delivered(record)
                return
            if publication.attempts[index] >= self.max_attempts or not err.retriable() and err.fatal():
                publication.error = f"{record.topic}: {err.str()} after {publication.attempts[index]} attempt(s)"
                log.error("delivery failed for good: %s", publication.error)
            else:
                log.warning("delivery to %s failed (%s); re-sending, attempt %d", record.topic, err.str(), publication.attempts[index] + 1)
                publication.retry.append(index)

        while True:
            try:
                self.producer.produce(record.topic, record.value, record.key, headers=record.headers, on_delivery=delivered)
                return
            except BufferError:
                # Local queue full: serve delivery reports to make room rather than drop the record.
                self.producer.poll(0.05)

