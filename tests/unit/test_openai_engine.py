"""ENGINE=openai against the in-process OpenAI-compatible double: the taxonomy, the in-flight limit, out-of-order
completion, deadlines, Retry-After, start-up errors, token counting and metrics."""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from processor.engines import attach_metrics, create_engine
from processor.engines.base import Engine, EngineStartupError, EventGenerationError, Generation, StreamingEngine
from processor.engines.isolation import FailurePolicy
from processor.engines.openai_engine import OpenAIEngine, PromptRejectedError, ServerUnavailableError, retry_after_s
from processor.engines.openai_tokenizers import EstimateTokenizer, ServerTokenizer
from processor.errors import EXIT_CONFIG, EXIT_ENGINE_FAILED, EngineUnavailableError
from processor.events import validate_event
from processor.metrics import Metrics
from processor.prompt import PromptBuilder
from processor.settings import load_settings
from tests.fakes.openai_server import FakeOpenAIServer, Reply, chat_tokens, query_of
from tests.helpers import make_event


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer()
    yield fake
    fake.close()


def settings_for(server: FakeOpenAIServer, **overrides: Any):
    values: dict[str, Any] = {"engine": "openai", "openai_base_url": server.base_url, "openai_model": server.model,
                              "openai_timeout_s": 5.0, "infrastructure_retry_timeout_s": 1.0, "max_model_len": 4096,
                              "sampling_max_tokens": 512}
    values.update(overrides)
    return load_settings(**values)


def engine_for(server: FakeOpenAIServer, **overrides: Any) -> OpenAIEngine:
    engine = create_engine(settings_for(server, **overrides))
    assert isinstance(engine, OpenAIEngine)
    return engine


def prompts(engine: OpenAIEngine, count: int) -> list:
    builder = PromptBuilder(engine.tokenizer, engine.settings.max_model_len, engine.settings.sampling_max_tokens)
    return [builder.build(validate_event(make_event(n))) for n in range(count)]


def drain(engine: OpenAIEngine, expected: int, timeout_s: float = 10.0) -> list:
    finished: list = []
    deadline = time.monotonic() + timeout_s
    while len(finished) < expected and time.monotonic() < deadline:
        finished += engine.step()
    return finished


# ------------------------------------------------------------------------------------------------ answers
def test_it_is_an_engine_and_a_streaming_engine_and_summaries_carry_the_servers_usage(server):
    engine = engine_for(server)
    try:
        assert isinstance(engine, Engine) and isinstance(engine, StreamingEngine)
        batch = prompts(engine, 3)
        outputs = engine.generate(batch)
        assert [o.text for o in outputs] == [f"Summary of {p.event.query} [1]." for p in batch]  # input order
        body = server.seen[0].body
        assert body["model"] == server.model and body["max_tokens"] == 512 and body["messages"][0]["role"] == "system"
        # Token counts come from the response's usage, not from the local count.
        server.queue.append(Reply(text="Short.", prompt_tokens=999))
        output = engine.generate(batch[:1])[0]
        assert (output.prompt_tokens, output.completion_tokens) == (999, 2)
        server.queue.append(Reply(text="Short answer here.", usage=False))
        output = engine.generate(batch[:1])[0]
        assert (output.prompt_tokens, output.completion_tokens) == (batch[0].prompt_tokens, 4), "no usage: counted here"
    finally:
        engine.close()


def test_a_batchs_requests_go_out_concurrently_up_to_the_in_flight_limit(server):
    server.respond = lambda _body: Reply(delay_s=0.2)
    engine = engine_for(server, openai_max_in_flight=3)
    try:
        started = time.monotonic()
        outputs = engine.generate(prompts(engine, 7))
        elapsed = time.monotonic() - started
        assert all(isinstance(o, Generation) for o in outputs)
        assert server.max_concurrent == 3, "never more than OPENAI_MAX_IN_FLIGHT at once, and that many"
        assert elapsed < 7 * 0.2, "concurrent, not one by one"
    finally:
        engine.close()


