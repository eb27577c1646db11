"""GPU benchmark: does micro-batching pay, and does the processor keep the engine fed?

With the Transformers engine (or --engine vllm on a box that has it) on a model of Qwen2.5-0.5B-Instruct's
architecture with random bf16 weights (no hub needed), fixed prompt and output lengths:
  (a) per-event generation vs micro-batches of 8, 32 and 64: tokens/s and events/s, and the best batch's speed-up;
  (b) the full processor on the embedded broker vs the engine alone on the very same prompts: the ratio;
  (c) the engine's idle share of wall time inside the processor run.
Targets: (a) ≥ 10× at the best batch size, (b) ≥ 0.95, (c) < 5 %. Writes bench/results/gpu.json and gpu.png.

    python bench/gpu_bench.py                         # builds the random-weight model, runs everything
    ENGINE=vllm VLLM_MODEL=Qwen/Qwen2.5-0.5B-Instruct python bench/gpu_bench.py --engine vllm   # a user's GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from processor.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from processor.engines.base import Generation, Prompt  # noqa: E402
from processor.events import validate_event  # noqa: E402
from processor.loop import Worker  # noqa: E402
from processor.prompt import PromptBuilder  # noqa: E402
from processor.settings import load_settings  # noqa: E402
from processor.tools import produce_events  # noqa: E402

FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


class RecordingEngine:
    """Wraps an engine: remembers each generate() call's prompts and its start and end."""

    def __init__(self, engine: Any) -> None:
        self.inner = engine
        self.kind, self.model, self.tokenizer = engine.kind, engine.model, engine.tokenizer
        self.calls: list[tuple[list[Prompt], float, float]] = []

    def generate(self, prompts: Sequence[Prompt]) -> list[Any]:
        started = time.perf_counter()
        out = self.inner.generate(prompts)
        if not prompts[0].event.event_id.startswith("demo-"):  # not the worker's start-up warm-up call
            self.calls.append((list(prompts), started, time.perf_counter()))
        return out

    def capacity(self) -> None:
        return None

    def close(self) -> None:
        self.inner.close()


def synchronize() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass


