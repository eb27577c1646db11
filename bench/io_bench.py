"""CPU benchmark: the processor's own cost, with the engine's cost taken away.

In one run, on the embedded broker, over the same events:
  * passthrough — a bare confluent-kafka consume → fastavro decode → encode → produce → commit loop, the least any
    Kafka-to-Kafka Avro processor must do;
  * processor   — the real Worker loop (decode, validate, prompt, batch, publish, commit) with a zero-cost engine.
Prints records/s of both and the ratio (target ≥ 0.7), then the processor's peak RSS over a long stream, sampled
along the way to show it is flat. Writes bench/results/io.json.

    .venv/bin/python bench/io_bench.py [--events 20000] [--rss-events 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Consumer, Producer  # noqa: E402

from processor.ops.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from processor.codec import EVENT_SCHEMA, SUMMARY_SCHEMA, AvroCodec  # noqa: E402
from processor.engines.base import ChatMessage, Encoded, Generation, Prompt  # noqa: E402
from processor.loop import Worker  # noqa: E402
from processor.metrics import Metrics  # noqa: E402
from processor.settings import load_settings  # noqa: E402
from processor.ops.tools import produce_events  # noqa: E402

FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
RESULTS = ROOT / "bench" / "results"


class ByteCountTokenizer:
    """Zero-cost: about four bytes a token, no vocabulary."""

    control_tokens: frozenset[str] = frozenset()
    control_token_ids: frozenset[int] = frozenset()

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return "".join(m.content for m in messages)

    def encode(self, text: str) -> Encoded:
        return Encoded(range(len(text) // 4 + 8), lambda: [i * 4 for i in range(len(text) // 4 + 8)])

    def chat_token_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return list(self.encode(self.render_chat(messages)).ids)

    def count(self, text: str) -> int:
        return len(text) // 4

    def truncate(self, text: str, max_tokens: int) -> str:
        return text[: max_tokens * 4]


class ZeroCostEngine:
    kind = "extractive"
    model = "zero-cost"

    def __init__(self) -> None:
        self.tokenizer = ByteCountTokenizer()

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        return [Generation("summary", "stop", p.prompt_tokens, 1) for p in prompts]

    def capacity(self) -> None:
        return None

    def close(self) -> None:
        return None


class TimingMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.first_consumed: float | None = None

    def consumed(self, tp: tuple[str, int]) -> None:
        if self.first_consumed is None:
            self.first_consumed = time.perf_counter()
        super().consumed(tp)


def make_events(n: int, prefix: str) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import make_event

    return [make_event(i) | {"event_id": f"{prefix}-{i:07d}"} for i in range(n)]


def passthrough(bootstrap: str, topic: str, out_topic: str, total: int) -> float:
    """records/s of the least an Avro Kafka-to-Kafka processor does, committed per consumed chunk after acks."""
    codec = AvroCodec()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"pt-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", **FAST_GROUP})
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5})
    consumer.subscribe([topic])
    done, first = 0, None
    now = datetime.now(timezone.utc)
    while done < total:
        messages = consumer.consume(500, 1.0)
        if not messages:
            continue
        if first is None:
            first = time.perf_counter()
        for message in messages:
            event = codec.decode(message.value(), EVENT_SCHEMA)
            summary = {
                "event_id": event["event_id"], "query": event["query"], "summary": "summary", "language": "en", "engine": "none",
                "model": "none", "prompt_version": "none", "finish_reason": "stop", "prompt_tokens": 0, "completion_tokens": 1,
                "results_used": len(event["results"]), "results_truncated": 0, "source_topic": message.topic(),
                "source_partition": message.partition(), "source_offset": message.offset(), "collected_at": event["collected_at"],
                "processed_at": now, "processor_version": "bench",
            }
            producer.produce(out_topic, codec.encode(summary, SUMMARY_SCHEMA), message.key())
        producer.flush(30)
        consumer.commit(asynchronous=False)
        done += len(messages)
    elapsed = time.perf_counter() - (first or time.perf_counter())
    consumer.close()
    return done / elapsed


def processor_loop(bootstrap: str, topic: str, out_topic: str, dlq: str, total: int, batch: int) -> tuple[float, Worker]:
    settings = load_settings(
        kafka_bootstrap_servers=bootstrap, kafka_input_topic=topic, kafka_output_topic=out_topic, kafka_dlq_topic=dlq,
        kafka_group_id=f"loop-{uuid.uuid4().hex[:6]}", batch_max_records=batch, batch_max_wait_ms=50,
        batch_max_prompt_tokens=10_000_000, log_format="text", log_level="WARNING",
    )
    metrics = TimingMetrics()
    worker = Worker(settings, ZeroCostEngine(), consumer_overrides=FAST_GROUP, metrics=metrics)
    worker.run(until=lambda: worker.records_committed >= total)
    elapsed = time.perf_counter() - (metrics.first_consumed or time.perf_counter())
    return worker.records_committed / elapsed, worker


def rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def rss_run(events: int, batch: int) -> dict[str, Any]:
    """In its own process (a clean heap): the loop over `events`, RSS sampled as it goes."""
    with EmbeddedBroker() as broker:
        topic, out, dlq = f"rss-in-{uuid.uuid4().hex[:6]}", "rss-out", "rss-dlq"
        ensure_topics(broker.bootstrap, {topic: 3, out: 3, dlq: 1})
        chunk = 10_000
        for start in range(0, events, chunk):  # never hold all events in this process at once
            produce_events({"bootstrap.servers": broker.bootstrap}, topic, make_events(min(chunk, events - start), f"r{start}"))
        settings = load_settings(
            kafka_bootstrap_servers=broker.bootstrap, kafka_input_topic=topic, kafka_output_topic=out, kafka_dlq_topic=dlq,
            kafka_group_id="rss", batch_max_records=batch, batch_max_wait_ms=50, batch_max_prompt_tokens=10_000_000,
            log_format="text", log_level="WARNING",
        )
        worker = Worker(settings, ZeroCostEngine(), consumer_overrides=FAST_GROUP)
        samples: list[tuple[int, int]] = []
        start_rss = rss_kib()

        def until() -> bool:
            if not samples or worker.records_committed - samples[-1][0] >= events // 20:
                samples.append((worker.records_committed, rss_kib()))
            return worker.records_committed >= events

        worker.run(until=until)
        samples.append((worker.records_committed, rss_kib()))
    peak = max(r for _, r in samples)
    second_half = [r for done, r in samples if done >= events // 2]
    return {
        "events": events,
        "rss_before_mib": round(start_rss / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "rss_at_half_mib": round(second_half[0] / 1024, 1),
        "rss_at_end_mib": round(samples[-1][1] / 1024, 1),
        "growth_second_half_mib": round((samples[-1][1] - second_half[0]) / 1024, 1),
        "samples": [{"done": d, "rss_mib": round(r / 1024, 1)} for d, r in samples],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rss-events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_only:
        print(json.dumps(rss_run(args.rss_events, args.batch)))
        return 0

    with EmbeddedBroker() as broker:
        topic = f"io-{uuid.uuid4().hex[:6]}"
        ensure_topics(broker.bootstrap, {topic: 3, "io-out-pt": 3, "io-out-loop": 3, "io-dlq": 1})
        produce_events({"bootstrap.servers": broker.bootstrap}, topic, make_events(args.events, "io"))
        # Warm both paths once (imports, first schema use), then measure each on the full topic.
        passthrough_rate = passthrough(broker.bootstrap, topic, "io-out-pt", args.events)
        loop_rate, worker = processor_loop(broker.bootstrap, topic, "io-out-loop", "io-dlq", args.events, args.batch)
    ratio = loop_rate / passthrough_rate
    print(f"events: {args.events} (3 partitions, embedded Tansu broker), batch {args.batch}")
    print(f"passthrough (consume → decode → encode → produce → commit): {passthrough_rate:10.0f} records/s")
    print(f"processor loop, zero-cost engine:                         {loop_rate:10.0f} records/s")
    print(f"ratio: {ratio:.2f} (target ≥ 0.7)")

    rss_json = subprocess.run([sys.executable, __file__, "--rss-only", "--rss-events", str(args.rss_events), "--batch", str(args.batch)],
                              capture_output=True, text=True, check=True).stdout
    rss = json.loads(rss_json.strip().splitlines()[-1])
    print(f"peak RSS over {rss['events']} events: {rss['peak_rss_mib']} MiB (at half: {rss['rss_at_half_mib']} MiB, "
          f"at end: {rss['rss_at_end_mib']} MiB, growth over the second half: {rss['growth_second_half_mib']} MiB)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "events": args.events,
        "batch": args.batch,
        "passthrough_records_per_s": round(passthrough_rate, 1),
        "processor_records_per_s": round(loop_rate, 1),
        "ratio": round(ratio, 3),
        "rss": rss,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (RESULTS / "io.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {(RESULTS / 'io.json').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
