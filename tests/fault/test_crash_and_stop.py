"""Crash loop (SIGKILL mid-batch, 20 restarts, 10,000 events) and graceful stop (SIGTERM mid-batch)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter

import pytest

from tests.helpers import committed_offsets, create_topics, end_offsets, make_event, produce, read_all

pytestmark = [pytest.mark.broker, pytest.mark.slow]

EVENTS = 10_000
CRASHES = 20
BATCH = 50


def worker_env(broker, topics, **extra):
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "KAFKA_INPUT_TOPIC": topics["input"],
        "KAFKA_OUTPUT_TOPIC": topics["output"],
        "KAFKA_DLQ_TOPIC": topics["dlq"],
        "KAFKA_GROUP_ID": topics["group"],
        "BATCH_MAX_RECORDS": str(BATCH),
        "BATCH_MAX_WAIT_MS": "100",
        "LOG_LEVEL": os.environ.get("FAULT_LOG_LEVEL", "WARNING"),
        # The fault suite runs in either generation mode: FAULT_GENERATION_MODE=continuous runs it with the feed.
        "GENERATION_MODE": os.environ.get("FAULT_GENERATION_MODE", "micro_batch"),
    }
    return {**env, **{k: str(v) for k, v in extra.items()}}


def commits_in(trace_path) -> int:
    try:
        return sum(1 for _ in open(trace_path))
    except FileNotFoundError:
        return 0


def test_crash_loop_loses_nothing_and_duplicates_at_most_one_batch_per_crash(broker, topics, workers, tmp_path, figures):
    create_topics(broker, topics, partitions=3)
    events = [make_event(i) for i in range(EVENTS)]
    placements = produce(broker, topics["input"], events)
    trace = tmp_path / "trace.jsonl"
    # Each generate() takes 50 ms for 50 events, so a kill at a random moment usually lands mid-batch.
    env = worker_env(broker, topics, FAULT_DELAY_S=0.05, FAULT_TRACE=trace)
    rng = random.Random(2026)
    started = time.monotonic()
    kills_mid_stream = 0
    for cycle in range(CRASHES):
        process = workers.start(env, name=f"crash{cycle}")
        before = commits_in(trace)
        # Wait for this incarnation to commit something (group join takes a few seconds), then kill at random.
        deadline = time.monotonic() + 60
        while commits_in(trace) == before and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            kills_mid_stream += 1
    final = workers.start(env, name="final")
    ends = end_offsets(placements)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if committed_offsets(broker, topics["group"], topics["input"], 3) == ends:
            break
        time.sleep(1)
    final.send_signal(signal.SIGTERM)
    assert final.wait(60) == 0
    elapsed = time.monotonic() - started

    summaries = read_all(broker, topics["output"], idle=3.0)  # every record decodes, or this raises
    counts = Counter(s["event_id"] for s in summaries)
    lost = EVENTS - len(counts)
    duplicates = sum(counts.values()) - len(counts)
    figures["crash_loop"] = {
        "events": EVENTS,
        "cycles": CRASHES,
        "kills_landed_mid_stream": kills_mid_stream,
        "lost": lost,
        "duplicates": duplicates,
        "duplicates_per_crash_max_allowed": BATCH,
        "seconds": round(elapsed, 1),
    }
    assert lost == 0
    assert kills_mid_stream == CRASHES
    # micro_batch: one batch published-but-uncommitted at most; continuous: what is read but uncommitted is capped at
    # UNCOMMITTED_WINDOWS in-flight windows (BATCH_MAX_RECORDS caps the window).
    from processor.checkpoint import UNCOMMITTED_WINDOWS

    per_crash = BATCH if env["GENERATION_MODE"] == "micro_batch" else UNCOMMITTED_WINDOWS * BATCH
    figures["crash_loop"]["duplicates_per_crash_max_allowed"] = per_crash
    assert duplicates <= kills_mid_stream * per_crash, "at most the in-flight work duplicated per crash"
    assert committed_offsets(broker, topics["group"], topics["input"], 3) == ends
    # Lineage survives the chaos: each summary points at its own input record.
    by_id = {e["event_id"]: p for e, p in zip(events, placements)}
    assert all((s["source_partition"], s["source_offset"]) == by_id[s["event_id"]] for s in summaries)


@pytest.mark.parametrize("finish", [True, False], ids=["batch-finishes", "batch-abandoned"])
def test_sigterm_mid_batch_exits_0_within_the_bound_and_a_restart_duplicates_nothing(broker, topics, workers, tmp_path, figures, finish):
    create_topics(broker, topics, partitions=2)
    events = [make_event(i) for i in range(200)]
    placements = produce(broker, topics["input"], events)
    trace = tmp_path / "trace.jsonl"
    shutdown_timeout = 10 if finish else 1
    env = worker_env(broker, topics, FAULT_DELAY_S=3.0, FAULT_TRACE=trace, SHUTDOWN_TIMEOUT_S=shutdown_timeout, BATCH_MAX_RECORDS=20)
    process = workers.start(env, name="graceful")
    deadline = time.monotonic() + 60
    while commits_in(trace) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the next batch is now 1 s into its 3 s generate()
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(60)
    took = time.monotonic() - sent
    bound = shutdown_timeout + 10  # the in-flight batch's allowance, plus flush/commit/close
    figures[f"graceful_stop_{'finish' if finish else 'abandon'}"] = {"exit_code": code, "seconds": round(took, 1), "bound_s": bound}
    assert code == 0 and took < bound
    published_before = Counter(s["event_id"] for s in read_all(broker, topics["output"], idle=1.0))
    committed_at_exit = sum(committed_offsets(broker, topics["group"], topics["input"], 2).values())
    if finish:
        # The work generating at SIGTERM finished inside the allowance: it is published AND committed before exit.
        if env["GENERATION_MODE"] == "micro_batch":
            assert committed_at_exit >= 40, "the first batch and the one generating at SIGTERM"
        assert committed_at_exit > 20 and committed_at_exit == sum(published_before.values()), "what was published is committed"
    figures[f"graceful_stop_{'finish' if finish else 'abandon'}"]["committed_at_exit"] = committed_at_exit

    restart = workers.start(worker_env(broker, topics, FAULT_TRACE=trace), name="restart")
    ends = end_offsets(placements)
    deadline = time.monotonic() + 120
    while committed_offsets(broker, topics["group"], topics["input"], 2) != ends and time.monotonic() < deadline:
        time.sleep(0.5)
    restart.send_signal(signal.SIGTERM)
    assert restart.wait(60) == 0
    counts = Counter(s["event_id"] for s in read_all(broker, topics["output"], idle=2.0))
    assert len(counts) == 200, "nothing lost"
    assert all(n == 1 for n in counts.values()), "the restart duplicated nothing already published"
    assert all(published_before[e] == 1 for e in published_before)