def make_events(count: int, prompt_tokens: int, tokenizer: Any) -> list[dict[str, Any]]:
    """Events whose rendered prompt is about `prompt_tokens` long with this tokenizer."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import make_event

    builder = PromptBuilder(tokenizer, 1_000_000, 1)
    base = make_event(0, results=4)
    unit = "Consumer lag grows when processing is slower than production; batching on the GPU closes the gap. "
    lo, hi = 0, 400
    while lo < hi:  # how many repetitions of `unit` per result give the wanted length
        mid = (lo + hi) // 2
        event = base | {"results": [dict(r, content=unit * mid) for r in base["results"]]}
        if builder.build(validate_event(event)).prompt_tokens < prompt_tokens:
            lo = mid + 1
        else:
            hi = mid
    return [base | {"event_id": f"gpu-{i:05d}", "results": [dict(r, content=f"{i} " + unit * lo) for r in base["results"]]} for i in range(count)]


def fixed_prompts(events: list[dict[str, Any]], tokenizer: Any, length: int) -> list[Prompt]:
    builder = PromptBuilder(tokenizer, 1_000_000, 1)
    prompts = []
    for event in events:
        prompt = builder.build(validate_event(event))
        ids = (list(prompt.token_ids) * 2)[:length]  # exactly `length` tokens
        prompts.append(replace(prompt, token_ids=tuple(ids)))
    return prompts


def batch_sweep(engine: Any, prompts: list[Prompt], sizes: list[int], events_per_size: int, single_events: int) -> list[dict[str, Any]]:
    engine.generate(prompts[:2])  # warm-up: kernels, allocator
    rows = []
    for size in sizes:
        count = single_events if size == 1 else max(size, (events_per_size // size) * size)
        chosen = prompts[:count]
        synchronize()
        started = time.perf_counter()
        tokens = 0
        for start in range(0, count, size):
            tokens += sum(o.completion_tokens for o in engine.generate(chosen[start : start + size]) if isinstance(o, Generation))
        synchronize()
        seconds = time.perf_counter() - started
        rows.append({"batch": size, "events": count, "seconds": round(seconds, 3), "completion_tokens": tokens,
                     "tokens_per_s": round(tokens / seconds, 1), "events_per_s": round(count / seconds, 3)})
        print(f"  batch {size:>3}: {count:>4} events in {seconds:7.2f} s  {tokens / seconds:9.1f} tokens/s  {count / seconds:7.2f} events/s", flush=True)
    return rows


def replay(engine: Any, batches: list[list[Prompt]], in_thread: bool) -> tuple[float, list[float]]:
    """The engine alone on the given batches: on this thread, or on a worker thread with this one waiting (as in the loop)."""
    import threading

    durations: list[float] = []

    def run() -> None:
        engine.generate(batches[0][:1])  # the same one-prompt warm-up the worker gives its generation thread
        synchronize()
        nonlocal started
        started = time.perf_counter()
        for prompts in batches:
            call_started = time.perf_counter()
            engine.generate(prompts)
            synchronize()
            durations.append(time.perf_counter() - call_started)

    started = time.perf_counter()
    if in_thread:
        thread = threading.Thread(target=run)
        thread.start()
        while thread.is_alive():
            thread.join(0.05)
    else:
        run()
    return time.perf_counter() - started, durations


def processor_vs_engine(engine: Any, settings_overrides: dict[str, Any], events: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    recording = RecordingEngine(engine)
    with EmbeddedBroker() as broker:
        topic = f"gpu-in-{uuid.uuid4().hex[:6]}"
        ensure_topics(broker.bootstrap, {topic: 4, "gpu-out": 4, "gpu-dlq": 1})
        produce_events({"bootstrap.servers": broker.bootstrap}, topic, events)
        settings = load_settings(
            kafka_bootstrap_servers=broker.bootstrap, kafka_input_topic=topic, kafka_output_topic="gpu-out",
            kafka_dlq_topic="gpu-dlq", kafka_group_id="gpu-bench", batch_max_records=batch, batch_max_wait_ms=2000,
            batch_max_prompt_tokens=100_000_000, log_format="text", log_level="WARNING", **settings_overrides,
        )
        worker = Worker(settings, recording, consumer_overrides=FAST_GROUP)
        first: list[float] = []
        original = worker.metrics.consumed

        def consumed(tp: tuple[str, int]) -> None:
            if not first:
                first.append(time.perf_counter())
            original(tp)

        worker.metrics.consumed = consumed  # type: ignore[method-assign]
        cpu_before = time.process_time()
        worker.run(until=lambda: worker.records_committed >= len(events))
        processor_seconds = time.perf_counter() - first[0]
        processor_cpu = time.process_time() - cpu_before
        dead = {s.labels["reason"]: s.value for s in worker.metrics.dead_letters.collect()[0].samples if s.name.endswith("_total")}
        # Random weights sample ids outside the small trained tokenizer, which decode to nothing: those events were
        # generated like the rest and then dead-lettered as empty. Anything else means they never reached the engine.
        generated = sum(len(p) for p, _, _ in recording.calls)
        if generated != len(events) or set(dead) - {"EmptySummaryError"}:
            raise RuntimeError(f"only {generated} of {len(events)} events reached the engine; dead letters: {dead}")
        batches = [p for p, _, _ in recording.calls]
        # The engine alone on exactly the batches the processor formed, the broker still up: on a worker thread as
        # the loop runs it, and on the main thread.
        cpu_before = time.process_time()
        thread_seconds, thread_durations = replay(engine, batches, in_thread=True)
        replay_cpu = time.process_time() - cpu_before
    main_seconds, main_durations = replay(engine, batches, in_thread=False)
    engine_seconds = min(thread_seconds, main_seconds)
    busy = sum(end - start for _, start, end in recording.calls)
    span = recording.calls[-1][2] - recording.calls[0][1]
    return {
        "events": len(events),
        "dead_lettered_empty_after_generation": int(dead.get("EmptySummaryError", 0)),
        "batches": [len(p) for p in batches],
        "processor_seconds": round(processor_seconds, 3),
        "engine_only_seconds": round(engine_seconds, 3),
        "engine_only_thread_seconds": round(thread_seconds, 3),
        "engine_only_main_thread_seconds": round(main_seconds, 3),
        "generate_seconds_in_processor": [round(end - start, 3) for _, start, end in recording.calls],
        "generate_seconds_alone_thread": [round(d, 3) for d in thread_durations],
        "generate_seconds_alone_main": [round(d, 3) for d in main_durations],
        "process_cpu_seconds_processor": round(processor_cpu, 2),
        "process_cpu_seconds_engine_alone_thread": round(replay_cpu, 2),
        "processor_events_per_s": round(len(events) / processor_seconds, 3),
        "engine_only_events_per_s": round(len(events) / engine_seconds, 3),
        "ratio": round(engine_seconds / processor_seconds, 4),
        "engine_idle_share": round(1 - busy / span, 4) if span > 0 else 0.0,
        "engine_idle_share_incl_first_fill_and_last_commit": round(1 - busy / processor_seconds, 4),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["batch_sweep"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["batch"] for r in sweep], [r["tokens_per_s"] for r in sweep], marker="o")
    left.set_xscale("log", base=2)
    left.set_xlabel("events per generate() call")
    left.set_ylabel("completion tokens/s")
    left.set_title(f"throughput vs batch size\n({result['prompt_tokens']} prompt + {result['new_tokens']} new tokens)")
    left.grid(True, alpha=0.3)
    pv = result["processor_vs_engine"]
    bars = right.bar(["engine alone", "full processor"], [pv["engine_only_events_per_s"], pv["processor_events_per_s"]], color=["#888", "#2a7"])
    right.bar_label(bars, fmt="%.2f")
    right.set_ylabel("events/s")
    right.set_title(f"processor / engine = {pv['ratio']:.3f}, engine idle {100 * pv['engine_idle_share']:.1f} %")
    fig.suptitle(f"{result['engine']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--model", help="a model directory; default: build a random-weight Qwen2.5-0.5B-architecture model")
    parser.add_argument("--tiny", action="store_true", help="a toy-size model (a CPU smoke run of the harness)")
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--events-per-size", type=int, default=64)
    parser.add_argument("--single-events", type=int, default=8, help="events for the per-event (batch 1) row")
    parser.add_argument("--processor-events", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model_dir = args.model
    if args.engine == "transformers" and not model_dir:
        from processor.engines.tiny_model import QWEN25_05B, build_tiny_chat_model, sample_corpus

        model_dir = tempfile.mkdtemp(prefix="qwen25-05b-random-")
        shape = {} if args.tiny else dict(QWEN25_05B, dtype="bfloat16")
        started = time.perf_counter()
        build_tiny_chat_model(Path(model_dir), sample_corpus(), **shape)
        # A random model emits any token; the last id of the padded vocabulary stands in for EOS so that every
        # event generates the fixed number of new tokens.
        from transformers import GenerationConfig

        config = json.loads((Path(model_dir) / "config.json").read_text())
        GenerationConfig(eos_token_id=[config["vocab_size"] - 1], pad_token_id=0).save_pretrained(model_dir)
        print(f"built a random-weight model ({'toy' if args.tiny else 'Qwen2.5-0.5B architecture'}) in {time.perf_counter() - started:.1f} s", flush=True)

    overrides: dict[str, Any] = {"engine": args.engine, "sampling_max_tokens": args.new_tokens,
                                 "vllm_max_model_len": args.prompt_tokens + args.new_tokens + 64}
    if args.engine == "transformers":
        overrides["transformers_model"] = model_dir
    elif model_dir:
        overrides["vllm_model"] = model_dir
    settings = load_settings(**overrides)
    from processor.engines import create_engine

    engine = create_engine(settings)
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    print(f"engine {engine.kind} ({engine.model}) on {device}", flush=True)

    events = make_events(max(max(sizes), args.events_per_size, args.processor_events), args.prompt_tokens - 20, engine.tokenizer)
    prompts = fixed_prompts(events, engine.tokenizer, args.prompt_tokens)
    print(f"(a) {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens per event", flush=True)
    sweep = batch_sweep(engine, prompts, sizes, args.events_per_size, args.single_events)
    best = max(sweep, key=lambda r: r["tokens_per_s"])
    single = next((r for r in sweep if r["batch"] == 1), sweep[0])
    speedup = best["tokens_per_s"] / single["tokens_per_s"]
    print(f"    best batch {best['batch']}: {speedup:.1f}× per-event throughput (target ≥ 10×)", flush=True)

    print(f"(b, c) full processor vs engine alone, {args.processor_events} events, batches of {best['batch']}", flush=True)
    settings_overrides = {k: v for k, v in overrides.items() if k != "engine"}
    pv = processor_vs_engine(engine, settings_overrides, events[: args.processor_events], best["batch"])
    print(f"    processor {pv['processor_events_per_s']:.3f} events/s, engine alone {pv['engine_only_events_per_s']:.3f} events/s: "
          f"ratio {pv['ratio']:.3f} (target ≥ 0.95)", flush=True)
    print(f"    generate() seconds per batch — in the processor: {pv['generate_seconds_in_processor']}; alone on a thread: "
          f"{pv['generate_seconds_alone_thread']}; alone on the main thread: {pv['generate_seconds_alone_main']}", flush=True)
    print(f"    process CPU seconds — processor run: {pv['process_cpu_seconds_processor']}, "
          f"engine alone on a thread: {pv['process_cpu_seconds_engine_alone_thread']}", flush=True)
    print(f"    engine idle {100 * pv['engine_idle_share']:.2f} % of wall time between its first and last batch (target < 5 %); "
          f"{100 * pv['engine_idle_share_incl_first_fill_and_last_commit']:.2f} % counting the first fill and the last commit", flush=True)

    result = {
        "engine": engine.kind, "model": "random-weight Qwen2.5-0.5B architecture" if not args.model else engine.model,
        "device": device, "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "batch_sweep": sweep, "best_batch": best["batch"], "speedup_best_vs_single": round(speedup, 2),
        "processor_vs_engine": pv, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    name = "gpu" if device != "cpu" else "gpu-harness-cpu-smoke"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{name}.png")
    print(f"written: {out / (name + '.json')}, {out / (name + '.png')}", flush=True)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
