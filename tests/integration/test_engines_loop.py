"""Each engine behind the same loop on a real broker: the loop never knows which one it runs."""

import pytest

from processor.engines import create_engine
from processor.loop import Worker
from processor.ops.samples import sample_events
from tests.helpers import FAST_GROUP, create_topics, make_event, produce, read_all, run_until, settings_for

pytestmark = pytest.mark.broker


def test_transformers_engine_summarises_the_demo_events_through_the_loop(broker, topics, tiny_model_dir):
    create_topics(broker, topics, partitions=2)
    events = sample_events()
    produce(broker, topics["input"], events)
    settings = settings_for(
        broker, topics, engine="transformers", transformers_model=str(tiny_model_dir), sampling_max_tokens=16, vllm_max_model_len=2048,
        generation_mode="micro_batch",  # the Transformers engine has no add_request/step
    )
    worker = Worker(settings, create_engine(settings), consumer_overrides=FAST_GROUP)
    assert run_until(worker, lambda: worker.records_committed >= len(events), timeout_s=120) == 0
    summaries = read_all(broker, topics["output"])
    dead = read_all(broker, topics["dlq"], dead_letters=True, idle=0.5)
    assert len(summaries) + len(dead) == len(events)
    assert all(d["error_class"] == "EmptySummaryError" for d in dead), "random weights may say nothing; nothing else may fail"
    assert len(summaries) >= len(events) - 1
    for summary in summaries:
        assert summary["engine"] == "transformers" and summary["model"] == str(tiny_model_dir)
        assert 0 < summary["completion_tokens"] <= 16 and summary["prompt_tokens"] > 100
        assert summary["finish_reason"] in ("stop", "length")


def test_vllm_engine_double_through_the_loop_and_an_unfittable_prompt_to_the_dlq(broker, topics, fake_vllm, tiny_model_dir):
    create_topics(broker, topics, partitions=1)
    events = [make_event(i, language="ko", results=1 + i) for i in range(5)]  # prompts of five different lengths
    events.insert(2, make_event(99) | {"query": "an enormous query " * 3000})
    placements = produce(broker, topics["input"], events)
    settings = settings_for(broker, topics, engine="vllm", vllm_model=str(tiny_model_dir))
    engine = create_engine(settings)
    worker = Worker(settings, engine, consumer_overrides=FAST_GROUP)
    assert run_until(worker, lambda: worker.records_committed >= 6) == 0
    summaries = read_all(broker, topics["output"])
    dead = read_all(broker, topics["dlq"], dead_letters=True)
    assert sorted(s["event_id"] for s in summaries) == [f"evt-{i:06d}" for i in range(5)]
    assert all(s["engine"] == "vllm" and s["summary"].startswith("summary:") for s in summaries)
    # Each summary belongs to its own event (outputs finish out of order in continuous mode): the prompt vLLM
    # answered is that event's prompt, and the lineage points at that event's record.
    from processor.events import validate_event
    from processor.prompt import PromptBuilder

    builder = PromptBuilder(engine.tokenizer, settings.max_model_len, settings.sampling_max_tokens)
    by_id = {e["event_id"]: (e, placement) for e, placement in zip(events, placements)}
    for summary in summaries:
        event, (partition, offset) = by_id[summary["event_id"]]
        assert summary["prompt_tokens"] == builder.build(validate_event(event)).prompt_tokens
        assert (summary["source_partition"], summary["source_offset"]) == (partition, offset)
    assert len({s["prompt_tokens"] for s in summaries}) == 5
    assert [(d["error_class"], d["event_id"]) for d in dead] == [("PromptTooLongError", "evt-000099")]
    assert "every search result cut" in dead[0]["error_message"]
