"""Broken infrastructure is never blamed on the records: a GPU that dies mid-run and a Schema Registry that is
down (a closed port) must not dead-letter anything or commit past the failure; the worker retries with backoff,
then exits with the documented code (5: engine, 6: registry), and a healthy restart processes everything."""

from __future__ import annotations

import socket
import time
from collections import Counter

import pytest

from processor.errors import EXIT_ENGINE_FAILED, EXIT_REGISTRY_UNAVAILABLE
from tests.fault.test_crash_and_stop import worker_env
from tests.helpers import committed_offsets, create_topics, end_offsets, make_event, produce, read_all

pytestmark = pytest.mark.broker


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_a_gpu_dying_mid_run_exits_5_with_nothing_dead_lettered_and_a_restart_does_the_rest(broker, topics, workers, figures):
    create_topics(broker, topics, partitions=1)
    placements = produce(broker, topics["input"], [make_event(i) for i in range(40)])
    # warm-up + 2 batches of 10 work, then every generate() raises (the probe too)
    env = worker_env(broker, topics, BATCH_MAX_RECORDS=10, FAULT_DIE_AFTER_CALLS=3, INFRASTRUCTURE_RETRY_TIMEOUT_S=3)
    started = time.monotonic()
    process = workers.start(env, name="gpu-dies")
    code = process.wait(120)
    seconds = time.monotonic() - started
    dead = read_all(broker, topics["dlq"], dead_letters=True, idle=1.0)
    committed = committed_offsets(broker, topics["group"], topics["input"], 1)
    figures["gpu_dies_mid_run"] = {"events": 40, "exit_code": code, "dead_lettered": len(dead), "committed": sum(committed.values()),
                                   "seconds_to_exit": round(seconds, 1)}
    assert code == EXIT_ENGINE_FAILED, workers.log_of(0)[-3000:]
    assert dead == [], "a dead GPU must not drain the topic into the DLQ"
    published = read_all(broker, topics["output"], idle=1.0)
    assert sum(committed.values()) == len(published) < 40, "what was summarised before the failure, nothing past it"
    if env["GENERATION_MODE"] == "micro_batch":
        assert len(published) == 20, "the two batches before the failure"
    restart = workers.start(worker_env(broker, topics, BATCH_MAX_RECORDS=10), name="gpu-back")
    deadline = time.monotonic() + 90
    while committed_offsets(broker, topics["group"], topics["input"], 1) != end_offsets(placements) and time.monotonic() < deadline:
        time.sleep(0.5)
    restart.terminate()
    assert restart.wait(60) == 0
    counts = Counter(s["event_id"] for s in read_all(broker, topics["output"], idle=1.0))
    assert len(counts) == 40 and max(counts.values()) == 1


def test_an_unreachable_schema_registry_exits_6_and_dead_letters_nothing(broker, topics, workers, figures):
    from confluent_kafka import Producer

    create_topics(broker, topics, partitions=1)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for n in range(10):  # Schema Registry framing: magic 0, schema id 1, then an Avro body
        producer.produce(topics["input"], b"\x00\x00\x00\x00\x01" + b"\x02x" * 20, f"k{n}".encode())
    assert producer.flush(10) == 0
    env = worker_env(broker, topics, SCHEMA_REGISTRY_URL=f"http://127.0.0.1:{closed_port()}", INFRASTRUCTURE_RETRY_TIMEOUT_S=3)
    started = time.monotonic()
    process = workers.start(env, name="registry-down")
    code = process.wait(120)
    dead = read_all(broker, topics["dlq"], dead_letters=True, idle=1.0)
    committed = committed_offsets(broker, topics["group"], topics["input"], 1)
    figures["registry_down"] = {"records": 10, "exit_code": code, "dead_lettered": len(dead), "committed": sum(committed.values()),
                                "seconds_to_exit": round(time.monotonic() - started, 1)}
    assert code == EXIT_REGISTRY_UNAVAILABLE, workers.log_of(0)[-3000:]
    assert dead == [] and committed == {}, "the registry's outage is not the records' fault"
