"""CPU benchmark: the loop's own CPU per event, with an instant engine and a real tokenizer (no GPU).

The full Worker (intake: decode, validate, prompt build + tokenize → generation → records: build, encode Avro →
sink: produce, poll → checkpoint) runs on the embedded broker over events whose prompts are ~1,500 tokens with a
real chat tokenizer (SmolLM2-135M-Instruct's, fetched by `python -m processor fetch-model smollm2 DIR`), and an
engine that answers at once with a fixed summary. On a GPU host every CPU second measured here is taken from the
interpreter that vLLM's front end shares with the loop (issue 22).

Four runs in this one process, each on its own topic and consumer group: a short warm-up (imports, first schema
use, the tokenizer's first calls), the measured run (process CPU and the loop thread's CPU per event), a run beside a
stand-in for the engine's front end, and a run of the loop thread under cProfile (slower: it is for where the time
goes, not for the figures).

What the engine feels is the loop's interpreter time, not its CPU: the Rust tokenizer's batch call releases the GIL,
so vLLM's front end (input processing, detokenisation, output handling: Python in the same process) runs meanwhile.
`interpreter_ms_per_event` is the loop thread's CPU less its CPU inside those GIL-free calls (HFChatTokenizer's
`native_cpu_s`, timed around them); target ≤ 1 ms. `engine_thread_share` measures the contention directly: a second
Python thread doing pure-Python work (the front end's stand-in) does this share of the work beside the loop that it
does alone (1.0: the loop never holds the GIL it wants; on a machine with fewer free cores than two, it is also the
cores that are shared).

    .venv/bin/python bench/loop_cpu.py [--events 2000] [--mode micro_batch|continuous] [--model-dir DIR]

Writes bench/results/loop_cpu.json (loop_cpu_continuous.json for --mode continuous); the last line printed is one
JSON object with `cpu_ms_per_event` (process CPU, librdkafka's threads included), `events_per_s` (per core:
1000 / cpu_ms_per_event) and `interpreter_ms_per_event`.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
# Starting the embedded broker forks after the tokenizer has run; say up front that its thread pool is not wanted
# (a single encode() does not use it) rather than have the library warn and turn it off.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))

from bench.gpu_bench import make_events  # noqa: E402
from processor.engines.base import Generation, Prompt  # noqa: E402
from processor.engines.extractive import ExtractiveEngine  # noqa: E402
from processor.engines.hf_tokenizer import HFChatTokenizer  # noqa: E402
from processor.loop import Worker  # noqa: E402
from processor.pipeline import INTAKE_CHUNK  # noqa: E402
from processor.ops.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from processor.ops.tools import produce_events  # noqa: E402
from processor.settings import load_settings  # noqa: E402

FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
RESULTS = ROOT / "bench" / "results"
PROMPT_TOKENS = 1_500
# A summary of a real one's size (~1,100 characters, ~250 tokens) with citations, so records and their Avro
# encoding cost what they do in production.
SUMMARY = (
    "Consumer lag grows whenever events are produced faster than the workers can summarise them [1]. Batching "
    "requests on the GPU raises throughput several times over, because one decode step serves every sequence in "
    "the batch [2]. Continuous feeding keeps the engine full as requests finish at different lengths, instead of "
    "waiting for the slowest request of a fixed window [3]. Offsets are committed only after each summary has been "
    "acknowledged by the broker, so a crash re-processes at most the records in flight and never loses one [1]. "
    "Events that cannot be read, validated or summarised go to a dead-letter topic with the reason in a header, and "
    "the worker carries on with the rest of its partition [4]. Restarting a worker costs a minute of model loading, "
    "during which its partitions move to the others in the group [2]. Rebalances revoke partitions cooperatively, "
    "so the records already summarised are published and committed before the partition changes owner [3]. The "
    "memory needed per request follows its prompt and output length, which bounds how many run at once [1]."
)
COMPLETION_TOKENS = 250


class InstantEngine(ExtractiveEngine):
    """No model: every prompt is answered at once with the same summary, tokenized by a real chat tokenizer."""

    kind = "extractive"  # the engine kinds the loop drives in both generation modes without a GPU
    model = "instant"

    def __init__(self, tokenizer: HFChatTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer  # type: ignore[assignment]

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:  # type: ignore[override]
        return [Generation(SUMMARY, "stop", p.prompt_tokens, COMPLETION_TOKENS) for p in prompts]


class FrontEnd(threading.Thread):
    """The engine's front end's stand-in: pure-Python work (dicts, small loops) in units, counted, until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.units = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            table = {}
            for index in range(64):
                table[index] = index * 3
            self.units += sum(table.values()) > 0

    def rate(self, seconds: float | None = None, body: Callable[[], None] | None = None) -> float:
        """Units per second over `seconds` alone, or while `body` runs."""
        self.start()
        started, units = time.perf_counter(), self.units
        if body is not None:
            body()
        else:
            time.sleep(seconds or 1.0)
        rate = (self.units - units) / (time.perf_counter() - started)
        self.running = False
        self.join()
        return rate


