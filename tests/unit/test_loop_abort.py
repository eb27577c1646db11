"""Continuous mode, ENGINE=vllm: a request caught in a repetition loop is stopped early (CONTINUOUS_LOOP_CHECK_TOKENS),
its summary is what it wrote so far, and the others run on. Against the 0.6.3 double's DELTA outputs."""

import pytest

from processor.engines.base import Generation
from processor.engines.vllm_engine import VllmEngine
from processor.events import validate_event
from processor.guards import guard_summary
from processor.prompt import PromptBuilder
from processor.ops.samples import sample_events
from processor.settings import load_settings


def _engine(tiny_model_dir, **overrides):
    settings = load_settings(engine="vllm", vllm_model=str(tiny_model_dir), sampling_max_tokens=400, **overrides)
    return VllmEngine.from_settings(settings)


def _prompts(engine):
    builder = PromptBuilder(engine.tokenizer, 6144, 400)
    return [builder.build(validate_event(e)) for e in sample_events()[:2]]


def _drain(engine, limit=1000):
    done = {}
    for _ in range(limit):
        for finished in engine.step():
            assert finished.request_id not in done, "each request finishes once"
            done[finished.request_id] = finished.outcome
        if not engine.has_unfinished():
            return done
    raise AssertionError("the engine did not finish within the step limit")


@pytest.fixture()
def looping(fake_vllm, tiny_model_dir):
    def build(**overrides):
        engine = _engine(tiny_model_dir, **overrides)
        engine.llm.loop_ids = engine.tokenizer.hf.encode(" No.", add_special_tokens=False)
        engine.sampling_override = lambda p: {"max_tokens": 400, "ignore_eos": True}
        return engine

    return build


def test_a_looping_request_is_stopped_early_and_its_summary_is_what_it_wrote(looping):
    engine = looping(continuous_loop_check_tokens=16)
    first, second = _prompts(engine)
    engine.add_request("a", first)
    engine.add_request("b", second)
    done = _drain(engine)
    assert set(done) == {"a", "b"}
    for outcome in done.values():
        assert isinstance(outcome, Generation) and outcome.finish_reason == "loop"
        assert outcome.completion_tokens < 100, "stopped long before max_tokens=400"
        assert " ".join(outcome.text.split()).startswith("summary: No. No. No.")
        assert " ".join(guard_summary(outcome.text, outcome.finish_reason).text.split()) == "summary: No."
    assert sorted(sum(engine.llm.llm_engine.aborted, [])) == ["a", "b"]
    assert not engine.has_unfinished()


def test_off_by_default_a_loop_runs_to_max_tokens_reported_once_at_the_end(looping):
    import vllm

    engine = looping()
    engine.add_request("a", _prompts(engine)[0])
    assert engine.llm.llm_engine.waiting[0].params.output_kind == vllm.RequestOutputKind.FINAL_ONLY
    [outcome] = _drain(engine).values()
    assert outcome.finish_reason == "length" and outcome.completion_tokens == 400
    assert engine.llm.llm_engine.aborted == []


def test_streamed_requests_that_do_not_loop_finish_as_usual_with_their_whole_text(fake_vllm, tiny_model_dir):
    import vllm

    streamed = _engine(tiny_model_dir, continuous_loop_check_tokens=2)
    plain = _engine(tiny_model_dir)
    for engine in (streamed, plain):
        for index, prompt in enumerate(_prompts(engine)):
            engine.add_request(f"r{index}", prompt)
    assert streamed.llm.llm_engine.waiting[0].params.output_kind == vllm.RequestOutputKind.DELTA
    assert _drain(streamed) == _drain(plain)


def test_abort_of_a_streamed_request_forgets_it(looping):
    engine = looping(continuous_loop_check_tokens=1000)
    engine.add_request("a", _prompts(engine)[0])
    engine.step()
    engine.abort(iter(["a"]))  # any iterable, as the protocol says
    assert engine.llm.llm_engine.aborted == [["a"]] and not engine.has_unfinished()
    assert engine.step() == []


def test_the_worker_in_continuous_mode_publishes_stopped_loops_trimmed_and_flagged(looping):
    import time

    from processor.codec import EVENT_SCHEMA, SUMMARY_SCHEMA, AvroCodec
    from processor.loop import Worker
    from tests.fakes.kafka import FakeGroupConsumer, FakeProducer
    from tests.helpers import make_event

    codec = AvroCodec()
    engine = looping(continuous_loop_check_tokens=16)
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    for n in range(4):
        consumer.add(0, f"k{n}".encode(), codec.encode(make_event(n), EVENT_SCHEMA))
    settings = load_settings(engine="vllm", generation_mode="continuous", kafka_input_topic="in", kafka_output_topic="out",
                             kafka_dlq_topic="dlq", batch_max_wait_ms=0, shutdown_timeout_s=5, sampling_max_tokens=400,
                             continuous_loop_check_tokens=16)
    worker = Worker(settings, engine, consumer=consumer, producer=producer)
    deadline = time.monotonic() + 20
    worker.run(until=lambda: worker.records_committed >= 4 or time.monotonic() > deadline)
    published = [codec.decode(p.value, SUMMARY_SCHEMA) for p in producer.delivered if p.topic == "out"]
    assert len(published) == 4
    for summary in published:
        assert summary["finish_reason"] == "loop" and summary["completion_tokens"] < 100
        assert summary["quality"]["loop_trimmed"] and not summary["quality"]["cut_off"]
        assert " ".join(summary["summary"].split()) == "summary: No."
