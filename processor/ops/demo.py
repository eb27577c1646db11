"""`python -m processor demo`: embedded broker → sample events → the real loop → summaries printed."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from processor.ops.broker import EmbeddedBroker, ensure_topics
from processor.ops.display import fill
from processor.engines import create_engine
from processor.engines.base import Engine
from processor.loop import Worker
from processor.ops.samples import sample_events
from processor.settings import load_settings
from processor.ops.tools import produce_events, read_topic

# Tansu joins a group in ~3 s with these instead of ~23 s; fine for a demo, not a production default.
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def run_demo(out: TextIO = sys.stdout, engine: str | None = None, model: str | None = None, repeat: int = 1, timeout_s: float = 120.0) -> int:
    """`engine` None: ENGINE from the environment, as `run` and `summarize` read it (extractive when unset)."""
    overrides: dict[str, Any] = {"kafka_group_id": "ai-worker-demo", "batch_max_wait_ms": 200, "log_format": "text"}
    if engine:
        overrides["engine"] = engine
    if model:
        overrides["transformers_model"] = model
    # The engine first: one that cannot load ends the demo in one line before a broker is started for nothing.
    summarizer = create_engine(load_settings(**overrides))
    try:
        return _run_with_engine(out, summarizer, overrides, repeat, timeout_s)
    finally:
        summarizer.close()


def _run_with_engine(out: TextIO, summarizer: Engine, overrides: dict[str, Any], repeat: int, timeout_s: float) -> int:
    with EmbeddedBroker() as broker:
        settings = load_settings(**overrides, kafka_bootstrap_servers=broker.bootstrap)
        ensure_topics(broker.bootstrap, {settings.kafka_input_topic: 3, settings.kafka_output_topic: 3, settings.kafka_dlq_topic: 1})
        events = [
            {**event, "event_id": f"{event['event_id']}-{n}" if repeat > 1 else event["event_id"]}
            for n in range(repeat)
            for event in sample_events()
        ]
        print(f"embedded broker on {broker.bootstrap}; producing {len(events)} sample events (Korean and English)", file=out)
        produce_events({"bootstrap.servers": broker.bootstrap}, settings.kafka_input_topic, events)

        print(f"starting the worker with ENGINE={settings.engine.value} …", file=out)
        worker = Worker(settings, summarizer, consumer_overrides=FAST_GROUP)
        started = time.monotonic()
        first_record: list[float] = []

        def finished() -> bool:
            if worker.records_committed and not first_record:
                first_record.append(time.monotonic())
            return worker.records_committed >= len(events) or time.monotonic() - started > timeout_s

        code = worker.run(until=finished)
        elapsed = time.monotonic() - started
        if worker.records_committed < len(events):
            print(f"only {worker.records_committed} of {len(events)} events were processed in {timeout_s:.0f} s", file=out)
            return code or 1

        common = {"bootstrap.servers": broker.bootstrap}
        summaries = list(read_topic(common, settings.kafka_output_topic, max_records=len(events)))
        for summary in sorted(summaries, key=lambda s: s["event_id"])[: len(sample_events())]:
            print(f"\n── {summary['event_id']} [{summary['language']}, {summary['model']}, results used {summary['results_used']}]", file=out)
            print(f"   query:   {summary['query']}", file=out)
            # Wrapped by display cells: a Hangul syllable is two cells wide, so Korean wraps at the same width as English.
            print(fill(summary["summary"], 100, indent="   "), file=out)
            for citation in summary.get("citations") or []:
                print(f"   [{citation['rank']}] {citation['url']}", file=out)
        dead = list(read_topic(common, settings.kafka_dlq_topic, dead_letters=True, idle_timeout_s=0.5))
        print(
            f"\n{len(summaries)} summaries, {len(dead)} dead letters; {len(events)} events in {elapsed:.1f} s "
            f"including the consumer-group join ({len(events) / elapsed:.1f} events/s end to end)",
            file=out,
        )
        return 0 if len(summaries) == len(events) else 1
