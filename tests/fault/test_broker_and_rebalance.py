"""Broker stall (SIGSTOP/SIGCONT), a broker that stays away, and a three-worker rebalance."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter

import pytest

from tests.fault.test_crash_and_stop import worker_env
from tests.helpers import committed_offsets, create_topics, end_offsets, make_event, produce, read_all

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def read_trace(path) -> list[dict]:
    try:
        return [json.loads(line) for line in open(path)]
    except FileNotFoundError:
        return []


def wait_committed(broker, topics, partitions, ends, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if committed_offsets(broker, topics["group"], topics["input"], partitions) == ends:
            return True
        time.sleep(0.5)
    return False


def test_a_30_s_broker_stall_is_ridden_out_without_a_restart(own_broker, topics, workers, tmp_path, figures):
    create_topics(own_broker, topics, partitions=2)
    placements = produce(own_broker, topics["input"], [make_event(i) for i in range(3000)])
    trace = tmp_path / "trace.jsonl"
    process = workers.start(worker_env(own_broker, topics, FAULT_DELAY_S=0.1, FAULT_TRACE=trace, BATCH_MAX_RECORDS=20), name="stall")
    deadline = time.monotonic() + 60
    while len(read_trace(trace)) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    own_broker.embedded.pause()
    time.sleep(30)
    resumed = time.time()
    own_broker.embedded.resume()
    assert wait_committed(own_broker, topics, 2, end_offsets(placements), 240), "caught up after the stall"
    assert process.poll() is None, "the worker rode out the stall; it was not restarted"
    first_after = min(r["t"] for r in read_trace(trace) if r["t"] > resumed)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    counts = Counter(s["event_id"] for s in read_all(own_broker, topics["output"], idle=2.0))
    figures["broker_stall"] = {
        "stall_s": 30,
        "events": 3000,
        "lost": 3000 - len(counts),
        "duplicates": sum(counts.values()) - len(counts),
        "seconds_to_first_commit_after_resume": round(first_after - resumed, 1),
    }
    assert len(counts) == 3000


def test_a_broker_that_stays_away_stops_the_worker_with_a_clear_message(own_broker, topics, workers):
    create_topics(own_broker, topics, partitions=1)
    produce(own_broker, topics["input"], [make_event(i) for i in range(50)])
    trace = workers.tmp_path / "trace.jsonl"
    process = workers.start(worker_env(own_broker, topics, FAULT_TRACE=trace, BROKER_UNAVAILABLE_TIMEOUT_S=8), name="away")
    deadline = time.monotonic() + 60
    while not read_trace(trace) and time.monotonic() < deadline:
        time.sleep(0.1)
    own_broker.embedded.pause()
    try:
        code = process.wait(60)
    finally:
        own_broker.embedded.resume()
    assert code == 3
    log = workers.log_of(0)
    assert "BROKER_UNAVAILABLE_TIMEOUT_S=8" in log and own_broker.bootstrap in log


def test_rebalance_with_a_worker_killed_and_one_added_loses_nothing_and_commits_only_owned_partitions(broker, topics, workers, tmp_path, figures):
    create_topics(broker, topics, partitions=6)
    events = [make_event(i) for i in range(6000)]
    placements = produce(broker, topics["input"], events)
    traces = [tmp_path / f"trace{i}.jsonl" for i in range(4)]

    def start(i):
        return workers.start(worker_env(broker, topics, FAULT_DELAY_S=0.1, FAULT_TRACE=traces[i], BATCH_MAX_RECORDS=20), name=f"member{i}")

    members = [start(i) for i in range(3)]
    deadline = time.monotonic() + 90
    while sum(len(read_trace(t)) for t in traces[:3]) < 30 and time.monotonic() < deadline:
        time.sleep(0.2)
    members[1].send_signal(signal.SIGKILL)  # one dies mid-batch …
    members[1].wait(10)
    time.sleep(2)
    members.append(start(3))  # … and one joins
    assert wait_committed(broker, topics, 6, end_offsets(placements), 300)
    for member in (members[0], members[2], members[3]):
        member.send_signal(signal.SIGTERM)
    assert [m.wait(60) for m in (members[0], members[2], members[3])] == [0, 0, 0]

    counts = Counter(s["event_id"] for s in read_all(broker, topics["output"], idle=2.0))
    commits = [r for t in traces for r in read_trace(t)]
    foreign = [r for r in commits if not set(map(int, r["commit"])) <= set(r["assigned"])]
    figures["rebalance"] = {
        "partitions": 6,
        "events": len(events),
        "lost": len(events) - len(counts),
        "duplicates": sum(counts.values()) - len(counts),
        "commits": len(commits),
        "commits_for_unowned_partitions": len(foreign),
        "workers_that_committed": len({r["pid"] for r in commits}),
    }
    assert len(counts) == len(events)
    assert foreign == []
    assert len({r["pid"] for r in commits}) == 4, "the added worker took over partitions"
