"""The pipeline: one record in, its summary or dead letter out, the same five calls in both generation modes."""

from __future__ import annotations

import time

import pytest

from processor.codec import EVENT_SCHEMA, AvroCodec
from processor.engines.extractive import ExtractiveEngine
from processor.engines.base import InFlightBudget
from processor.pipeline import make_pipeline, reserved_new_tokens
from processor.settings import load_settings
from processor.source import SourceRecord
from tests.helpers import make_event

CODEC = AvroCodec()


class CountingEngine(ExtractiveEngine):
    def __init__(self) -> None:
        super().__init__()
        self.prompts_seen: list[str] = []

    def generate(self, prompts):
        self.prompts_seen += [p.event.event_id for p in prompts]
        return super().generate(prompts)

    def add_request(self, request_id, prompt):
        self.prompts_seen.append(prompt.event.event_id)
        return super().add_request(request_id, prompt)


def source(offset: int, value: bytes, partition: int = 0) -> SourceRecord:
    return SourceRecord("in", partition, offset, b"k", value, None, (), 1)


def take_all(pipeline, count: int) -> list:
    out: list = []
    deadline = time.monotonic() + 10
    while len(out) < count and time.monotonic() < deadline:
        out += pipeline.take()
        pipeline.wait(0.01)
    return out


@pytest.mark.parametrize("mode", ["micro_batch", "continuous"])
def test_a_record_failing_before_the_engine_skips_it_and_comes_out_as_its_dead_letter(mode):
    settings = load_settings(generation_mode=mode, batch_max_records=3, batch_max_wait_ms=0, kafka_output_topic="out",
                             kafka_dlq_topic="dlq")
    engine = CountingEngine()
    pipeline = make_pipeline(settings, engine, CODEC)
    try:
        pipeline.submit(source(0, CODEC.encode(make_event(0), EVENT_SCHEMA)))
        pipeline.submit(source(1, b"not avro"))
        pipeline.submit(source(2, CODEC.encode(make_event(2), EVENT_SCHEMA)))
        records = sorted(take_all(pipeline, 3), key=lambda r: r.source.offset)
    finally:
        pipeline.close()
    assert [(r.source.offset, r.topic, r.reason) for r in records] == [(0, "out", None), (1, "dlq", "BadMagicError"), (2, "out", None)]
    assert set(engine.prompts_seen) == {"evt-000000", "evt-000002"}, "the skip marker never reaches the engine"
    assert pipeline.idle()


@pytest.mark.parametrize("mode", ["micro_batch", "continuous"])
def test_drop_forgets_the_work_of_revoked_partitions(mode):
    settings = load_settings(generation_mode=mode, batch_max_records=8, batch_max_wait_ms=60_000)
    pipeline = make_pipeline(settings, ExtractiveEngine(), CODEC)
    try:
        pipeline.submit(source(0, b"bad", partition=1))  # waits in the open batch (micro) or is done at once (continuous)
        pipeline.submit(source(1, CODEC.encode(make_event(1), EVENT_SCHEMA), partition=0))
        dropped = pipeline.drop([("in", 1)])
        left = take_all(pipeline, 1) if mode == "continuous" else []
    finally:
        pipeline.close()
    assert mode == "continuous" or dropped == 1
    assert all(r.source.partition == 0 for r in left)


def test_the_window_is_the_batch_in_micro_batch_mode_and_what_the_engine_holds_in_continuous_mode():
    micro = make_pipeline(load_settings(generation_mode="micro_batch", batch_max_records=4), ExtractiveEngine(), CODEC)
    continuous = make_pipeline(load_settings(generation_mode="continuous", batch_max_records=4), ExtractiveEngine(), CODEC)
    try:
        assert micro.window() == 4 and continuous.window() == 4
    finally:
        micro.close()
        continuous.close()


class BudgetedExtractive(ExtractiveEngine):
    """The extractive engine reporting a KV cache, as vLLM does: 64 sequences, 10,000 tokens."""

    def in_flight_budget(self) -> InFlightBudget:
        return InFlightBudget(max_sequences=64, kv_tokens=10_000)


@pytest.mark.parametrize("reserve, window", [(None, 10_000 // (2 * 1536)), (100, 10_000 // (2 * 100)), (5000, 10_000 // (2 * 1536))])
def test_continuous_reserve_new_tokens_sets_what_each_request_in_flight_counts_against_the_kv_cache(reserve, window):
    # The window starts from a request's expected cost (twice the reserve, before any prompt is seen): the whole
    # SAMPLING_MAX_TOKENS (1,536) by default, CONTINUOUS_RESERVE_NEW_TOKENS when set, never more than the cap.
    settings = load_settings(generation_mode="continuous", continuous_reserve_new_tokens=reserve)
    assert reserved_new_tokens(settings) == min(reserve if reserve is not None else 1536, 1536)
    pipeline = make_pipeline(settings, BudgetedExtractive(), CODEC)
    try:
        assert pipeline.window() == window
    finally:
        pipeline.close()


def test_the_pipeline_names_its_prompt_version_for_replay():
    from processor.prompt import PromptBuilder

    engine = ExtractiveEngine()
    pipeline = make_pipeline(load_settings(generation_mode="micro_batch"), engine, CODEC)
    settings = load_settings()
    expected = PromptBuilder(engine.tokenizer, settings.max_model_len, settings.sampling_max_tokens, settings.summary_language).version
    assert pipeline.prompt_version == expected
    pipeline.close()


@pytest.mark.parametrize("mode", ["micro_batch", "continuous"])
def test_submit_many_takes_more_than_a_chunk_in_order_with_a_bad_record_among_them(mode):
    from processor.pipeline import INTAKE_CHUNK

    settings = load_settings(generation_mode=mode, batch_max_records=8, batch_max_wait_ms=0, kafka_output_topic="out",
                             kafka_dlq_topic="dlq")
    engine = CountingEngine()
    pipeline = make_pipeline(settings, engine, CODEC)
    count = INTAKE_CHUNK + 5
    values = [b"not avro" if i == INTAKE_CHUNK else CODEC.encode(make_event(i), EVENT_SCHEMA) for i in range(count)]
    try:
        taken, stopped = pipeline.submit_many([source(i, value) for i, value in enumerate(values)])
        records = sorted(take_all(pipeline, count), key=lambda r: r.source.offset)
    finally:
        pipeline.close()
    assert (taken, stopped) == (count, None)
    assert [r.topic for r in records] == ["dlq" if i == INTAKE_CHUNK else "out" for i in range(count)]
    assert set(engine.prompts_seen) == {f"evt-{i:06d}" for i in range(count) if i != INTAKE_CHUNK}
