"""What the Worker tells the operator about its progress: the running totals, consumer lag and engine busy/idle time
for metrics, the periodic progress line, dead letters and the final summary in the log. Split from loop.py so that
the consumer loop holds only the loop."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException, TopicPartition

from processor.checkpoint import TP, BaseCheckpoint, Ownership
from processor.clients import BrokerHealth
from processor.metrics import Metrics
from processor.pipeline import Pipeline
from processor.records import OutgoingRecord
from processor.settings import Settings

if TYPE_CHECKING:
    from processor.generation import BatchStats
    from processor.source import SourceRecord

log = logging.getLogger(__name__)

LAG_EVERY_S = 5.0
REPORT_EVERY_S = 10.0


class Progress:
    """The worker's totals and its periodic observations (lag, engine time, progress); every method is cheap enough
    to call once per loop step."""

    def __init__(self, settings: Settings, *, consumer: Any, pipeline: Pipeline, checkpoint: BaseCheckpoint,
                 ownership: Ownership, metrics: Metrics, health: BrokerHealth) -> None:
        self.settings = settings
        self.consumer = consumer
        self.pipeline = pipeline
        self.checkpoint = checkpoint
        self.ownership = ownership
        self.metrics = metrics
        self.health = health
        self.totals = {"consumed": 0, "summaries": 0, "dead_letters": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._lag_observed_at = 0.0
        self._idle_reported = self._busy_reported = 0.0
        self._reported_at = time.monotonic()
        self._unassigned_warned_at = time.monotonic()

    # ------------------------------------------------------------------------------------------------ events
    def consumed(self, source: SourceRecord) -> None:
        self.metrics.consumed((source.topic, source.partition))
        self.totals["consumed"] += 1

    def batch_done(self, stats: BatchStats) -> None:
        self.metrics.batch_done(stats)
        self.totals["prompt_tokens"] += stats.prompt_tokens
        self.totals["completion_tokens"] += stats.completion_tokens

    def acknowledged(self, record: OutgoingRecord) -> None:
        self.health.ok()
        self.metrics.acknowledged(record)
        self.totals["dead_letters" if record.is_dead_letter else "summaries"] += 1

    def committed(self, offsets: dict[TP, int], count: int) -> None:
        self.health.ok()
        for tp, offset in offsets.items():
            self.metrics.committed(tp, offset)
        log.debug("committed %d record(s): %s", count, offsets)

    def dead_letter(self, record: OutgoingRecord) -> None:
        log.warning("dead-lettered %s[%d]@%d: %s", record.source.topic, record.source.partition, record.source.offset, record.reason,
                    extra={"topic": record.source.topic, "partition": record.source.partition, "offset": record.source.offset,
                           "event_id": record.event_id, "error_class": record.reason,
                           "error_message": (record.error_message or "")[:500]})

    # ------------------------------------------------------------------------------------------- observation
    def observe_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_observed_at < LAG_EVERY_S:
            return
        self._lag_observed_at = now
        idle, busy = self.pipeline.idle_seconds, self.pipeline.busy_seconds
        self.metrics.engine_idle_for(max(0.0, idle - self._idle_reported))
        self.metrics.engine_busy_for(max(0.0, busy - self._busy_reported))
        self._idle_reported, self._busy_reported = idle, busy
        for topic, partition in self.ownership.partitions:
            try:
                # cached=True: the watermark the last fetch brought back; no extra request to the broker.
                _low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            committed = self.checkpoint.committed_offsets.get((topic, partition))
            if high >= 0 and committed is not None:
                self.metrics.lag_observed((topic, partition), high, committed)

    def report(self) -> None:
        now = time.monotonic()
        # The group hint only while brokers answer: with none answering, BrokerHealth names the real cause.
        if not self.ownership.partitions and now - self._unassigned_warned_at >= REPORT_EVERY_S and self.health.answering:
            self._unassigned_warned_at = now
            log.warning("no partitions assigned yet: waiting for group %s (a group join takes up to session.timeout.ms; "
                        "more workers than partitions leave some idle)", self.settings.kafka_group_id)
        if now - self._reported_at >= REPORT_EVERY_S:
            self._reported_at = now
            log.info("progress: %(consumed)d consumed, %(summaries)d summaries, %(dead_letters)d dead letters, "
                     "%(completion_tokens)d completion tokens", self.totals, extra={"in_flight": self.pipeline.in_flight()})

    def stopped(self, not_started: int) -> None:
        log.info("stopped: %(consumed)d consumed, %(summaries)d summaries, %(dead_letters)d dead letters published; "
                 "%(prompt_tokens)d prompt + %(completion_tokens)d completion tokens", self.totals,
                 extra={**self.totals, "committed": self.checkpoint.records_committed, "left_for_next_run": not_started})
