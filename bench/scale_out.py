"""Scale-out across workers (issue 21): N workers in one consumer group, one per GPU, against one worker on the same
input; then the same N with one worker SIGKILLed mid-run.

Each worker is the real `python -m processor run` in its own process, configured by the environment like a
deployment (ENGINE, VLLM_MODEL, … pass through from this shell), pinned with CUDA_VISIBLE_DEVICES=i. The broker is
the embedded one (Tansu) unless --bootstrap names another. Every run has its own topics and group; the events are
produced only once every worker has joined and the group holds still, so model loading and the group join are not
in the figures:

* events/s: events / (last summary's processed_at − the moment producing began), for 1 worker and for N;
* the kill run: once a third of the events are committed, worker N−1 (which owns partitions and is mid-batch) gets
  SIGKILL; lost (events never summarised), duplicates (against the documented bound: one batch per crash in
  micro_batch mode, CONTINUOUS_MAX_UNCOMMITTED records in continuous mode) and the time from the kill to the
  survivors' first summary of a partition the killed worker owned (its `processed_at`).

Ownership is read from the workers' own log lines (`assigned …` / `revoked …` / `lost …`, LOG_FORMAT=json).

    .venv/bin/python bench/scale_out.py [--workers 2] [--engine extractive] [--events 2000] [--partitions 6]
        [--mode micro_batch|continuous] [--batch 50] [--model-dir TOKENIZER_DIR --prompt-tokens 1500]

Writes bench/results/scale-out-<engine>.json; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Consumer, TopicPartition  # noqa: E402

from processor.ops.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from processor.ops.tools import produce_events, read_topic  # noqa: E402

# Test-grade group timings (a dead member is noticed after the session timeout); the kill's recovery time is mostly
# this, so it is recorded with the results. Kafka's own floor for it is group.min.session.timeout.ms (6 s).
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_MS = 500


class WorkerProcess:
    """One `processor run`, its log in a file, and the partitions its log says it owns."""

    def __init__(self, index: int, env: dict[str, str], log_dir: Path, topic: str) -> None:
        self.index = index
        self.log_path = log_dir / f"worker{index}.log"
        self.pattern = re.compile(re.escape(topic) + r"\[(\d+)\]")
        self.owned: set[int] = set()
        self._read = 0
        self.process = subprocess.Popen([sys.executable, "-m", "processor", "run"], cwd=ROOT, env=env,
                                        stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)

    def refresh(self) -> set[int]:
        with open(self.log_path, "rb") as log:
            log.seek(self._read)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        self._read += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                message = json.loads(line).get("msg", "")
            except (ValueError, AttributeError):
                continue
            parts = {int(p) for p in self.pattern.findall(message)}
            if message.startswith("assigned "):
                self.owned |= parts
            elif message.startswith(("revoked ", "lost ")):
                self.owned -= parts
        return self.owned

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 120) -> int | None:
        if self.alive():
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        consumer.close()


def processed_at(summary: dict[str, Any]) -> float:
    value = summary["processed_at"]
    return datetime.fromisoformat(value).timestamp() if isinstance(value, str) else value.timestamp()


def make_input(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.model_dir:
        from transformers import AutoTokenizer

        from bench.gpu_bench import make_events

        return make_events(args.events, args.prompt_tokens, AutoTokenizer.from_pretrained(args.model_dir))
    from tests.helpers import make_event

    return [make_event(i, results=4) for i in range(args.events)]


class Run:
    """One group on fresh topics: start the workers, wait until the group holds still, produce, watch."""

    def __init__(self, args: argparse.Namespace, bootstrap: str, workers: int, log_dir: Path) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.args, self.bootstrap, self.partitions = args, bootstrap, args.partitions
        self.topic, self.output, self.group = f"so-in-{suffix}", f"so-out-{suffix}", f"so-g-{suffix}"
        ensure_topics(bootstrap, {self.topic: args.partitions, self.output: args.partitions, f"so-dlq-{suffix}": 1})
        env = {**os.environ, "ENGINE": args.engine, "GENERATION_MODE": args.mode, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
               "KAFKA_INPUT_TOPIC": self.topic, "KAFKA_OUTPUT_TOPIC": self.output, "KAFKA_DLQ_TOPIC": f"so-dlq-{suffix}",
               "KAFKA_GROUP_ID": self.group, "BATCH_MAX_RECORDS": str(args.batch), "BATCH_MAX_WAIT_MS": "100",
               "KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS), "KAFKA_HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_MS),
               "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}
        log_dir = log_dir / suffix
        log_dir.mkdir(parents=True)
        gpus = args.gpus or workers
        self.workers = [WorkerProcess(i, {**env, "CUDA_VISIBLE_DEVICES": str(i % gpus)}, log_dir, self.topic)
                        for i in range(workers)]
        self.ends: dict[int, int] = {}

    def wait_stable(self) -> None:
        """Every worker owns partitions, together all of them, once each, and that held for 3 s (the embedded broker
        holds a join for half the session timeout, so a group that looks complete may still be rebalancing)."""
        since = [None]

        def stable() -> bool:
            dead = [w.index for w in self.workers if not w.alive()]
            if dead:
                raise SystemExit(f"worker(s) {dead} exited during start-up; logs: {self.workers[0].log_path.parent}")
            owned = [w.refresh() for w in self.workers]
            split = all(owned) and sum(map(len, owned)) == self.partitions == len(set().union(*owned))
            since[0] = (since[0] or time.monotonic()) if split else None
            return split and time.monotonic() - since[0] >= 3.0

        wait_until(stable, self.args.ready_timeout_s, f"{len(self.workers)} worker(s) to load and share the group")

    def produce(self, events: list[dict[str, Any]]) -> float:
        started = time.time()
        for partition, offset in produce_events({"bootstrap.servers": self.bootstrap}, self.topic, events):
            self.ends[partition] = max(self.ends.get(partition, 0), offset + 1)  # delivery reports: Tansu's watermarks lag
        return started

    def committed_count(self) -> int:
        return sum(committed(self.bootstrap, self.group, self.topic, self.partitions).values())

    def wait_done(self) -> None:
        wait_until(lambda: committed(self.bootstrap, self.group, self.topic, self.partitions) == self.ends,
                   self.args.run_timeout_s, "every event committed", 0.5)

    def summaries(self) -> list[dict[str, Any]]:
        return list(read_topic({"bootstrap.servers": self.bootstrap}, self.output, max_records=None, idle_timeout_s=3.0))

    def stop(self) -> list[int | None]:
        return [w.stop() for w in self.workers]


def throughput(args: argparse.Namespace, bootstrap: str, workers: int, events: list[dict[str, Any]],
               log_dir: Path) -> dict[str, Any]:
    run = Run(args, bootstrap, workers, log_dir)
    try:
        run.wait_stable()
        started = run.produce(events)
        run.wait_done()
    finally:
        codes = run.stop()
    summaries = run.summaries()
    seconds = max(map(processed_at, summaries)) - started
    counts = Counter(s["event_id"] for s in summaries)
    row = {"workers": workers, "events": len(events), "seconds": round(seconds, 2),
           "events_per_s": round(len(events) / seconds, 1),
           "lost": len(events) - len(counts), "duplicates": sum(counts.values()) - len(counts), "exit_codes": codes}
    print(f"  {workers} worker(s): {row['events_per_s']} events/s ({row['seconds']} s), lost {row['lost']}, "
          f"duplicates {row['duplicates']}", flush=True)
    return row


def duplicate_bound(args: argparse.Namespace) -> int:
    """docs/reliability.md: a crash duplicates at most one micro-batch, or CONTINUOUS_MAX_UNCOMMITTED records (8
    in-flight windows by default; BATCH_MAX_RECORDS caps a window)."""
    if args.mode == "micro_batch":
        return args.batch
    from processor.checkpoint import UNCOMMITTED_WINDOWS

    given = os.environ.get("CONTINUOUS_MAX_UNCOMMITTED")
    return int(given) if given else UNCOMMITTED_WINDOWS * args.batch


def kill_run(args: argparse.Namespace, bootstrap: str, events: list[dict[str, Any]], log_dir: Path) -> dict[str, Any]:
    run = Run(args, bootstrap, args.workers, log_dir)
    victim = run.workers[-1]
    try:
        run.wait_stable()
        run.produce(events)
        wait_until(lambda: run.committed_count() >= len(events) * args.kill_at, args.run_timeout_s, "the kill point", 0.1)
        owned = set(victim.refresh())
        killed_at = time.time()
        victim.stop(signal.SIGKILL, 10)
        committed_then = run.committed_count()
        run.wait_done()
    finally:
        codes = run.stop()
    summaries = run.summaries()
    counts = Counter(s["event_id"] for s in summaries)
    taken_over = [processed_at(s) for s in summaries if s["source_partition"] in owned and processed_at(s) > killed_at]
    row = {
        "workers": args.workers, "events": len(events), "killed_worker": victim.index, "its_partitions": sorted(owned),
        "committed_at_kill": committed_then, "lost": len(events) - len(counts), "duplicates": sum(counts.values()) - len(counts),
        "duplicates_bound": duplicate_bound(args),
        "seconds_kill_to_first_summary_of_its_partitions": round(min(taken_over) - killed_at, 2) if taken_over else None,
        "session_timeout_ms": SESSION_TIMEOUT_MS, "exit_codes_of_survivors": codes[:-1],
    }
    print(f"  kill: worker {victim.index} (partitions {sorted(owned)}) SIGKILLed at {committed_then}/{len(events)} committed: "
          f"lost {row['lost']}, duplicates {row['duplicates']} (bound {row['duplicates_bound']}), survivors' first summary "
          f"of its partitions {row['seconds_kill_to_first_summary_of_its_partitions']} s after the kill", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs to pin to, round robin (default: one per worker)")
    parser.add_argument("--engine", default=os.environ.get("ENGINE", "extractive"))
    parser.add_argument("--mode", default=os.environ.get("GENERATION_MODE", "micro_batch"), choices=["micro_batch", "continuous"])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--batch", type=int, default=int(os.environ.get("BATCH_MAX_RECORDS", "50")))
    parser.add_argument("--kill-at", type=float, default=0.33, help="kill once this share of the events is committed")
    parser.add_argument("--model-dir", help="a tokenizer folder: events sized to --prompt-tokens with it")
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--bootstrap", help="a running broker (default: an embedded one, started here)")
    parser.add_argument("--ready-timeout-s", type=float, default=900, help="model load + group join, per run")
    parser.add_argument("--run-timeout-s", type=float, default=600)
    parser.add_argument("--out", help="default: bench/results/scale-out-<engine>.json")
    args = parser.parse_args()
    if args.partitions < args.workers:
        parser.error("--partitions must be at least --workers: a worker without partitions idles")

    events = make_input(args)
    with ExitStack() as stack:
        bootstrap = args.bootstrap or stack.enter_context(EmbeddedBroker()).bootstrap
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-out-")))
        print(f"scale-out: ENGINE={args.engine} {args.mode}, {args.events} events, {args.partitions} partitions, "
              f"batch {args.batch}, broker {'embedded' if not args.bootstrap else args.bootstrap}", flush=True)
        one = throughput(args, bootstrap, 1, events, log_dir)
        many = throughput(args, bootstrap, args.workers, events, log_dir)
        kill = kill_run(args, bootstrap, events, log_dir)
    result = {
        "engine": args.engine, "mode": args.mode, "workers": args.workers, "events": args.events,
        "partitions": args.partitions, "batch_max_records": args.batch,
        "speedup": round(many["events_per_s"] / one["events_per_s"], 3), "one_worker": one, "n_workers": many, "kill": kill,
        "host": {"machine": platform.node(), "cpus": os.cpu_count(),
                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                 "gpus": gpu_names()},
        "broker": "embedded (Tansu)" if not args.bootstrap else args.bootstrap,
        "note": (f"ENGINE={args.engine} on {len(gpu_names())} GPU(s), one per worker (CUDA_VISIBLE_DEVICES)" if gpu_names() else
                 f"CPU only (no GPU): ENGINE={args.engine}, the workers share this host's {os.cpu_count()} cores, so the "
                 "speedup is bounded by the CPU, not by the group"),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"scale-out-{args.engine}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {out}")
    print(json.dumps({k: result[k] for k in ("engine", "mode", "workers", "events", "speedup")}
                     | {"events_per_s_1": one["events_per_s"], f"events_per_s_{args.workers}": many["events_per_s"],
                        "kill_lost": kill["lost"], "kill_duplicates": kill["duplicates"],
                        "kill_duplicates_bound": kill["duplicates_bound"],
                        "kill_recovery_s": kill["seconds_kill_to_first_summary_of_its_partitions"]}))
    return 0 if kill["lost"] == 0 and kill["duplicates"] <= kill["duplicates_bound"] else 1


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


if __name__ == "__main__":
    sys.exit(main())
