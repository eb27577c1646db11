"""GPU benchmark: does micro-batching pay, and does the processor keep the engine fed?

With the Transformers engine (or --engine vllm on a box that has it) on a model of Qwen2.5-0.5B-Instruct's
architecture with random bf16 weights (no hub needed), fixed prompt and output lengths:
  (a) per-event generation vs micro-batches of 8, 32 and 64: tokens/s and events/s, and the best batch's speed-up;
  (b) the full processor on the embedded broker vs the engine alone on the very same prompts: the ratio;
  (c) the engine's idle share of wall time inside the processor run.
Targets: (a) ≥ 10× at the best batch size, (b) ≥ 0.95, (c) < 5 %. Writes bench/results/gpu.json (Transformers) or
gpu-<mode>.json (vLLM), and a .png.
--repeats N measures (b) N times, processor and engine alone back to back, and reports the median pair.

--mode continuous runs the processor with GENERATION_MODE=continuous (vLLM's add_request/step through the
ContinuousFeed; ENGINE=vllm or extractive) and compares it with the feed alone on the very same prompts;
--mode micro_batch (the default) with one generate() per batch, as before. --long-tail (vLLM) draws each event's
output length like real summaries (bench/vllm_modes.py: median 268, up to 1,536, max_tokens + ignore_eos).

    python bench/gpu_bench.py                         # builds the random-weight model, runs everything
    ENGINE=vllm VLLM_MODEL=Qwen/Qwen2.5-0.5B-Instruct python bench/gpu_bench.py --engine vllm   # a user's GPU
    python bench/vllm_modes.py build --model-dir /tmp/m     # random weights, full vocabulary (vLLM needs it)
    python bench/gpu_bench.py --engine vllm --model /tmp/m --mode continuous --skip-sweep --batch 64 --long-tail \
        --processor-events 1000 --repeats 3

Pairs for both modes on one engine start (issue 22; bench/pairs_device.sh runs four models this way): --modes
micro_batch,continuous measures each mode's engine alone on two batches first (a warm-up of that path too), sizes
each run so that a pair takes about --pair-seconds (less when --repeats pairs of every mode would not end by
--stop-at), then runs the pairs with the modes interleaved, on one embedded broker. Each pair reports the ratio,
output tokens/s of both runs and their ratio (sampled lengths differ between the runs of a real model), the
engine's steps alone / in the processor (micro-batch too: vLLM's steps under generate()), the process's CPU
seconds in each run, and summaries per hour; the median of each, and one summary table line per mode (TABLE ...).
--events-file reads JSON-lines events (bench/corpus.py); --load-format dummy with a `vllm_modes.py build-7b` folder
runs the ADR's 7B shape with no weights; --batch 0 takes the window the KV cache holds.

    python bench/gpu_bench.py --engine vllm --model DIR --skip-sweep --modes micro_batch,continuous --long-tail \
        --repeats 5 --pair-seconds 25 --name pairs-qwen05b
    python bench/gpu_bench.py --fake --skip-sweep --modes micro_batch,continuous --long-tail --batch 16 \
        --processor-events 64 --repeats 2 --pair-seconds 10     # CPU smoke run on the vLLM 0.6.3 test double
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import processor.loop  # noqa: E402
from processor.ops.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from processor.engines.base import Generation, Prompt  # noqa: E402
from processor.events import validate_event  # noqa: E402
from processor.loop import Worker  # noqa: E402
from processor.pipeline import reserved_new_tokens  # noqa: E402
from processor.prompt import PromptBuilder  # noqa: E402
from processor.settings import load_settings  # noqa: E402
from processor.ops.tools import produce_events  # noqa: E402

from bench.probes import CoreProbe, CpuWindow  # noqa: E402

FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


class RecordingEngine:
    """Wraps an engine: remembers each generate() call's prompts and its start and end."""

    def __init__(self, engine: Any) -> None:
        self.inner = engine
        self.kind, self.model, self.tokenizer = engine.kind, engine.model, engine.tokenizer
        self.calls: list[tuple[list[Prompt], float, float]] = []
        self.completion_tokens = 0  # of the benchmark's own events (not the worker's warm-up)

    def generate(self, prompts: Sequence[Prompt]) -> list[Any]:
        started = time.perf_counter()
        out = self.inner.generate(prompts)
        if not prompts[0].event.event_id.startswith("demo-"):  # not the worker's start-up warm-up call
            self.calls.append((list(prompts), started, time.perf_counter()))
            self.completion_tokens += completion_tokens(out)
        return out

    def capacity(self) -> None:
        return None

    def in_flight_budget(self) -> Any:
        """Forwarded so the Worker warms a GPU engine up at the batch shape, as it does without this wrapper."""
        budget = getattr(self.inner, "in_flight_budget", None)
        return budget() if budget is not None else None

    def close(self) -> None:
        self.inner.close()


class StreamingRecordingEngine(RecordingEngine):
    """RecordingEngine plus the streaming ops (continuous mode): remembers every prompt added (not the
    worker's warm-up), and each step's start, end and the number of requests the engine held."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.added: list[Prompt] = []
        self.steps: list[tuple[float, float, int]] = []
        self.live: set[str] = set()
        self.ours: set[str] = set()  # request ids of the benchmark's own events

    def add_request(self, request_id: str, prompt: Prompt) -> None:
        self.inner.add_request(request_id, prompt)
        self.live.add(request_id)
        if not prompt.event.event_id.startswith("demo-"):
            self.added.append(prompt)
            self.ours.add(request_id)

    def step(self) -> list[Any]:
        started = time.perf_counter()
        finished = self.inner.step()
        self.steps.append((started, time.perf_counter(), len(self.live)))
        self.live.difference_update(f.request_id for f in finished)
        self.completion_tokens += completion_tokens(f.outcome for f in finished if f.request_id in self.ours)
        return finished

    def abort(self, request_ids: Any) -> None:
        ids = list(request_ids)
        self.inner.abort(ids)
        self.live.difference_update(ids)

    def has_unfinished(self) -> bool:
        return self.inner.has_unfinished()

    def in_flight_budget(self) -> Any:
        return self.inner.in_flight_budget()


def completion_tokens(outcomes: Any) -> int:
    return sum(o.completion_tokens for o in outcomes if isinstance(o, Generation))


class StepCounter:
    """Every step of vLLM's engine under `LLM` (generate() steps it too), with its start and end: the engine's
    work in micro-batch mode, where the processor calls generate(). Wraps the instance attribute, as
    vllm_modes.StepProbe does; nothing for an engine without `llm.llm_engine` (Transformers)."""

    def __init__(self, engine: Any) -> None:
        self.steps: list[tuple[float, float]] = []
        llm_engine = getattr(getattr(engine, "llm", None), "llm_engine", None)
        if llm_engine is None:
            return
        step = llm_engine.step

        def counted() -> Any:
            started = time.perf_counter()
            outputs = step()
            self.steps.append((started, time.perf_counter()))
            return outputs

        llm_engine.step = counted

    def between(self, start: float, end: float) -> int:
        return sum(1 for s, e in self.steps if s >= start and e <= end)


def idle_share(steps: list[tuple[float, float, int]], start: float, end: float) -> float:
    """Share of [start, end] in which the engine held no request (each step's interval runs from the last one's end)."""
    previous, idle = start, 0.0
    for _, finished_at, live in steps:
        if start <= finished_at <= end:
            if live == 0:
                idle += finished_at - previous
            previous = finished_at
    idle += max(0.0, end - previous)
    return idle / (end - start) if end > start else 0.0


def mean_in_flight(steps: list[tuple[float, float, int]]) -> float:
    """Requests the engine held, averaged over its steps' time: what a full window would keep at the window."""
    total = sum(end - start for start, end, _ in steps)
    return sum((end - start) * live for start, end, live in steps) / total if total > 0 else 0.0