def load_tokenizer(model_dir: str | None) -> tuple[HFChatTokenizer, str]:
    if model_dir is None:
        model_dir = subprocess.run(
            [sys.executable, "-m", "processor", "fetch-model", "smollm2", str(Path.home() / ".cache" / "ai-worker" / "models")],
            capture_output=True, text=True, check=True, cwd=ROOT,
        ).stdout.strip().splitlines()[-1]
    from transformers import AutoTokenizer

    return HFChatTokenizer(AutoTokenizer.from_pretrained(model_dir)), model_dir


def run_worker(bootstrap: str, engine: InstantEngine, events: list[dict[str, Any]], mode: str, batch: int,
               around: Callable[[Callable[[], None]], None] | None = None) -> dict[str, Any]:
    """The full loop over `events` on a fresh topic; CPU of the process and of this (the loop's) thread."""
    tag = uuid.uuid4().hex[:6]
    topic, out, dlq = f"cpu-in-{tag}", f"cpu-out-{tag}", f"cpu-dlq-{tag}"
    ensure_topics(bootstrap, {topic: 4, out: 4, dlq: 1})
    produce_events({"bootstrap.servers": bootstrap}, topic, events)
    settings = load_settings(
        kafka_bootstrap_servers=bootstrap, kafka_input_topic=topic, kafka_output_topic=out, kafka_dlq_topic=dlq,
        kafka_group_id=f"cpu-{tag}", batch_max_records=batch, batch_max_wait_ms=50, batch_max_prompt_tokens=100_000_000,
        generation_mode=mode, log_format="text", log_level="WARNING",
    )
    worker = Worker(settings, engine, consumer_overrides=FAST_GROUP)
    native = engine.tokenizer.native_cpu_s
    wall, process, thread = time.perf_counter(), time.process_time(), time.thread_time()

    def body() -> None:
        worker.run(until=lambda: worker.records_committed >= len(events))

    if around is None:
        body()
    else:
        around(body)
    wall, process, thread = time.perf_counter() - wall, time.process_time() - process, time.thread_time() - thread
    native = engine.tokenizer.native_cpu_s - native
    dead = sum(s.value for s in worker.metrics.dead_letters.collect()[0].samples if s.name.endswith("_total"))
    if worker.records_committed < len(events) or dead:
        raise RuntimeError(f"{worker.records_committed} of {len(events)} committed, {dead} dead letters")
    return {"events": len(events), "wall_s": wall, "process_cpu_s": process, "loop_thread_cpu_s": thread, "native_cpu_s": native}


# Where the loop thread's time goes. A function is an entry of a group when it matches and none of its direct callers
# do; a group's time is its entries' cumulative time less that of other groups' entries they call directly (the
# summary checks inside building a record, a commit inside a delivery callback), so the groups do not overlap.
# Matched on file and function names, so code moving between modules needs only this table updated.
GROUPS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("decode + validate", lambda f, n: (f == "codec.py" and n in {"deserialize", "decode", "count_capped"}) or f == "events.py"),
    ("prompt build + tokenize", lambda f, n: f in {"prompt.py", "hf_tokenizer.py"} or (f == "base.py" and n == "encode_batch")),
    ("summary checks (quality, guards)", lambda f, n: f in {"quality.py", "guards.py", "citations.py"}),
    ("encode Avro", lambda f, n: f == "codec.py" and n in {"serialize", "encode"}),
    ("build records", lambda f, n: f == "records.py"),
    ("produce / poll (sink)", lambda f, n: f == "sink.py"),
    ("consume (source)", lambda f, n: f == "source.py" or n == "<method 'consume' of 'cimpl.Consumer' objects>"),
    ("checkpoint / commit", lambda f, n: f == "checkpoint.py"),
]