def test_a_requests_deadline_runs_from_its_send_not_from_its_wait_for_a_slot(server):
    """A batch three times the in-flight limit, each request taking 2/3 of the deadline: none times out."""
    server.respond = lambda _body: Reply(delay_s=0.4)
    engine = engine_for(server, openai_max_in_flight=2, openai_timeout_s=0.6)
    try:
        assert all(isinstance(o, Generation) for o in engine.generate(prompts(engine, 6)))
        assert server.max_concurrent == 2
    finally:
        engine.close()


def test_continuous_requests_finish_out_of_order_and_respect_the_limit(server):
    server.respond = lambda body: Reply(delay_s=0.5 if query_of(body).endswith(" 0") else 0.05)
    engine = engine_for(server, openai_max_in_flight=2)
    try:
        batch = prompts(engine, 4)
        assert batch[0].event.query.endswith(" 0")
        for n, prompt in enumerate(batch):
            engine.add_request(f"r{n}", prompt)
        assert engine.has_unfinished()
        started = time.monotonic()
        assert engine.step() == [] or True  # a short wait at most, never the slow request's time
        assert time.monotonic() - started < 0.3
        order = [f.request_id for f in drain(engine, 4)]
        assert sorted(order) == ["r0", "r1", "r2", "r3"] and order[-1] == "r0", order
        assert server.max_concurrent <= 2
        assert not engine.has_unfinished()
    finally:
        engine.close()


def test_an_aborted_request_is_never_reported(server):
    server.respond = lambda body: Reply(delay_s=0.3)
    engine = engine_for(server)
    try:
        batch = prompts(engine, 2)
        engine.add_request("keep", batch[0])
        engine.add_request("gone", batch[1])
        engine.abort(["gone", "unknown"])
        assert [f.request_id for f in drain(engine, 1)] == ["keep"]
        assert not engine.has_unfinished() and engine.step() == []
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------- the taxonomy
@pytest.mark.parametrize("reply", [Reply(status=500), Reply(status=503), Reply(status=429)], ids=["500", "503", "429"])
def test_5xx_and_429_are_infrastructure_in_both_apis(server, reply):
    engine = engine_for(server)
    try:
        batch = prompts(engine, 2)
        server.respond = lambda _body: reply
        with pytest.raises(ServerUnavailableError) as raised:
            engine.generate(batch)
        assert isinstance(raised.value, EngineUnavailableError) and raised.value.exit_code == EXIT_ENGINE_FAILED
        assert not engine.reachable()
        engine.add_request("a", batch[0])
        with pytest.raises(ServerUnavailableError):
            drain(engine, 1)
        server.respond = lambda _body: Reply()
        assert isinstance(engine.generate(batch[:1])[0], Generation) and engine.reachable()
    finally:
        engine.close()


def test_a_step_returns_the_summaries_finished_beside_a_failure_then_raises(server):
    server.respond = lambda body: Reply(status=500) if query_of(body).endswith(" 1") else Reply()
    engine = engine_for(server)
    try:
        batch = prompts(engine, 2)
        engine.add_request("ok", batch[0])
        engine.add_request("bad", batch[1])
        while len(server.seen) < 2 or any(seen.finished is None for seen in server.seen):
            time.sleep(0.01)
        time.sleep(0.05)
        assert [f.request_id for f in engine.step()] == ["ok"]
        with pytest.raises(ServerUnavailableError):
            engine.step()
    finally:
        engine.close()


def test_a_prompt_over_the_servers_context_or_a_content_filter_is_that_records_failure(server):
    replies = {" 0": Reply(status=400, error="This model's maximum context length is 4096 tokens. However, you requested 9000"),
               " 1": Reply(), " 2": Reply(text="", finish_reason="content_filter")}
    server.respond = lambda body: replies[query_of(body)[-2:]]
    engine = engine_for(server)
    try:
        outputs = engine.generate(prompts(engine, 3))
        assert isinstance(outputs[0], PromptRejectedError) and "maximum context length" in str(outputs[0])
        assert isinstance(outputs[1], Generation)
        assert isinstance(outputs[2], PromptRejectedError)
        assert isinstance(outputs[0], EventGenerationError) and engine.reachable()
    finally:
        engine.close()


