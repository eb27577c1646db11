"""bench/gpu_bench.py's pairs arithmetic: how runs are sized to the time left, what a pair reports, the table line,
events read from a corpus file, and the step count in micro-batch mode. The GPU runs themselves are the bench's
(`python bench/gpu_bench.py --fake ...` smoke-runs them on the CPU)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.gpu_bench import (
    PAIR_OVERHEAD_S,
    RUNS_PER_PAIR,
    StepCounter,
    events_from_file,
    events_per_run,
    mode_summary,
    pair_row,
    pair_seconds_for,
    seeded,
    table_line,
)
from processor.events import validate_event
from tests.helpers import make_event


def test_a_run_is_whole_batches_sized_to_half_a_pair_at_the_engine_alone_speed() -> None:
    # 30 events/s, a 25 s pair: (25 - overhead) / RUNS_PER_PAIR s of the engine alone → 280 events, whole batches of 64.
    wanted = int(30 * (25 - PAIR_OVERHEAD_S) / RUNS_PER_PAIR)
    assert events_per_run(30.0, 25.0, 64, 1024) == wanted // 64 * 64 == 256


def test_a_run_is_at_least_one_batch_and_at_most_the_events_made() -> None:
    assert events_per_run(1.0, 10.0, 22, 512) == 22  # a slow engine still gets one full window
    assert events_per_run(10_000.0, 25.0, 64, 1024) == 1024  # a fast one is capped by the pool (whole batches)
    assert events_per_run(10_000.0, 25.0, 64, 40) == 40  # a pool smaller than a batch: all of it


def test_pairs_shrink_to_fit_the_time_left_and_never_grow_past_the_wanted_length() -> None:
    assert pair_seconds_for(25.0, None, 10) == 25.0
    assert pair_seconds_for(25.0, 1000.0, 10) == 25.0
    assert pair_seconds_for(25.0, 150.0, 10) == 0.9 * 150 / 10
    assert pair_seconds_for(25.0, 0.0, 10) == PAIR_OVERHEAD_S + 1.0  # out of time: the shortest; --stop-at skips it


def run(**overrides: Any) -> dict[str, Any]:
    return {
        "ratio": 0.95, "processor_seconds": 10.0, "engine_only_seconds": 9.5, "completion_tokens": 20_000,
        "engine_only_completion_tokens": 19_000, "steps": 1000, "steps_alone": 990,
        "process_cpu_seconds_processor": 6.0, "process_cpu_seconds_engine_alone": 2.0,
        "processor_events_per_s": 9.5, "engine_only_events_per_s": 10.0, **overrides,
    }


def test_a_pair_reports_tokens_per_s_steps_cpu_and_summaries_per_hour_side_by_side() -> None:
    row = pair_row(run(), wall=23.04)
    assert row["ratio"] == 0.95
    assert row["tokens_per_s"] == 2000.0 and row["tokens_per_s_alone"] == 2000.0
    assert row["tokens_per_s_ratio"] == 1.0  # the same output rate although the events/s ratio is 0.95
    assert row["engine_steps_ratio"] == 0.99
    assert (row["cpu_s"], row["cpu_s_alone"]) == (6.0, 2.0)
    assert row["summaries_per_hour"] == 9.5 * 3600
    assert row["pair_wall_seconds"] == 23.0


def test_an_engine_that_counts_no_steps_reports_no_steps_ratio() -> None:
    assert pair_row(run(steps=0, steps_alone=0), wall=1.0)["engine_steps_ratio"] is None


def test_the_table_line_shows_the_median_and_every_pair() -> None:
    rows = [pair_row(run(ratio=r), wall=20.0) for r in (0.93, 0.97, 0.96)]
    line = table_line("m", "continuous", {"pairs": rows, "events_per_run": 256, "median": mode_summary(rows)})
    assert line.startswith("| m | continuous | 3 × 256 | **0.960** (0.930, 0.970, 0.960) |")
    assert line.count("|") == 11  # ten columns, as the header
    assert "skipped" in table_line("m", "micro_batch", {"pairs": [], "events_per_run": 0})


def test_events_from_a_corpus_file_are_cycled_with_fresh_ids(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(make_event(i), default=str) + "\n" for i in range(3)) + "\n")
    events = events_from_file(path, 7)
    assert len(events) == 7
    assert len({e["event_id"] for e in events}) == 7
    assert all(validate_event(e) for e in events)
    assert events[3]["results"] == events[0]["results"]


def test_micro_batch_steps_are_counted_on_the_engine_under_llm_within_a_window() -> None:
    llm_engine = SimpleNamespace(step=lambda: [])
    engine = SimpleNamespace(llm=SimpleNamespace(llm_engine=llm_engine))
    counter = StepCounter(engine)
    before = time.perf_counter()
    for _ in range(3):
        llm_engine.step()
    middle = time.perf_counter()
    llm_engine.step()
    assert counter.between(before, middle) == 3
    assert counter.between(before, time.perf_counter()) == 4
    assert StepCounter(SimpleNamespace()).between(0.0, time.perf_counter()) == 0  # Transformers: nothing to count


def test_a_seed_per_event_is_the_same_for_an_event_in_both_runs_and_keeps_the_other_overrides() -> None:
    def prompt(event_id: str) -> Any:
        return SimpleNamespace(event=SimpleNamespace(event_id=event_id))

    override = seeded(lambda p: {"max_tokens": 7, "ignore_eos": True})
    first, again, other = override(prompt("e-1")), override(prompt("e-1")), override(prompt("e-2"))
    assert first == again and first["max_tokens"] == 7 and first["ignore_eos"] is True
    assert first["seed"] != other["seed"]
    assert seeded(None)(prompt("e-1"))["seed"] == first["seed"]



def test_the_pace_split_separates_the_engine_cores_own_pace_from_what_the_processor_adds():
    from bench.gpu_bench import pace_split

    # The core took 10 s in the processor's run and 9 s alone; the processor added 0.3 s around it, the engine alone 0.1 s.
    run = {"processor_seconds": 10.3, "engine_only_seconds": 9.1,
           "core_in_processor": {"core_span_s": 10.0}, "core_alone": {"core_span_s": 9.0}}
    split = pace_split(run)
    assert split["core_pace"] == 0.9
    assert split["ratio_at_equal_pace"] == round(10.1 / 10.3, 4)
    assert pace_split({"processor_seconds": 1.0, "engine_only_seconds": 1.0, "core_in_processor": None, "core_alone": None}) == {
        "core_pace": None, "ratio_at_equal_pace": None}