def feed_alone(engine: Any, prompts: list[Prompt], max_new_tokens: int, window: int | None = None,
               steps: list[tuple[float, float, int]] | None = None) -> tuple[float, int]:
    """The engine alone in continuous mode: every prompt handed to a ContinuousFeed at once, until all finished;
    seconds and completion tokens. `window` caps the sequences in flight exactly as the processor's
    BATCH_MAX_RECORDS does (same refill grouping), so the two runs keep the same number of requests in the engine."""
    import dataclasses

    from processor.continuous import ContinuousFeed

    budget = engine.in_flight_budget()
    if budget is not None and window:
        budget = dataclasses.replace(budget, max_sequences=min(budget.max_sequences, window))
    size = budget.max_sequences if budget is not None else (window or 256)
    recording = StreamingRecordingEngine(engine)
    if steps is not None:
        recording.steps = steps
    feed = ContinuousFeed(recording, budget=budget, max_new_tokens=max_new_tokens, max_sequences_default=size, refill_min=max(1, size // 8))
    try:
        started = time.perf_counter()
        with feed._cond:  # all at once: the feed admits by its budget
            for i, prompt in enumerate(prompts):
                feed.submit(f"alone-{i}", prompt)
        done: dict[str, Any] = {}
        while len(done) < len(prompts):
            if feed.failure is not None:
                raise RuntimeError(f"the engine failed alone: {feed.failure!r}")
            feed.wait(0.5)
            done.update({f.request_id: f.outcome for f in feed.take_finished()})
        seconds = time.perf_counter() - started
    finally:
        feed.close()
    return seconds, sum(o.completion_tokens for o in done.values() if isinstance(o, Generation))


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


class Replay:
    """The engine alone on the given batches, as the loop runs them: seconds from the first batch (after a
    one-prompt warm-up, as the worker gives its generation thread), each batch's seconds, completion tokens."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds = 0.0
        self.durations: list[float] = []
        self.tokens = 0


def replay(engine: Any, batches: list[list[Prompt]], in_thread: bool) -> tuple[float, list[float]]:
    """The engine alone on the given batches: on this thread, or on a worker thread with this one waiting (as in the loop)."""
    result = replay_batches(engine, batches, in_thread)
    return result.seconds, result.durations


def replay_batches(engine: Any, batches: list[list[Prompt]], in_thread: bool) -> Replay:
    import threading

    result = Replay()

    def run() -> None:
        engine.generate(batches[0][:1])
        synchronize()
        result.started = time.perf_counter()
        for prompts in batches:
            call_started = time.perf_counter()
            result.tokens += completion_tokens(engine.generate(prompts))
            synchronize()
            result.durations.append(time.perf_counter() - call_started)

    if in_thread:
        thread = threading.Thread(target=run)
        thread.start()
        while thread.is_alive():
            thread.join(0.05)
    else:
        run()
    result.seconds = time.perf_counter() - result.started
    return result


class Broker:
    """One embedded broker for every pair of a process (its start-up is paid once), or a fresh one per call."""

    def __init__(self, shared: EmbeddedBroker | None = None) -> None:
        self.shared = shared

    def __enter__(self) -> EmbeddedBroker:
        self.own = None if self.shared is not None else EmbeddedBroker().__enter__()
        return self.shared or self.own  # type: ignore[return-value]

    def __exit__(self, *exc: Any) -> None:
        if self.own is not None:
            self.own.__exit__(*exc)


def run_worker(broker: EmbeddedBroker, engine: Any, settings_overrides: dict[str, Any], events: list[dict[str, Any]],
               batch: int) -> tuple[Any, float, float, float, dict[str, int]]:
    """The full processor on the events, on its own topics and group: (settings, first consume, end, process CPU
    seconds, dead letters by reason)."""
    run_id = uuid.uuid4().hex[:6]
    topic, out_topic, dlq = f"gpu-in-{run_id}", f"gpu-out-{run_id}", f"gpu-dlq-{run_id}"
    ensure_topics(broker.bootstrap, {topic: 4, out_topic: 4, dlq: 1})
    produce_events({"bootstrap.servers": broker.bootstrap}, topic, events)
    settings = load_settings(
        kafka_bootstrap_servers=broker.bootstrap, kafka_input_topic=topic, kafka_output_topic=out_topic,
        kafka_dlq_topic=dlq, kafka_group_id=f"gpu-bench-{run_id}", batch_max_records=batch, batch_max_wait_ms=2000,
        batch_max_prompt_tokens=100_000_000, log_format="text", log_level="WARNING", **settings_overrides,
    )
    worker = Worker(settings, engine, consumer_overrides=FAST_GROUP)
    first: list[float] = []  # the processor's clock starts at its first consumed record
    original = worker.metrics.consumed

    def consumed(tp: tuple[str, int]) -> None:
        if not first:
            first.append(time.perf_counter())
        original(tp)

    worker.metrics.consumed = consumed  # type: ignore[method-assign]
    # The processor's clock stops at the commit that completes the run: run() only sees `until` at its next turn,
    # after a wait for records that are not coming (up to POLL_INTERVAL_S) that a stream would have filled.
    done: list[float] = []
    chained = worker.checkpoint.on_committed

    def committed(offsets: Any, count: int) -> None:
        if chained is not None:
            chained(offsets, count)
        if not done and worker.records_committed >= len(events):
            done.append(time.perf_counter())

    worker.checkpoint.on_committed = committed
    cpu_before = time.process_time()
    worker.run(until=lambda: worker.records_committed >= len(events))
    ended = done[0] if done else time.perf_counter()
    cpu = time.process_time() - cpu_before
    dead = {s.labels["reason"]: int(s.value) for s in worker.metrics.dead_letters.collect()[0].samples
            if s.name.endswith("_total") and s.value}
    return settings, (first[0] if first else ended), ended, cpu, dead


def processor_vs_engine(engine: Any, settings_overrides: dict[str, Any], events: list[dict[str, Any]], batch: int,
                        also_main_thread: bool = True, broker: EmbeddedBroker | None = None,
                        counter: StepCounter | None = None, alone_first: list[list[Prompt]] | None = None,
                        replay_out: list[list[Prompt]] | None = None, probe: CoreProbe | None = None) -> dict[str, Any]:
    """micro_batch: the engine alone replays the processor's batches on a thread (as the loop runs it) and, with
    `also_main_thread`, on the main thread too; the faster of the two is the engine's figure. `alone_first`: the
    engine alone runs first, on these batches (an earlier processor run's of the same events), then the processor —
    pairs alternating the order cancel a drift of the engine's speed over the pairs. `replay_out` receives this
    processor run's batches (for such a later pair)."""
    if settings_overrides.get("generation_mode") == "continuous":
        return processor_vs_engine_continuous(engine, settings_overrides, events, batch, broker, alone_first, replay_out, probe)
    recording = RecordingEngine(engine)
    alone_cpu, processor_cpus = CpuWindow(), CpuWindow()
    if alone_first is not None:
        cpu_before = time.process_time()
        with alone_cpu:
            alone = replay_batches(engine, alone_first, in_thread=True)
        replay_cpu = time.process_time() - cpu_before
    with Broker(broker) as live:
        with processor_cpus:
            _, started, ended, processor_cpu, dead = run_worker(live, recording, settings_overrides, events, batch)
        processor_seconds = ended - started
        # Random weights sample ids outside a small trained tokenizer, which decode to nothing: those events were
        # generated like the rest and then dead-lettered as empty. Fewer generated means they never reached the engine.
        generated = sum(len(p) for p, _, _ in recording.calls)
        if generated != len(events):
            raise RuntimeError(f"only {generated} of {len(events)} events reached the engine; dead letters: {dead}")
        batches = [p for p, _, _ in recording.calls]
        if replay_out is not None:
            replay_out[:] = batches
        if alone_first is None:
            # The engine alone on exactly the batches the processor formed, the broker still up: on a worker thread
            # as the loop runs it, and on the main thread.
            cpu_before = time.process_time()
            with alone_cpu:
                alone = replay_batches(engine, batches, in_thread=True)
            replay_cpu = time.process_time() - cpu_before
    thread_seconds, thread_durations = alone.seconds, alone.durations
    main_seconds, main_durations = (replay(engine, batches, in_thread=False) if also_main_thread and alone_first is None
                                    else (float("inf"), []))
    engine_seconds = min(thread_seconds, main_seconds)
    busy = sum(end - start for _, start, end in recording.calls)
    span = recording.calls[-1][2] - recording.calls[0][1]
    steps = counter.between(recording.calls[0][1], recording.calls[-1][2]) if counter else 0
    steps_alone = counter.between(alone.started, alone.started + alone.seconds) if counter else 0
    return {
        "mode": "micro_batch",
        "order": "engine alone first" if alone_first is not None else "processor first",
        "events": len(events),
        "dead_letters": dead,
        "batches": [len(p) for p in batches],
        "processor_seconds": round(processor_seconds, 3),
        "engine_only_seconds": round(engine_seconds, 3),
        "engine_only_thread_seconds": round(thread_seconds, 3),
        "engine_only_main_thread_seconds": round(main_seconds, 3) if main_durations else None,
        "generate_seconds_in_processor": [round(end - start, 3) for _, start, end in recording.calls],
        # The run's edges, outside the engine's span: the first batch's fill (first record read to its generate())
        # and the last batch's publish and commit; the same cost whatever the run's length.
        "first_fill_seconds": round(recording.calls[0][1] - started, 3),
        "last_commit_seconds": round(ended - recording.calls[-1][2], 3),
        "generate_seconds_alone_thread": [round(d, 3) for d in thread_durations],
        "generate_seconds_alone_main": [round(d, 3) for d in main_durations],
        "process_cpu_seconds_processor": round(processor_cpu, 2),
        "process_cpu_seconds_engine_alone_thread": round(replay_cpu, 2),
        "process_cpu_seconds_engine_alone": round(replay_cpu, 2),
        "completion_tokens": recording.completion_tokens,
        "engine_only_completion_tokens": alone.tokens,
        "processor_events_per_s": round(len(events) / processor_seconds, 3),
        "engine_only_events_per_s": round(len(events) / engine_seconds, 3),
        "ratio": round(engine_seconds / processor_seconds, 4),
        "steps": steps,
        "steps_alone": steps_alone,
        "engine_idle_share": round(1 - busy / span, 4) if span > 0 else 0.0,
        "engine_idle_share_incl_first_fill_and_last_commit": round(1 - busy / processor_seconds, 4),
        **outside_interpreter(probe, (recording.calls[0][1], recording.calls[-1][2]), (alone.started, alone.started + alone.seconds),
                              processor_cpus, alone_cpu),
    }


def outside_interpreter(probe: CoreProbe | None, processor_span: tuple[float, float], alone_span: tuple[float, float],
                        processor_cpus: CpuWindow, alone_cpus: CpuWindow) -> dict[str, Any]:
    """Where each run's time went outside this process's interpreter (bench/probes.py): the engine core's pace and
    the front end's lag over each run's engine span, and the CPU of other processes and of this one's threads."""
    return {
        "core_in_processor": probe.between(*processor_span) if probe else None,
        "core_alone": probe.between(*alone_span) if probe else None,
        "cpu_in_processor": processor_cpus.report(),
        "cpu_alone": alone_cpus.report(),
    }


def processor_vs_engine_continuous(engine: Any, settings_overrides: dict[str, Any], events: list[dict[str, Any]], batch: int,
                                   broker: EmbeddedBroker | None = None, alone_first: list[list[Prompt]] | None = None,
                                   replay_out: list[list[Prompt]] | None = None, probe: CoreProbe | None = None) -> dict[str, Any]:
    """(b, c) with GENERATION_MODE=continuous: the processor feeds the engine through its ContinuousFeed; the engine
    alone is a ContinuousFeed given the very same prompts at once (`alone_first`: before the processor, the prompts
    of an earlier processor run of the same events)."""
    max_new_tokens = reserved_new_tokens(load_settings(**settings_overrides))  # what the processor's feed reserves

    alone_cpus, processor_cpus = CpuWindow(), CpuWindow()

    def alone(prompts: list[Prompt]) -> tuple[float, int, float, list[tuple[float, float, int]]]:
        cpu_before = time.process_time()
        alone_steps: list[tuple[float, float, int]] = []
        with alone_cpus:
            seconds, tokens = feed_alone(engine, prompts, max_new_tokens, window=batch, steps=alone_steps)
        return seconds, tokens, time.process_time() - cpu_before, alone_steps

    if alone_first is not None:
        alone_seconds, alone_tokens, alone_cpu, alone_steps = alone(alone_first[0])
    recording = StreamingRecordingEngine(engine)
    with Broker(broker) as live, processor_cpus:
        settings, started, ended, processor_cpu, dead = run_worker(live, recording, settings_overrides, events, batch)
    prompts = list(recording.added)
    if len(prompts) != len(events):
        raise RuntimeError(f"{len(prompts)} of {len(events)} events reached the engine")
    if replay_out is not None:
        replay_out[:] = [prompts]
    steps = [s for s in recording.steps if s[0] >= started]
    first_add = steps[0][0] if steps else started
    last_step = steps[-1][1] if steps else ended
    if alone_first is None:
        alone_seconds, alone_tokens, alone_cpu, alone_steps = alone(prompts)
    processor_seconds = ended - started
    return {
        "mode": "continuous",
        "order": "engine alone first" if alone_first is not None else "processor first",
        "events": len(events),
        "dead_letters": dead,
        "processor_seconds": round(processor_seconds, 3),
        "processor_seconds_engine_span": round(last_step - first_add, 3),
        "first_fill_seconds": round(first_add - started, 3),
        "last_commit_seconds": round(ended - last_step, 3),
        "engine_only_seconds": round(alone_seconds, 3),
        "completion_tokens": recording.completion_tokens,
        "engine_only_completion_tokens": alone_tokens,
        "process_cpu_seconds_processor": round(processor_cpu, 2),
        "process_cpu_seconds_engine_alone": round(alone_cpu, 2),
        "processor_events_per_s": round(len(events) / processor_seconds, 3),
        "engine_only_events_per_s": round(len(events) / alone_seconds, 3),
        "ratio": round(alone_seconds / processor_seconds, 4),
        "steps": len(steps),
        "steps_alone": len(alone_steps),
        "mean_in_flight": round(mean_in_flight(steps), 2),
        "mean_in_flight_alone": round(mean_in_flight(alone_steps), 2),
        "step_ms_median": round(1000 * statistics.median(e - s for s, e, _ in steps), 3) if steps else None,
        "step_ms_median_alone": round(1000 * statistics.median(e - s for s, e, _ in alone_steps), 3) if alone_steps else None,
        "engine_idle_share": round(idle_share(steps, first_add, last_step), 4),
        "engine_idle_share_incl_first_fill_and_last_commit": round(idle_share(steps, started, ended), 4),
        **outside_interpreter(probe, (first_add, last_step), (alone_steps[0][0], alone_steps[-1][1]) if alone_steps else (0.0, 0.0),
                              processor_cpus, alone_cpus),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["batch_sweep"] or [{"batch": result["best_batch"], "tokens_per_s": 0.0}]
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
    right.set_title(f"{pv.get('mode', 'micro_batch')}: processor / engine = {pv['ratio']:.3f}, engine idle {100 * pv['engine_idle_share']:.1f} %")
    fig.suptitle(f"{result['engine']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------ pairs
def events_from_file(path: Path, count: int) -> list[dict[str, Any]]:
    """`count` events from a JSON-lines file (one event a line, as `processor produce` and bench/corpus.py write
    them), cycled with fresh ids when the file holds fewer."""
    base = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not base:
        raise SystemExit(f"{path} holds no event")
    return [dict(base[i % len(base)], event_id=f"{base[i % len(base)]['event_id']}-r{i // len(base)}") if i >= len(base)
            else base[i] for i in range(count)]


def renamed(events: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [dict(e, event_id=f"{prefix}-{i:05d}") for i, e in enumerate(events)]


def calibrate(engine: Any, mode: str, events: list[dict[str, Any]], settings: Any, batch: int) -> dict[str, Any]:
    """The engine alone in `mode` on events of its own (a warm-up of that path too): its events/s."""
    builder = PromptBuilder(engine.tokenizer, settings.max_model_len, settings.sampling_max_tokens, settings.summary_language)
    prompts = [builder.build(validate_event(e)) for e in events]
    if mode == "continuous":
        seconds, tokens = feed_alone(engine, prompts, reserved_new_tokens(settings), window=batch)
    else:
        alone = replay_batches(engine, [prompts[i : i + batch] for i in range(0, len(prompts), batch)], in_thread=True)
        seconds, tokens = alone.seconds, alone.tokens
    return {"events": len(prompts), "seconds": round(seconds, 3), "events_per_s": round(len(prompts) / seconds, 3),
            "completion_tokens": tokens}


# A pair's wall time beyond its two timed runs: the worker's start, its group join (~3 s on the embedded broker with
# FAST_GROUP), producing the events, its stop.
PAIR_OVERHEAD_S = 4.0
# A pair's two runs in engine-alone run lengths: the alone run, and the processor's, longer by up to a quarter.
RUNS_PER_PAIR = 2.25


def events_per_run(rate: float, pair_seconds: float, batch: int, cap: int) -> int:
    """Events for one run of a pair (two runs plus PAIR_OVERHEAD_S), in whole batches, at least one batch."""
    wanted = int(rate * max(0.0, pair_seconds - PAIR_OVERHEAD_S) / RUNS_PER_PAIR)
    return max(batch, min(cap, wanted) // batch * batch) if cap >= batch else cap


# Time a mode needs left to be worth starting: its calibration (two batches alone) and one short pair.
CALIBRATION_MIN_S = 15.0


def pair_seconds_for(wanted: float, seconds_left: float | None, pairs: int) -> float:
    """`wanted`, or less when that many pairs would not fit in the time left (a tenth kept for the drift)."""
    if seconds_left is None or pairs <= 0:
        return wanted
    return max(PAIR_OVERHEAD_S + 1.0, min(wanted, 0.9 * seconds_left / pairs))


def pair_row(run: dict[str, Any], wall: float) -> dict[str, Any]:
    """One pair's figures side by side: processor vs engine alone."""
    def per_s(tokens: int, seconds: float) -> float:
        return round(tokens / seconds, 1) if seconds > 0 else 0.0

    tokens_s, tokens_s_alone = per_s(run["completion_tokens"], run["processor_seconds"]), per_s(
        run["engine_only_completion_tokens"], run["engine_only_seconds"])
    return {
        "ratio": run["ratio"],
        # Sampled lengths (a real model without ignore_eos) differ between the two runs: tokens/s compares the work.
        "tokens_per_s_ratio": round(tokens_s / tokens_s_alone, 4) if tokens_s_alone else None,
        "engine_steps_ratio": round(run["steps_alone"] / run["steps"], 4) if run.get("steps") else None,
        "cpu_s": run["process_cpu_seconds_processor"], "cpu_s_alone": run["process_cpu_seconds_engine_alone"],
        "events_per_s": run["processor_events_per_s"], "events_per_s_alone": run["engine_only_events_per_s"],
        "tokens_per_s": tokens_s, "tokens_per_s_alone": tokens_s_alone,
        "summaries_per_hour": round(3600 * run["processor_events_per_s"]),
        "pair_wall_seconds": round(wall, 1),
        **pace_split(run),
    }


def pace_split(run: dict[str, Any]) -> dict[str, float | None]:
    """The ratio in two factors (vLLM V1, where the engine core's outputs carry its own timestamps): the engine core's
    pace, alone / in the processor (its first to last output batch; the same work, so below 1 the core itself stepped
    slower in the processor's run), and the ratio at equal pace — each run's time outside the core's span (the first
    fill, the last publish and commit, any gap) added to the same core span: what the processor itself costs."""
    core, alone = run.get("core_in_processor"), run.get("core_alone")
    if not core or not alone or core["core_span_s"] <= 0:
        return {"core_pace": None, "ratio_at_equal_pace": None}
    outside = run["processor_seconds"] - core["core_span_s"]
    outside_alone = run["engine_only_seconds"] - alone["core_span_s"]
    return {"core_pace": round(alone["core_span_s"] / core["core_span_s"], 4),
            "ratio_at_equal_pace": round((core["core_span_s"] + outside_alone) / (core["core_span_s"] + outside), 4)}


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 4) if values else None


def mode_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: median_of(rows, key) for key in (
        "ratio", "tokens_per_s_ratio", "engine_steps_ratio", "cpu_s", "cpu_s_alone", "events_per_s",
        "events_per_s_alone", "tokens_per_s", "tokens_per_s_alone", "summaries_per_hour", "core_pace", "ratio_at_equal_pace")}


TABLE_HEADER = ("| model | mode | pairs × events | processor / engine alone: median (each pair) | tokens/s ratio | "
                "engine steps alone / in processor | process CPU s, processor vs alone | events/s processor / alone | "
                "output tokens/s processor / alone | summaries/hour |")


def table_line(label: str, mode: str, block: dict[str, Any]) -> str:
    m, rows = block.get("median") or {}, block["pairs"]
    if not rows:
        return f"| {label} | {mode} | 0 | skipped | | | | | | |"

    def fixed(value: float | None, digits: int) -> str:
        return "—" if value is None else f"{value:,.{digits}f}"

    return (f"| {label} | {mode} | {len(rows)} × {block['events_per_run']} | **{fixed(m['ratio'], 3)}** "
            f"({', '.join(fixed(r['ratio'], 3) for r in rows)}) | {fixed(m['tokens_per_s_ratio'], 3)} | "
            f"{fixed(m['engine_steps_ratio'], 3)} | {fixed(m['cpu_s'], 1)} vs {fixed(m['cpu_s_alone'], 1)} | "
            f"{fixed(m['events_per_s'], 2)} / {fixed(m['events_per_s_alone'], 2)} | "
            f"{fixed(m['tokens_per_s'], 0)} / {fixed(m['tokens_per_s_alone'], 0)} | {fixed(m['summaries_per_hour'], 0)} |")


def run_pairs(engine: Any, args: argparse.Namespace, modes: list[str], overrides: dict[str, Any], pool: list[dict[str, Any]],
              batch: int, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """For each mode: size the runs (--pair-seconds: from the engine alone's speed), then pairs back to back,
    the modes interleaved so that a time limit leaves each as many pairs; no pair starts that would end after
    --stop-at. One broker and one engine serve them all."""
    counter = StepCounter(engine)
    probe = CoreProbe(engine)
    blocks: dict[str, dict[str, Any]] = {}
    replays: dict[str, list[list[Prompt]]] = {}  # each mode's last processor run's batches (prompts)
    late = lambda seconds: bool(args.stop_at) and time.time() + seconds > args.stop_at  # noqa: E731
    with EmbeddedBroker() as broker:
        for mode in modes:
            mode_overrides = dict(overrides, generation_mode=mode)
            settings = load_settings(**mode_overrides)
            # Whole batches: a last, partial micro-batch would wait BATCH_MAX_WAIT_MS for records that never come.
            fixed = min(args.processor_events, len(pool))
            fixed = fixed // batch * batch if fixed >= batch else fixed
            block: dict[str, Any] = {"batch": batch, "events_per_run": fixed, "pairs": [],
                                     "runs": [], "skipped_pairs": 0}
            blocks[mode] = block
            if late(CALIBRATION_MIN_S):
                print(f"    {mode}: no time left to warm up; skipped", flush=True)
                block["events_per_run"] = 0
                continue
            if args.pair_seconds:
                cal_events = renamed(pool[: min(len(pool), 2 * batch)], f"cal-{mode}")
                block["calibration"] = calibrate(engine, mode, cal_events, settings, batch)
            else:
                # Sizes are given: one batch alone as the warm-up of this mode's path at this batch's shape (measured
                # on an H200: without it the first processor run paid 6-7 s more in its first generate() than the
                # same batch alone right after, with the same number of engine steps).
                block["warm_up"] = calibrate(engine, mode, renamed(pool[: min(len(pool), batch)], f"cal-{mode}"), settings, batch)
                print(f"    {mode}: warm-up, engine alone {block['warm_up']['events_per_s']:.2f} events/s on "
                      f"{block['warm_up']['events']} events", flush=True)
        if args.pair_seconds:  # every mode's pairs fitted in the time left, at most --pair-seconds each
            calibrated = [b for b in blocks.values() if "calibration" in b]
            left = args.stop_at - time.time() if args.stop_at else None
            pair_seconds = pair_seconds_for(args.pair_seconds, left, args.repeats * len(calibrated))
            for mode, block in blocks.items():
                if "calibration" not in block:
                    continue
                rate = block["calibration"]["events_per_s"]
                block["events_per_run"] = events_per_run(rate, pair_seconds, batch, len(pool))
                block["estimated_pair_seconds"] = round(PAIR_OVERHEAD_S + RUNS_PER_PAIR * block["events_per_run"] / rate, 1)
                print(f"    {mode}: engine alone {rate:.2f} events/s on {block['calibration']['events']} events → "
                      f"{block['events_per_run']} events per run (a pair ≈ {block['estimated_pair_seconds']} s)", flush=True)
        for repetition in range(args.repeats):
            for mode in modes:
                block = blocks[mode]
                if not block["events_per_run"]:
                    continue
                estimate = block["pairs"][-1]["pair_wall_seconds"] if block["pairs"] else block.get("estimated_pair_seconds", 0.0)
                if late(estimate):
                    block["skipped_pairs"] += 1
                    print(f"    pair {repetition + 1}/{args.repeats} {mode}: skipped (would end after --stop-at)", flush=True)
                    continue
                started = time.perf_counter()
                # Every second pair runs the engine alone first (on the previous run's prompts: the same events), so
                # that a drift of the engine's speed over the pairs favours neither side.
                alone_first = replays.get(mode) if repetition % 2 == 1 else None
                replays[mode] = []
                run = processor_vs_engine(engine, dict(overrides, generation_mode=mode), pool[: block["events_per_run"]], batch,
                                          also_main_thread=args.repeats == 1, broker=broker, counter=counter,
                                          alone_first=alone_first, replay_out=replays[mode], probe=probe)
                row = pair_row(run, time.perf_counter() - started)
                row["order"] = run["order"]
                block["runs"].append(run)
                block["pairs"].append(row)
                block["median"] = mode_summary(block["pairs"])
                print(f"    pair {repetition + 1}/{args.repeats} {mode:<11}: ratio {row['ratio']:.3f}"
                      f"{' (engine alone first)' if alone_first is not None else ''}, tokens/s ratio "
                      f"{row['tokens_per_s_ratio']}, steps ratio {row['engine_steps_ratio']}, CPU s {row['cpu_s']} vs "
                      f"{row['cpu_s_alone']}, {row['events_per_s']} vs {row['events_per_s_alone']} events/s, "
                      f"{row['tokens_per_s']} vs {row['tokens_per_s_alone']} tokens/s, pair {row['pair_wall_seconds']} s", flush=True)
                print(f"      outside the interpreter, processor vs alone: {outside_line(run)}", flush=True)
                save(blocks)
    for block in blocks.values():
        block.setdefault("median", mode_summary(block["pairs"]))
    return blocks


def outside_line(run: dict[str, Any]) -> str:
    core, alone = run.get("core_in_processor"), run.get("core_alone")
    core_text = (f"engine core step {core['core_step_ms_median']} vs {alone['core_step_ms_median']} ms (p90 "
                 f"{core['core_step_ms_p90']} vs {alone['core_step_ms_p90']}), core span {core['core_span_s']} vs "
                 f"{alone['core_span_s']} s, front end lag {core['lag_ms_median']} vs {alone['lag_ms_median']} ms (last "
                 f"{core['lag_ms_last']} vs {alone['lag_ms_last']}); " if core and alone else "")
    split = pace_split(run)
    core_text += (f"core pace alone / in processor {split['core_pace']}, ratio at equal pace {split['ratio_at_equal_pace']}; "
                  if split["core_pace"] is not None else "")
    return (f"{core_text}CPU s by process {run['cpu_in_processor']['processes']} vs {run['cpu_alone']['processes']}, "
            f"by thread {run['cpu_in_processor']['threads']} vs {run['cpu_alone']['threads']}")


def build_engine(args: argparse.Namespace, settings: Any) -> Any:
    if not args.fake:
        from processor.engines import create_engine

        return create_engine(settings)
    import vllm  # the test double (tests/fakes/vllm063), put first on the path by main()

    from processor.engines.vllm_engine import VllmEngine

    return VllmEngine.from_settings(settings, llm_factory=lambda **kw: vllm.LLM(**kw, num_gpu_blocks_override=args.fake_blocks))


def fix_model_lengths(engine: Any, events: list[dict[str, Any]], settings: Any, modes: list[str]) -> dict[str, Any]:
    """--model-lengths: one generate() over the events' prompts (as the processor builds them) with the engine's
    sampling as it is, then every later request of an event asks for exactly the length the model chose for it
    (max_tokens with ignore_eos). A real model's sampled lengths otherwise differ between the two runs of a pair
    (batch-dependent numerics change the samples even with a seed per event): measured on an H200, SmolLM2's engine
    steps differed by up to 22 % between the runs of a continuous-mode pair."""
    builder = PromptBuilder(engine.tokenizer, settings.max_model_len, settings.sampling_max_tokens, settings.summary_language)
    prompts = [builder.build(validate_event(e)) for e in events]
    started = time.perf_counter()
    outcomes = engine.generate(prompts)
    seconds = time.perf_counter() - started
    lengths = {p.event.event_id: max(1, o.completion_tokens) for p, o in zip(prompts, outcomes) if isinstance(o, Generation)}
    for mode in modes:  # the warm-up's events copy the first events
        lengths.update({f"cal-{mode}-{i:05d}": lengths[e["event_id"]] for i, e in enumerate(events) if e["event_id"] in lengths})
    base = engine.sampling_override
    # Events not in the list (the worker's warm-up prompt) get a short answer.
    engine.sampling_override = lambda p: {**(base(p) if base else {}), "max_tokens": lengths.get(p.event.event_id, 32),
                                          "ignore_eos": True}
    values = sorted(lengths[e["event_id"]] for e in events if e["event_id"] in lengths)
    summary = {"events": len(values), "seconds": round(seconds, 2), "median": statistics.median(values) if values else None,
               "max": values[-1] if values else None, "at_cap": sum(1 for v in values if v >= settings.sampling_max_tokens)}
    print(f"    model's own lengths over {summary['events']} events in {seconds:.1f} s: median {summary['median']}, "
          f"max {summary['max']}, {summary['at_cap']} at the cap; fixed for every run", flush=True)
    return summary


def event_seed(event_id: str) -> int:
    """A request's sampling seed from its event id: the same event samples the same tokens in both runs of a pair."""
    return zlib.crc32(event_id.encode("utf-8"))


def seeded(override: Any) -> Any:
    """`override` (a VllmEngine.sampling_override, or None) plus a per-event seed."""
    return lambda prompt: {**(override(prompt) if override else {}), "seed": event_seed(prompt.event.event_id)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--model", help="a model directory; default: build a random-weight Qwen2.5-0.5B-architecture model")
    parser.add_argument("--label", help="the model's name in the summary table (default: --model)")
    parser.add_argument("--tiny", action="store_true", help="a toy-size model (a CPU smoke run of the harness)")
    parser.add_argument("--fake", action="store_true",
                        help="--engine vllm on the vLLM 0.6.3 test double and a toy full-vocabulary model (CPU smoke run)")
    parser.add_argument("--fake-blocks", type=int, default=4000, help="--fake: the KV blocks the double allocates")
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--events-file", help="JSON-lines events (bench/corpus.py) instead of the synthetic ones")
    parser.add_argument("--max-model-len", type=int, help="VLLM_MAX_MODEL_LEN (default: prompt + new tokens + 64)")
    parser.add_argument("--load-format", help="VLLM_LOAD_FORMAT (dummy: random weights from the config alone)")
    parser.add_argument("--quantization", help="VLLM_QUANTIZATION ('' for none; default: the settings')")
    parser.add_argument("--gpu-memory-utilization", type=float, help="VLLM_GPU_MEMORY_UTILIZATION")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--events-per-size", type=int, default=64)
    parser.add_argument("--single-events", type=int, default=8, help="events for the per-event (batch 1) row")
    parser.add_argument("--processor-events", type=int, default=256, help="events per run (with --pair-seconds: the most)")
    parser.add_argument("--mode", choices=["micro_batch", "continuous"], default="micro_batch",
                        help="GENERATION_MODE of the processor run (b, c)")
    parser.add_argument("--modes", help="comma-separated GENERATION_MODEs, one engine for all: e.g. micro_batch,continuous")
    parser.add_argument("--skip-sweep", action="store_true", help="skip (a); (b, c) use --batch")
    parser.add_argument("--batch", type=int, default=64,
                        help="BATCH_MAX_RECORDS for (b, c) with --skip-sweep; 0: the window the KV cache holds")
    parser.add_argument("--long-tail", action="store_true",
                        help="vLLM: per-event output lengths drawn like real summaries (max_tokens with ignore_eos)")
    parser.add_argument("--seed-per-event", action="store_true",
                        help="vLLM: each request sampled with a seed made from its event id, so the processor and the "
                             "engine alone generate the same lengths for the same event (natural lengths: a pair compares "
                             "like with like)")
    parser.add_argument("--model-lengths", action="store_true",
                        help="vLLM: the model's own output lengths, sampled once (one generate() over the events' prompts, "
                             "the settings' sampling, its own stops) and then fixed for every run (max_tokens with "
                             "ignore_eos): natural lengths, and both runs of a pair do the same work")
    parser.add_argument("--repeats", type=int, default=1, help="(b, c): processor/engine-alone pairs, back to back; the median pair is reported")
    parser.add_argument("--pair-seconds", type=float, default=0.0,
                        help="size each run so a pair takes about this long, from the engine alone's speed (0: --processor-events)")
    parser.add_argument("--stop-at", type=float, default=0.0, help="epoch seconds: no pair starts that would end later")
    parser.add_argument("--name", help="result file stem under --out (default: gpu[-<mode>])")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="the GIL switch interval for the whole run, the Worker's included (its own: "
                             "processor.loop.GIL_SWITCH_INTERVAL_S, 1 ms; CPython's default: 5 ms)")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="a worker setting for the processor runs (and the engine alone where it applies), e.g. "
                             "--set continuous_reserve_new_tokens=512; repeatable")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
        processor.loop.GIL_SWITCH_INTERVAL_S = args.switch_interval_ms / 1000  # Worker.run() sets this one
    if args.fake:
        args.engine = "vllm"
        sys.path.insert(0, str(ROOT / "tests" / "fakes" / "vllm063"))
    modes = args.modes.split(",") if args.modes else [args.mode]
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model_dir = args.model
    if args.fake and not model_dir:
        from bench.vllm_modes import build_model

        model_dir = str(build_model(Path(tempfile.mkdtemp(prefix="toy-full-vocab-")), tiny=True))
    if args.engine == "transformers" and not model_dir:
        from processor.ops.tiny_model import QWEN25_05B, build_tiny_chat_model, sample_corpus

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

    if args.long_tail:
        args.new_tokens = 1536  # the longest a drawn length may be: what the feed reserves per request
    overrides: dict[str, Any] = {"engine": args.engine, "sampling_max_tokens": args.new_tokens,
                                 "vllm_max_model_len": args.max_model_len or args.prompt_tokens + args.new_tokens + 64,
                                 "generation_mode": modes[0]}
    if args.engine == "transformers":
        overrides["transformers_model"] = model_dir
    elif model_dir:
        overrides["vllm_model"] = model_dir
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip().lower()] = value.strip()  # the settings model parses it, as from the environment
    for flag, key in (("load_format", "vllm_load_format"), ("quantization", "vllm_quantization"),
                      ("gpu_memory_utilization", "vllm_gpu_memory_utilization")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    settings = load_settings(**overrides)
    engine_started = time.perf_counter()
    engine = build_engine(args, settings)
    startup_seconds = time.perf_counter() - engine_started
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    vllm_version = getattr(getattr(engine, "vllm", None), "__version__", None)
    print(f"engine {engine.kind} {vllm_version or ''} ({engine.model}) on {device}, started in {startup_seconds:.1f} s", flush=True)

    pool_size = max(max(sizes), args.events_per_size, args.processor_events)
    if args.events_file:
        events = events_from_file(Path(args.events_file), pool_size)
    else:
        events = make_events(pool_size, args.prompt_tokens - 20, engine.tokenizer)
    prompts = fixed_prompts(events, engine.tokenizer, args.prompt_tokens)
    if args.long_tail:
        if not hasattr(engine, "sampling_override"):
            raise SystemExit("--long-tail needs --engine vllm (per-request max_tokens with ignore_eos)")
        from bench.vllm_modes import output_lengths

        lengths = output_lengths(prompts)
        for mode in modes:  # the calibration runs' events draw the same lengths as those they copy
            lengths.update({f"cal-{mode}-{i:05d}": lengths[p.event.event_id] for i, p in enumerate(prompts)})
        # Events not in the list (the worker's warm-up prompt) get a short answer.
        engine.sampling_override = lambda p: {"max_tokens": lengths.get(p.event.event_id, 32), "ignore_eos": True}
    if args.seed_per_event:
        if not hasattr(engine, "sampling_override"):
            raise SystemExit("--seed-per-event needs --engine vllm (per-request sampling parameters)")
        engine.sampling_override = seeded(engine.sampling_override)
    model_lengths = None
    if args.model_lengths:
        if not hasattr(engine, "sampling_override") or args.long_tail:
            raise SystemExit("--model-lengths needs --engine vllm and no --long-tail")
        model_lengths = fix_model_lengths(engine, events[: args.processor_events], settings, modes)
    sweep: list[dict[str, Any]] = []
    speedup = None
    batch = args.batch
    if not args.skip_sweep:
        print(f"(a) {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens per event", flush=True)
        sweep = batch_sweep(engine, prompts, sizes, args.events_per_size, args.single_events)
        best = max(sweep, key=lambda r: r["tokens_per_s"])
        single = next((r for r in sweep if r["batch"] == 1), sweep[0])
        speedup = best["tokens_per_s"] / single["tokens_per_s"]
        batch = best["batch"]
        print(f"    best batch {best['batch']}: {speedup:.1f}× per-event throughput (target ≥ 10×)", flush=True)
    budget = engine.in_flight_budget() if hasattr(engine, "in_flight_budget") else None
    if batch == 0:  # the window the KV cache holds at full-length requests, as the product's capacity plan sizes it
        if budget is None:
            raise SystemExit("--batch 0 needs an engine that reports its KV cache (vLLM)")
        cost = budget.request_tokens(args.prompt_tokens, args.new_tokens)
        batch = max(1, min(budget.max_sequences, budget.kv_tokens // cost))
        print(f"    KV cache {budget.kv_tokens:,} tokens, {cost} per request → batch / window {batch}", flush=True)

    label = args.label or (engine.model if args.model else "toy model on the vLLM test double" if args.fake
                           else "toy random-weight model" if args.tiny else "random-weight Qwen2.5-0.5B architecture")
    name = args.name or (("gpu" if device != "cpu" else "gpu-harness-cpu-smoke") + ("" if args.engine == "transformers" else f"-{modes[0]}"))
    name += "-cpu-smoke" if args.name and device == "cpu" else ""
    name += f"-switch{args.switch_interval_ms:g}ms" if args.switch_interval_ms is not None else ""
    result: dict[str, Any] = {
        "engine": engine.kind, "vllm": vllm_version, "model": label, "model_path": engine.model,
        "device": device, "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "engine_startup_seconds": round(startup_seconds, 1),
        "settings": {"prompt_tokens": args.prompt_tokens, "max_new_tokens": args.new_tokens, "long_tail": args.long_tail,
                     "events_file": args.events_file, "max_model_len": settings.max_model_len,
                     "quantization": settings.vllm_quantization, "load_format": settings.vllm_load_format,
                     "gpu_memory_utilization": settings.vllm_gpu_memory_utilization, "batch": batch,
                     "kv_tokens": budget.kv_tokens if budget else None,
                     "sampling": {"temperature": settings.sampling_temperature, "top_p": settings.sampling_top_p}},
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "generation_mode": modes[0],
        "long_tail": args.long_tail, "model_lengths": model_lengths,
        # The GIL switch interval the worker ran at (Worker.run sets its own and restores the process's after).
        "switch_interval_ms": round(min(sys.getswitchinterval(), processor.loop.GIL_SWITCH_INTERVAL_S) * 1000, 3),
        "batch_sweep": sweep, "best_batch": batch, "speedup_best_vs_single": round(speedup, 2) if speedup else None,
    }

    def save(blocks: dict[str, Any]) -> None:
        result["modes"] = blocks
        result["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"(b, c) full processor vs engine alone, GENERATION_MODE={','.join(modes)}, batches / window of {batch}, "
          f"{args.repeats} pairs each", flush=True)
    settings_overrides = {k: v for k, v in overrides.items() if k != "engine"}
    # The engine's own speed drifts between runs on a shared host (median step 3.3-4.2 ms for the very same work
    # on an H100): each pair measures the processor and then the engine alone back to back, and the median pair
    # is reported with every pair's figures.
    blocks = run_pairs(engine, args, modes, settings_overrides, events, batch, save)
    save(blocks)
    print(TABLE_HEADER, flush=True)
    print("|" + "---|" * 10, flush=True)
    for mode, block in blocks.items():
        print("TABLE " + table_line(label, mode, block), flush=True)
        if not block["runs"]:
            continue
        pv = sorted(block["runs"], key=lambda r: r["ratio"])[len(block["runs"]) // 2]
        print(f"    {mode}: engine idle {100 * pv['engine_idle_share']:.2f} % of wall time between its first and last batch "
              f"(target < 5 %); {100 * pv['engine_idle_share_incl_first_fill_and_last_commit']:.2f} % counting the first "
              f"fill and the last commit", flush=True)
    first = next((b for b in blocks.values() if b["runs"]), None)
    if first is not None:
        pv = dict(sorted(first["runs"], key=lambda r: r["ratio"])[len(first["runs"]) // 2])
        pv["ratios_of_all_pairs"] = [r["ratio"] for r in first["runs"]]
        result["processor_vs_engine"] = pv
        save(blocks)
        plot(result, out / f"{name}.png")
    print(f"written: {out / (name + '.json')} (+ .png where matplotlib is installed)", flush=True)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