def test_a_server_that_accepts_and_never_answers_is_bounded_by_the_request_deadline(server):
    server.respond = lambda _body: Reply(hang=True)
    engine = engine_for(server, openai_timeout_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError) as raised:
            engine.generate(prompts(engine, 2))
        assert raised.value.cause == "timeout" and time.monotonic() - started < 3.0
    finally:
        server.release()
        engine.close()


def test_connection_refused_is_infrastructure(server):
    engine = engine_for(server)
    batch = prompts(engine, 1)
    server.close()
    try:
        with pytest.raises(ServerUnavailableError) as raised:
            engine.generate(batch)
        assert raised.value.cause == "connection" and not engine.reachable()
    finally:
        engine.close()


def test_retry_after_holds_the_next_request_at_least_that_long(server):
    engine = engine_for(server)
    try:
        batch = prompts(engine, 1)
        server.queue.append(Reply(status=429, headers={"Retry-After": "1"}))
        with pytest.raises(ServerUnavailableError) as raised:
            engine.generate(batch)
        assert raised.value.retry_after_s == 1.0
        assert isinstance(engine.generate(batch)[0], Generation)
        first, second = server.seen
        assert second.arrived - first.finished >= 0.95, "the retry waited out Retry-After"
    finally:
        engine.close()


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_s("3") == 3.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now=lambda: 1445412480.0) == 10.0


def test_the_probe_tells_a_server_that_fails_everything_from_bad_records(server):
    """Every request 400: the probe fails too, so nothing becomes a dead letter (the engine, not the records)."""
    engine = engine_for(server)
    try:
        batch = prompts(engine, 2)
        server.respond = lambda _body: Reply(status=400, error="malformed")
        policy = FailurePolicy(batch[0])
        with pytest.raises(EngineUnavailableError):
            policy.generate(engine, batch)
        server.respond = lambda body: Reply(status=400, error="too long") if query_of(body).endswith(" 1") else Reply()
        outcomes = policy.generate(engine, batch)
        assert isinstance(outcomes[0], Generation) and isinstance(outcomes[1], PromptRejectedError)
    finally:
        engine.close()


# ----------------------------------------------------------------------------------------------- start-up
def test_a_refused_key_is_a_start_up_error_naming_the_setting_and_the_key_is_sent_but_never_shown():
    server = FakeOpenAIServer(api_key="right")
    try:
        with pytest.raises(EngineStartupError) as raised:
            create_engine(settings_for(server, openai_api_key="wrong"))
        assert raised.value.exit_code == EXIT_CONFIG and "OPENAI_API_KEY" in str(raised.value)
        assert "wrong" not in str(raised.value)
        settings = settings_for(server, openai_api_key="right")
        assert "right" not in repr(settings) and "right" not in str(settings.model_dump())
        engine = create_engine(settings)
        try:
            assert isinstance(engine.generate(prompts(engine, 1))[0], Generation)
            assert server.authorizations[-1] == "Bearer right"
        finally:
            engine.close()
    finally:
        server.close()


def test_a_model_the_server_does_not_list_is_a_start_up_error(server):
    with pytest.raises(EngineStartupError) as raised:
        create_engine(settings_for(server, openai_model="other/model"))
    assert "OPENAI_MODEL=other/model" in str(raised.value) and server.model in str(raised.value)


def test_a_context_setting_beyond_the_servers_is_a_start_up_error_naming_it():
    server = FakeOpenAIServer(max_model_len=2048)
    try:
        with pytest.raises(EngineStartupError) as raised:
            create_engine(settings_for(server))
        assert "VLLM_MAX_MODEL_LEN=2048" in str(raised.value)
        engine = create_engine(settings_for(server, max_model_len=2048))
        engine.close()
    finally:
        server.close()