def _where(key: tuple[str, int, str]) -> tuple[str, str]:
    return os.path.basename(key[0]), key[2]


def _callers(raw: dict[Any, Any], key: Any, depth: int = 3) -> set[Any]:
    """Direct callers, looking through built-ins (`sum(<genexpr>)`: the generator's caller is whoever called sum)."""
    out: set[Any] = set()
    for caller in raw.get(key, (0, 0, 0, 0, {}))[4]:
        if caller[0] == "~" and depth > 0:
            out |= _callers(raw, caller, depth - 1)
        else:
            out.add(caller)
    return out


def grouped(stats: pstats.Stats) -> dict[str, float]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    entries: dict[str, list[Any]] = {}
    for name, match in GROUPS:
        entries[name] = [k for k in raw if match(*_where(k)) and not any(match(*_where(c)) for c in _callers(raw, k))]
    out: dict[str, float] = {}
    for name, match in GROUPS:
        total = sum(raw[k][3] for k in entries[name])
        for other, keys in entries.items():
            if other == name:
                continue
            for key in keys:  # the part of another group's entry that this group's functions called
                for caller, timing in raw[key][4].items():
                    if match(*_where(caller)):
                        total -= timing[3]
        out[name] = total
    return out


def profiled(bootstrap: str, engine: InstantEngine, events: list[dict[str, Any]], mode: str, batch: int) -> tuple[dict[str, Any], pstats.Stats]:
    # The thread's CPU clock, not the wall clock: time blocked in consume() waiting for records is no cost here.
    # cProfile profiles only the thread that enables it: the loop's.
    profile = cProfile.Profile(time.thread_time)

    def around(body: Callable[[], None]) -> None:
        profile.enable()
        try:
            body()
        finally:
            profile.disable()

    figures = run_worker(bootstrap, engine, events, mode, batch, around)
    return figures, pstats.Stats(profile)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2_000)
    parser.add_argument("--mode", choices=["micro_batch", "continuous"], default="micro_batch")
    parser.add_argument("--batch", type=int, default=64, help="BATCH_MAX_RECORDS (the continuous window)")
    parser.add_argument("--model-dir", help="a chat model's folder for its tokenizer (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--top", type=int, default=25, help="functions listed by cumulative time")
    args = parser.parse_args()

    tokenizer, model_dir = load_tokenizer(args.model_dir)
    engine = InstantEngine(tokenizer)
    print(f"tokenizer: {model_dir}; building {args.events} events of ~{PROMPT_TOKENS} prompt tokens …", flush=True)
    events = make_events(args.events, PROMPT_TOKENS, tokenizer)
    warm = [e | {"event_id": f"warm-{i}"} for i, e in enumerate(events[: min(200, len(events))])]
    with EmbeddedBroker() as broker:
        run_worker(broker.bootstrap, engine, warm, args.mode, args.batch)
        measured = run_worker(broker.bootstrap, engine, events, args.mode, args.batch)
        alone = FrontEnd().rate(seconds=2.0)
        beside: dict[str, Any] = {}
        shared = FrontEnd().rate(body=lambda: beside.update(run_worker(broker.bootstrap, engine, events, args.mode, args.batch)))
        prof_figures, stats = profiled(broker.bootstrap, engine, events, args.mode, args.batch)

    n = measured["events"]
    cpu_ms = measured["process_cpu_s"] * 1000 / n
    loop_ms = measured["loop_thread_cpu_s"] * 1000 / n
    native_ms = measured["native_cpu_s"] * 1000 / n
    interpreter_ms = loop_ms - native_ms
    share = shared / alone
    # The most the GIL alone can take from the front end where cores are free: the share of the wall the loop holds it.
    held = interpreter_ms * n / 1000 / measured["wall_s"]
    print(f"\nevents: {n}, mode {args.mode}, batch {args.batch}, ~{PROMPT_TOKENS}-token prompts, 4 partitions, embedded broker")
    print(f"wall: {measured['wall_s']:.2f} s ({n / measured['wall_s']:.0f} events/s on this machine's {os.cpu_count()} cores)")
    print(f"process CPU:     {cpu_ms:6.3f} ms/event  → {1000 / cpu_ms:7.1f} events/s per core")
    print(f"loop thread CPU: {loop_ms:6.3f} ms/event  → {1000 / loop_ms:7.1f} events/s per core")
    print(f"  of which in GIL-free tokenizer calls {native_ms:6.3f} ms/event; interpreter (GIL held): {interpreter_ms:6.3f} "
          f"ms/event (target ≤ 1 ms)")
    print(f"engine front end's stand-in beside the loop: {share:.3f} of its rate alone ({shared:,.0f} vs {alone:,.0f} "
          f"units/s; the loop's wall {beside['wall_s']:.2f} s beside it, {measured['wall_s']:.2f} s without); the loop holds "
          f"the GIL {held:.1%} of its wall time (what the GIL takes where cores are free; the rest here is cores shared)")

    total = stats.total_tt  # type: ignore[attr-defined]
    groups = grouped(stats)
    print(f"\nloop thread under cProfile, its CPU clock: {total:.2f} s ({total * 1000 / n:.2f} ms/event with the profiler's overhead)")
    rows = []
    for name, seconds in groups.items():
        rows.append({"group": name, "ms_per_event": round(seconds * 1000 / n, 3), "share": round(seconds / total, 3)})
        print(f"  {name:<34} {seconds * 1000 / n:7.3f} ms/event  {seconds / total:6.1%}")
    rest = total - sum(groups.values())
    print(f"  {'rest of the loop':<34} {rest * 1000 / n:7.3f} ms/event  {rest / total:6.1%}")
    rows.append({"group": "rest of the loop", "ms_per_event": round(rest * 1000 / n, 3), "share": round(rest / total, 3)})
    print(f"\ntop {args.top} functions by cumulative time (loop thread):", flush=True)
    stats.sort_stats("cumulative").print_stats(args.top)
    top = []
    for key in stats.fcn_list[: args.top]:  # type: ignore[attr-defined]
        _cc, nc, tt, ct, _callers = stats.stats[key]  # type: ignore[attr-defined]
        top.append({"function": f"{_where(key)[0]}:{key[1]}({key[2]})", "calls": nc, "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)})

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "tokenizer": Path(model_dir).name, "events": n, "mode": args.mode, "batch": args.batch, "prompt_tokens": PROMPT_TOKENS,
        "wall_s": round(measured["wall_s"], 3),
        "cpu_ms_per_event": round(cpu_ms, 3),
        "loop_thread_cpu_ms_per_event": round(loop_ms, 3),
        "events_per_s": round(1000 / cpu_ms, 1),
        "loop_thread_events_per_s": round(1000 / loop_ms, 1),
        "native_ms_per_event": round(native_ms, 3),
        "interpreter_ms_per_event": round(interpreter_ms, 3),
        "engine_thread_share": round(share, 3),
        "engine_thread_units_per_s": {"alone": round(alone), "beside_the_loop": round(shared)},
        "gil_held_share_of_wall": round(held, 3),
        "wall_s_beside_the_engine_thread": round(beside["wall_s"], 3),
        "intake_chunk": INTAKE_CHUNK,
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "profile": {"profiled_s": round(total, 3), "groups": rows, "top_cumulative": top},
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "loop_cpu.json" if args.mode == "micro_batch" else f"loop_cpu_{args.mode}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {(RESULTS / name).relative_to(ROOT)}")
    print(json.dumps({k: result[k] for k in ("cpu_ms_per_event", "events_per_s", "interpreter_ms_per_event",
                                             "engine_thread_share", "loop_thread_cpu_ms_per_event",
                                             "loop_thread_events_per_s", "events", "mode")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
