"""Broker health: while no broker answers, the worker names the cause (address, setting, how long) from the first
seconds, never a group-join hint; it keeps retrying and exits 3 after BROKER_UNAVAILABLE_TIMEOUT_S."""

from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from processor.clients import PROBE_AFTER_S, UNANSWERED_REPORT_EVERY_S, BrokerHealth
from processor.engines.extractive import ExtractiveEngine
from processor.errors import EXIT_BROKER_UNAVAILABLE, BrokerUnavailableError
from processor.loop import Worker
from processor.ops.broker import free_port
from processor.settings import load_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unanswered(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "no Kafka broker answers" in r.getMessage()]


def test_no_answer_is_reported_at_the_first_failed_probe_then_every_so_often_and_fails_after_the_timeout(caplog):
    clock, probes = Clock(), []

    def probe() -> None:
        probes.append(clock.now)
        raise KafkaException(KafkaError(KafkaError._TRANSPORT))

    health = BrokerHealth(bootstrap="127.0.0.1:1", timeout_s=60, probe=probe, clock=clock)
    caplog.set_level(logging.WARNING, logger="processor.clients")
    for _ in range(int(59 / 0.5)):  # a loop step every 0.5 s for 59 s
        clock.now += 0.5
        health.check()
    reports = unanswered(caplog)
    assert reports, "named within the first minute"
    first = reports[0].getMessage()
    assert "127.0.0.1:1" in first and "KAFKA_BOOTSTRAP_SERVERS" in first and "BROKER_UNAVAILABLE_TIMEOUT_S=60" in first
    assert "for 5 s" in first, "at the first failed probe"
    assert len(reports) == 1 + int((59 - PROBE_AFTER_S) // UNANSWERED_REPORT_EVERY_S), "then every UNANSWERED_REPORT_EVERY_S"
    assert all(b - a >= PROBE_AFTER_S for a, b in zip(probes, probes[1:])), "probes are spaced, not one per loop step"
    assert not health.answering
    clock.now += 2
    with pytest.raises(BrokerUnavailableError, match="BROKER_UNAVAILABLE_TIMEOUT_S=60"):
        health.check()


def test_an_answer_clears_it():
    clock, answers = Clock(), [False]

    def probe() -> None:
        if not answers[0]:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))

    health = BrokerHealth(bootstrap="b:9092", timeout_s=60, probe=probe, clock=clock)
    clock.now += PROBE_AFTER_S
    health.check()
    assert not health.answering
    answers[0] = True
    clock.now += PROBE_AFTER_S
    health.check()
    assert health.answering and health.silent_for() == 0


def test_a_worker_on_a_closed_port_names_the_broker_not_the_group_and_exits_3(caplog):
    """Real confluent-kafka clients against 127.0.0.1 on an unused port."""
    address = f"127.0.0.1:{free_port()}"
    settings = load_settings(kafka_bootstrap_servers=address, broker_unavailable_timeout_s=12, kafka_input_topic="in",
                             generation_mode="micro_batch")
    worker = Worker(settings, ExtractiveEngine())
    caplog.set_level(logging.INFO, logger="processor")  # whatever level an earlier suite left it at
    started, wall = time.monotonic(), time.time()
    deadline = started + 30
    code = worker.run(until=lambda: time.monotonic() > deadline)
    assert code == EXIT_BROKER_UNAVAILABLE and time.monotonic() - started < 16, "exit 3 after BROKER_UNAVAILABLE_TIMEOUT_S, as before"
    reports = unanswered(caplog)
    assert reports and address in reports[0].getMessage() and "KAFKA_BOOTSTRAP_SERVERS" in reports[0].getMessage()
    assert reports[0].created - wall < 8, "the cause is named in the first seconds"
    hints = [r for r in caplog.records if "no partitions assigned yet" in r.getMessage()]
    assert not hints, "no group-join hint while no broker answers"