def test_the_context_comes_from_the_server_unless_vllm_max_model_len_says_less():
    from processor.codec import AvroCodec
    from processor.pipeline import make_pipeline

    server = FakeOpenAIServer(max_model_len=2048)
    try:
        values = {"engine": "openai", "openai_base_url": server.base_url, "openai_model": server.model,
                  "openai_timeout_s": 5.0, "sampling_max_tokens": 512}
        settings = load_settings(**values)
        engine = create_engine(settings)
        assert engine.context_length == 2048, "the server's max_model_len, VLLM_MAX_MODEL_LEN not set"
        pipeline = make_pipeline(settings, engine, AvroCodec())
        assert pipeline.intake.prompts.budget == 2048 - 512, "prompts are packed to the server's context"
        pipeline.close()
        engine.close()
        engine = create_engine(load_settings(**values, max_model_len=1024))
        assert engine.context_length == 1024, "a smaller VLLM_MAX_MODEL_LEN is honoured"
        engine.close()
    finally:
        server.close()


def test_an_unreachable_server_at_start_up_is_waited_for_then_exit_5():
    server = FakeOpenAIServer()
    url = server.base_url
    server.close()
    started = time.monotonic()
    with pytest.raises(EngineUnavailableError) as raised:
        create_engine(load_settings(engine="openai", openai_base_url=url, openai_timeout_s=1.0, infrastructure_retry_timeout_s=0.6))
    assert raised.value.exit_code == EXIT_ENGINE_FAILED and "OPENAI_BASE_URL" in str(raised.value)
    assert 0.5 <= time.monotonic() - started < 5.0


# ------------------------------------------------------------------------------------------ token counting
def test_the_servers_tokenize_counts_the_prompt_template_included(server):
    engine = engine_for(server)
    try:
        assert isinstance(engine.tokenizer, ServerTokenizer)
        prompt = prompts(engine, 1)[0]
        messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
        assert prompt.prompt_tokens == chat_tokens(messages), "what the server will count"
    finally:
        engine.close()


def test_without_tokenize_an_estimate_packs_prompts_that_fit():
    server = FakeOpenAIServer(tokenize=False)
    try:
        engine = engine_for(server)
        try:
            assert isinstance(engine.tokenizer, EstimateTokenizer) and not isinstance(engine.tokenizer, ServerTokenizer)
            event = make_event(0, results=40)
            for result in event["results"]:
                result["content"] = "word " * 400
            prompt = PromptBuilder(engine.tokenizer, 1024, 256).build(validate_event(event))
            real = chat_tokens([{"role": m.role, "content": m.content} for m in prompt.messages])
            assert prompt.results_truncated > 0 and real <= prompt.prompt_tokens <= 1024 - 256
        finally:
            engine.close()
    finally:
        server.close()


def test_the_estimate_is_conservative_and_counts_what_it_truncates():
    tokenizer = EstimateTokenizer()
    assert tokenizer.count("abcdef") == 2 and tokenizer.count("전기차") == 3
    assert tokenizer.count(tokenizer.truncate("abcdefghij 전기차", 4)) == 4
    assert "<|im_start|>" in tokenizer.control_tokens and "[INST]" in tokenizer.control_tokens


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_report_latency_in_flight_retries_by_cause_and_readiness(server):
    engine = engine_for(server)
    metrics = Metrics()
    attach_metrics(engine, metrics)
    metrics.ready(engine_loaded=True, assigned=True)
    try:
        batch = prompts(engine, 2)
        engine.generate(batch)
        server.queue.append(Reply(status=429))
        with pytest.raises(ServerUnavailableError):
            engine.generate(batch[:1])
        value = metrics.registry.get_sample_value
        assert value("ai_worker_server_request_seconds_count") == 3
        assert value("ai_worker_server_retries_total", {"cause": "rate_limited"}) == 1
        assert value("ai_worker_server_requests_in_flight") == 0
        assert not metrics.is_ready, "/readyz: the server is unreachable"
        engine.generate(batch[:1])
        assert metrics.is_ready
    finally:
        engine.close()


