"""What the continuous mode's uncommitted bound (CONTINUOUS_MAX_UNCOMMITTED) costs, on a simulated engine.

Summaries finish out of order and a partition commits only its contiguous acknowledged prefix, so records pile up
read-but-uncommitted behind each partition's slowest request. The worker stops reading at the bound; if that happens
while the engine has room, the engine runs under-full. This runs the full processor (embedded broker, 4 partitions,
window 64) against the engine alone for several bounds, on a model-free engine whose steps take a fixed time and
whose requests finish after output lengths drawn like real summaries (bench/vllm_modes.py: median ~270 tokens,
tail to 1,536) — the shape of the H100 runs without a GPU, so the figures are about scheduling, not the model.

    .venv/bin/python bench/uncommitted_bound.py            # writes bench/results/uncommitted_bound.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_bench import fixed_prompts, make_events, processor_vs_engine  # noqa: E402
from bench.vllm_modes import MAX_NEW_TOKENS, output_lengths  # noqa: E402
from processor import loop  # noqa: E402
from processor.engines.base import Finished, Generation, InFlightBudget, Prompt  # noqa: E402
from processor.engines.extractive import ExtractiveEngine  # noqa: E402

WINDOW = 64


class SimulatedEngine(ExtractiveEngine):
    """A streaming engine without a model: every step takes `step_s`, and each request finishes after its drawn
    number of output tokens (one per step)."""

    kind = "simulated"

    def __init__(self, step_s: float) -> None:
        super().__init__()
        self.step_s = step_s
        self.lengths: dict[str, int] = {}
        self._live: dict[str, list[Any]] = {}

    def in_flight_budget(self) -> InFlightBudget:
        return InFlightBudget(max_sequences=256, kv_tokens=10**9, block_size=16)

    def _length(self, prompt: Prompt) -> int:
        return self.lengths.get(prompt.event.event_id, 32)

    def add_request(self, request_id: str, prompt: Prompt) -> None:
        self._live[request_id] = [self._length(prompt), prompt]

    def step(self) -> list[Finished]:
        time.sleep(self.step_s)
        finished = []
        for request_id, entry in list(self._live.items()):
            entry[0] -= 1
            if entry[0] <= 0:
                del self._live[request_id]
                prompt = entry[1]
                finished.append(Finished(request_id, Generation("a summary [1]", "length", prompt.prompt_tokens, self._length(prompt))))
        return finished

    def abort(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self._live.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:  # warm-up and probes only
        time.sleep(self.step_s * max(self._length(p) for p in prompts))
        return [Generation("a summary [1]", "length", p.prompt_tokens, self._length(p)) for p in prompts]


class IntakeWatch:
    """Counts, on the worker's own loop, how often the bound stopped reading (each stretch once) and the most it saw
    uncommitted."""

    def __init__(self) -> None:
        self.stops = 0
        self.max_uncommitted = 0
        self._stopped = False
        self._original = loop.Worker._consume

    def __enter__(self) -> "IntakeWatch":
        watch, original = self, self._original

        def consume(worker: loop.Worker) -> None:
            uncommitted = worker.checkpoint.uncommitted
            watch.max_uncommitted = max(watch.max_uncommitted, uncommitted)
            bound = worker.max_uncommitted
            stopped = bound is not None and uncommitted >= bound and worker.pipeline.wanted() > 0
            watch.stops += stopped and not watch._stopped
            watch._stopped = stopped
            original(worker)

        loop.Worker._consume = consume  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        loop.Worker._consume = self._original  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--windows", default="1,2,4,8", help="bounds to run, in in-flight windows of 64")
    parser.add_argument("--step-ms", type=float, default=3.4, help="one engine step (a 0.5B model on an H100: ~3.4 ms)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "uncommitted_bound.json"))
    args = parser.parse_args()

    engine = SimulatedEngine(args.step_ms / 1000)
    events = make_events(args.events, 1480, engine.tokenizer)
    engine.lengths = output_lengths(fixed_prompts(events, engine.tokenizer, 1500))
    rows = []
    for windows in [int(w) for w in args.windows.split(",")]:
        overrides = {"generation_mode": "continuous", "sampling_max_tokens": MAX_NEW_TOKENS, "vllm_max_model_len": 6144,
                     "continuous_max_uncommitted": windows * WINDOW}
        with IntakeWatch() as watch:
            result = processor_vs_engine(engine, overrides, events, WINDOW)
        row = {
            "windows": windows,
            "max_uncommitted": windows * WINDOW,
            "ratio": result["ratio"],
            "engine_steps_ratio": round(result["steps_alone"] / result["steps"], 4),
            "mean_in_flight": result["mean_in_flight"],
            "mean_in_flight_alone": result["mean_in_flight_alone"],
            "intake_stopped_by_the_bound": watch.stops,
            "most_uncommitted_seen": watch.max_uncommitted,
        }
        rows.append(row)
        print(f"  {windows} window(s) = {windows * WINDOW} uncommitted at most: processor / engine alone {row['ratio']:.3f}, "
              f"engine steps {row['engine_steps_ratio']:.3f}, in flight {row['mean_in_flight']:.1f} vs {row['mean_in_flight_alone']:.1f}, "
              f"reading stopped by the bound {watch.stops} times, most uncommitted {watch.max_uncommitted}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"events": args.events, "window": WINDOW, "step_ms": args.step_ms, "partitions": 4,
                               "output_lengths": "bench/vllm_modes.py output_lengths (median ~270, max 1,536)",
                               "rows": rows, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
