"""Kafka clients: the consumer's and producer's configuration, built in one place from the settings, and the
broker's health as the worker sees it (when did a broker last answer; fail after BROKER_UNAVAILABLE_TIMEOUT_S)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from processor.errors import BrokerUnavailableError
from processor.logs import client_log_filter
from processor.records import DEFAULT_MAX_RECORD_BYTES
from processor.settings import ProcessingGuarantee, Settings

log = logging.getLogger(__name__)
log.addFilter(client_log_filter())

PROBE_AFTER_S = 5.0
# While no broker answers, the cause is logged at the first failed probe and then this often: a wrong address or a
# broker that is not up yet must be named from the first minute, not minutes later by the exit.
UNANSWERED_REPORT_EVERY_S = 15.0


def consumer_config(settings: Settings, error_cb: Callable[[KafkaError], None] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    conf: dict[str, Any] = {
        **settings.kafka_common(),
        "group.id": settings.kafka_group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": settings.kafka_auto_offset_reset,
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": settings.kafka_heartbeat_interval_ms,
        "max.poll.interval.ms": settings.kafka_max_poll_interval_ms,
        # Downstream read_committed consumers are the point of exactly-once; read the input the same way.
        "isolation.level": "read_committed",
    }
    if error_cb is not None:
        conf["error_cb"] = error_cb
    conf.update(overrides or {})
    return conf


def producer_config(settings: Settings, error_cb: Callable[[KafkaError], None] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    conf: dict[str, Any] = {
        **settings.kafka_common(),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        # Summaries are text and dead letters carry the input's bytes: compression keeps both well under the
        # broker's size limit; a dead letter still too large goes out without its value (records.py).
        "compression.type": "zstd",
        "message.max.bytes": DEFAULT_MAX_RECORD_BYTES,
        "message.timeout.ms": settings.delivery_timeout_ms,
    }
    if settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE:
        conf["transactional.id"] = f"{settings.kafka_group_id}-{settings.kafka_input_topic}-{settings.transactional_id_suffix}"
        conf["transaction.timeout.ms"] = max(60_000, settings.delivery_timeout_ms)  # librdkafka: ≥ message.timeout.ms
    if error_cb is not None:
        conf["error_cb"] = error_cb
    conf.update(overrides or {})
    return conf


def max_record_bytes(producer_conf: dict[str, Any]) -> int:
    return int(producer_conf.get("message.max.bytes", DEFAULT_MAX_RECORD_BYTES))


def is_cooperative(consumer_conf: dict[str, Any]) -> bool:
    return "cooperative" in str(consumer_conf.get("partition.assignment.strategy", ""))


def make_consumer(conf: dict[str, Any]) -> Consumer:
    return Consumer(conf)


def make_producer(conf: dict[str, Any]) -> Producer:
    return Producer(conf)


class BrokerHealth:
    """When a broker last answered. Consumed records, acks and commits count; after PROBE_AFTER_S of silence a
    metadata request asks (at most once every PROBE_AFTER_S); while none answers, that is logged with the address,
    the setting and how long; past the timeout, BrokerUnavailableError (exit 3) instead of spinning forever."""

    def __init__(self, *, bootstrap: str, timeout_s: float, probe: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.bootstrap = bootstrap
        self.timeout_s = timeout_s
        self._probe = probe
        self._clock = clock
        self._last_ok = clock()
        self._probed_at: float | None = None
        self._probe_failed = False
        self._reported_at: float | None = None
        self.down = False

    @property
    def answering(self) -> bool:
        """False while the clients report every broker down or the last probe got no answer."""
        return not (self.down or self._probe_failed)

    def ok(self) -> None:
        self._last_ok = self._clock()
        if self.down or self._reported_at is not None:
            log.info("a broker at %s answers again", self.bootstrap)
        self.down = self._probe_failed = False
        self._reported_at = None

    def on_client_error(self, error: KafkaError) -> None:
        """librdkafka's error_cb: 'all brokers down' and transport errors mark the broker down (logged once a while)."""
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE):
            self.down = True
        # librdkafka repeats itself many times a second while a broker is away: the shared client filter
        # (processor.logs) deduplicates and rate-limits these lines together with librdkafka's own.
        log.warning("kafka client error", extra={"client_error": error.str()})

    def silent_for(self) -> float:
        return self._clock() - self._last_ok

    def check(self) -> None:
        silent = self.silent_for()
        now = self._clock()
        probed_lately = self._probed_at is not None and now - self._probed_at < PROBE_AFTER_S
        if silent < PROBE_AFTER_S or (probed_lately and silent <= self.timeout_s):
            return
        self._probed_at = now
        try:
            self._probe()
            self.ok()
        except KafkaException:
            self._probe_failed = True
            if silent > self.timeout_s:
                raise BrokerUnavailableError(
                    f"no broker at {self.bootstrap} answered for {silent:.0f} s (BROKER_UNAVAILABLE_TIMEOUT_S={self.timeout_s:g})"
                ) from None
            if self._reported_at is None or now - self._reported_at >= UNANSWERED_REPORT_EVERY_S:
                self._reported_at = now
                log.warning("no Kafka broker answers at %s (KAFKA_BOOTSTRAP_SERVERS) for %.0f s: retrying; the worker exits 3 "
                            "if none answers within BROKER_UNAVAILABLE_TIMEOUT_S=%g s", self.bootstrap, silent, self.timeout_s,
                            extra={"bootstrap": self.bootstrap, "silent_s": round(silent, 1)})
