"""bench/gpu_bench.py's pairs on the vLLM 0.6.3 double and the test broker: a pair can run the engine alone first, on
an earlier processor run's prompts of the same events (pairs alternate the order, so a drift of the engine's speed
over a series of pairs favours neither side)."""

from __future__ import annotations

import pytest

from processor.engines import create_engine
from processor.settings import load_settings
from tests.helpers import make_event


@pytest.mark.parametrize("mode", ["micro_batch", "continuous"])
def test_a_pair_runs_the_engine_alone_first_on_the_previous_runs_prompts(broker, fake_vllm, tiny_model_dir, mode):
    from bench.gpu_bench import processor_vs_engine

    overrides = {"engine": "vllm", "vllm_model": str(tiny_model_dir), "sampling_max_tokens": 16,
                 "vllm_max_model_len": 2048, "generation_mode": mode}
    engine = create_engine(load_settings(**overrides))
    events = [make_event(i) for i in range(8)]

    first: list = []
    run = processor_vs_engine(engine, overrides, events, 4, also_main_thread=False, broker=broker, replay_out=first)
    assert run["order"] == "processor first"
    assert sorted(p.event.event_id for batch in first for p in batch) == sorted(e["event_id"] for e in events)

    second: list = []
    again = processor_vs_engine(engine, overrides, events, 4, also_main_thread=False, broker=broker,
                                alone_first=first, replay_out=second)
    assert again["order"] == "engine alone first"
    # The engine alone ran the first run's prompts: the same work as both processor runs did.
    assert again["engine_only_completion_tokens"] == run["engine_only_completion_tokens"] == again["completion_tokens"]
    assert again["events"] == 8 and again["processor_events_per_s"] > 0
    # Where each run's time went outside the interpreter: the double has no engine core process to probe.
    assert again["core_in_processor"] is None and set(again["cpu_in_processor"]) == {"processes", "threads"}
    assert sorted(p.event.event_id for batch in second for p in batch) == sorted(e["event_id"] for e in events)


def test_model_lengths_fix_each_events_output_at_the_length_the_model_chose_for_it(fake_vllm, tiny_model_dir):
    from bench.gpu_bench import fix_model_lengths
    from processor.engines.base import Generation
    from processor.events import validate_event
    from processor.prompt import PromptBuilder

    overrides = {"engine": "vllm", "vllm_model": str(tiny_model_dir), "sampling_max_tokens": 16, "vllm_max_model_len": 2048}
    settings = load_settings(**overrides)
    engine = create_engine(settings)
    events = [make_event(i) for i in range(6)]
    summary = fix_model_lengths(engine, events, settings, ["micro_batch"])
    assert summary["events"] == 6 and summary["max"] <= 16
    builder = PromptBuilder(engine.tokenizer, settings.max_model_len, settings.sampling_max_tokens, settings.summary_language)
    prompts = [builder.build(validate_event(e)) for e in events]
    asked = [engine.sampling_override(p) for p in prompts]
    assert all(a["ignore_eos"] for a in asked)
    again = engine.generate(prompts)
    assert [o.completion_tokens for o in again if isinstance(o, Generation)] == [a["max_tokens"] for a in asked]
    # The warm-up's copies of the events ask for the same lengths.
    copy = builder.build(validate_event(dict(events[2], event_id="cal-micro_batch-00002")))
    assert engine.sampling_override(copy)["max_tokens"] == asked[2]["max_tokens"]
