"""`python -m processor demo`: embedded broker → sample events → the real loop → summaries printed."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from processor.ops.broker import EmbeddedBroker, ensure_topics
from processor.ops.display import fill
from processor.engines import create_engine
from processor.engines.base import Engine
from processor.loop import Worker
from processor.model_fetch import MODELS
from processor.ops.samples import sample_events
from processor.settings import load_settings
from processor.ops.tools import produce_events, read_topic

# Tansu joins a group in ~3 s with these instead of ~23 s; fine for a demo, not a production default.
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


# `demo --model smollm2`: the real model on a CPU. Fewer new tokens than the ADR's 1,536 keep it to a couple of
# minutes on 2 cores (a 135M model writes its 3 to 6 sentences in ~100-150 tokens; what loops is trimmed anyway).
REAL_MODEL_DEMO = {"sampling_max_tokens": 160}
REAL_MODEL_TIMEOUT_S = 600.0


def default_model_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ai-worker" / "models"


def run_demo(out: TextIO = sys.stdout, engine: str | None = None, model: str | None = None, repeat: int = 1, timeout_s: float = 120.0,
             model_cache: Path | None = None) -> int:
    """`engine` None: ENGINE from the environment, as `run` and `summarize` read it (extractive when unset).
    `model` "smollm2": the real SmolLM2-135M-Instruct, fetched once into `model_cache`, on the Transformers engine."""
    overrides: dict[str, Any] = {"kafka_group_id": "ai-worker-demo", "batch_max_wait_ms": 200, "log_format": "text"}
    if engine:
        overrides["engine"] = engine
    if model in MODELS:
        from processor.model_fetch import fetch_model

        cache = model_cache or default_model_cache()
        folder = fetch_model(model, cache, progress=lambda line: print(line, file=out, flush=True))
        overrides.update(engine="transformers", transformers_model=str(folder))
        overrides.update({k: v for k, v in REAL_MODEL_DEMO.items() if k.upper() not in os.environ})
        timeout_s = max(timeout_s, REAL_MODEL_TIMEOUT_S)
    elif model:
        overrides["transformers_model"] = model
    settings = load_settings(**overrides)
    if settings.engine.value != "extractive":
        print(f"loading {settings.model_for_transformers} on the {settings.engine.value} engine …", file=out, flush=True)
    started = time.monotonic()
    # The engine first: one that cannot load ends the demo in one line before a broker is started for nothing.
    summarizer = create_engine(settings)
    if settings.engine.value != "extractive":
        print(f"model loaded in {time.monotonic() - started:.0f} s", file=out, flush=True)
    try:
        return _run_with_engine(out, summarizer, overrides, repeat, timeout_s)
    finally:
        summarizer.close()


class Progress:
    """A line every `every_s` seconds while the worker runs: a model on a CPU takes minutes, silence looks hung."""

    def __init__(self, out: TextIO, total: int, done: Callable[[], int], every_s: float = 10.0) -> None:
        self.out, self.total, self.done, self.every_s = out, total, done, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="demo-progress", daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self.stop.wait(self.every_s):
            print(f"  … {self.done()} of {self.total} summaries after {time.monotonic() - started:.0f} s", file=self.out, flush=True)

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join()


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

        with Progress(out, len(events), lambda: worker.records_committed, every_s=10.0 if summarizer.kind != "extractive" else 3600.0):
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