# ------------------------------------------------------------------------------------ the Worker, both modes
@pytest.fixture(params=["micro_batch", "continuous"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def worker_for(server: FakeOpenAIServer, mode: str, **overrides: Any):
    from processor.loop import Worker
    from tests.fakes.kafka import FakeGroupConsumer, FakeProducer

    values: dict[str, Any] = {"generation_mode": mode, "kafka_input_topic": "in", "kafka_output_topic": "out",
                              "kafka_dlq_topic": "dlq", "batch_max_wait_ms": 0, "batch_max_records": 4,
                              "shutdown_timeout_s": 5, "infrastructure_retry_timeout_s": 30.0, "openai_max_in_flight": 4}
    values.update(overrides)
    settings = settings_for(server, **values)
    engine = create_engine(settings)
    consumer, producer = FakeGroupConsumer("in"), FakeProducer()
    worker = Worker(settings, engine, consumer=consumer, producer=producer)
    attach_metrics(engine, worker.metrics)
    return worker, engine, consumer, producer


def feed_events(consumer: Any, count: int) -> None:
    from processor.codec import EVENT_SCHEMA, AvroCodec

    for n in range(count):
        consumer.add(0, f"k{n}".encode(), AvroCodec().encode(make_event(n), EVENT_SCHEMA))


def published(producer: Any, topic: str) -> list[str]:
    from processor.codec import AvroCodec
    from processor.records import parse_dead_letter

    if topic == "out":
        return sorted(AvroCodec().decode(p.value, "ai_worker.SearchSummary")["event_id"] for p in producer.delivered if p.topic == "out")
    return [parse_dead_letter(p.key, p.value, p.headers)["error_class"] for p in producer.delivered if p.topic == "dlq"]


def run_worker(worker: Any, until: Any, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    return worker.run(until=lambda: until() or time.monotonic() > deadline)


def test_the_worker_summarises_through_the_server_and_dead_letters_only_what_the_server_refuses(server, mode):
    server.respond = lambda body: Reply(status=400, error="maximum context length") if query_of(body).endswith(" 3") else Reply()
    worker, engine, consumer, producer = worker_for(server, mode)
    feed_events(consumer, 6)
    try:
        assert run_worker(worker, lambda: worker.records_committed >= 6) == 0
    finally:
        engine.close()
    assert published(producer, "out") == [f"evt-00000{n}" for n in range(6) if n != 3]
    assert published(producer, "dlq") == ["PromptRejectedError"]


WARM_UP_REQUESTS = 4  # the warm-up runs the window's shape: OPENAI_MAX_IN_FLIGHT=4 copies of the probe


def failing_after_warm_up(failures: int, reply: Reply):
    """A respond() that answers the warm-up, then fails `failures` requests with `reply`, then answers again."""
    seen = {"n": 0}

    def respond(_body: dict) -> Reply:
        seen["n"] += 1  # the double's handler threads: a race here only shifts which request fails
        return reply if WARM_UP_REQUESTS < seen["n"] <= WARM_UP_REQUESTS + failures else Reply()

    return respond


def test_a_server_failing_for_a_while_holds_the_work_then_summarises_all_of_it(server, mode):
    server.respond = failing_after_warm_up(6, Reply(status=503, headers={"Retry-After": "0"}))
    worker, engine, consumer, producer = worker_for(server, mode)
    feed_events(consumer, 6)
    try:
        assert run_worker(worker, lambda: worker.records_committed >= 6) == 0
    finally:
        engine.close()
    assert published(producer, "out") == [f"evt-00000{n}" for n in range(6)]
    assert published(producer, "dlq") == [], "the server's failure is never a record's"
    assert worker.metrics.registry.get_sample_value("ai_worker_server_retries_total", {"cause": "server_error"}) >= 1


def test_a_server_that_stays_down_ends_the_worker_with_exit_5_and_no_dead_letters(server, mode):
    server.respond = failing_after_warm_up(10**6, Reply(status=500))
    worker, engine, consumer, producer = worker_for(server, mode, infrastructure_retry_timeout_s=1.0)
    feed_events(consumer, 4)
    try:
        assert run_worker(worker, lambda: False) == EXIT_ENGINE_FAILED
    finally:
        engine.close()
    assert producer.produced == [] and worker.records_committed == 0
