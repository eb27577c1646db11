import pytest

from processor.engines.base import EmptySummaryError, Engine, EventGenerationError, Generation, Prompt
from processor.engines.extractive import ExtractiveEngine
from processor.engines.isolation import EngineCallError, generate_isolated
from processor.events import validate_event
from processor.prompt import PromptBuilder
from processor.ops.samples import sample_events


def prompts_for(events):
    engine = ExtractiveEngine()
    builder = PromptBuilder(engine.tokenizer, 6144, 1536)
    return [builder.build(validate_event(e)) for e in events]


def test_extractive_engine_is_a_real_deterministic_summary():
    engine = ExtractiveEngine()
    assert isinstance(engine, Engine)
    prompts = prompts_for(sample_events())
    first = engine.generate(prompts)
    assert first == engine.generate(prompts)
    for prompt, output in zip(prompts, first):
        assert isinstance(output, Generation)
        assert "[1]" in output.text, "cites the top-ranked result"
        assert output.prompt_tokens == prompt.prompt_tokens and output.completion_tokens > 0
        # Sentences come from the results, not from a template.
        bodies = " ".join(f"{r.snippet} {r.content or ''}" for r in prompt.event.results)
        assert output.text.split(" [")[0] in bodies


def test_extractive_prefers_sentences_about_the_query():
    engine = ExtractiveEngine(max_sentences=1)
    event = sample_events()[0]  # 전기차 배터리 수명
    output = engine.generate(prompts_for([event]))[0]
    assert "배터리" in output.text


def test_extractive_korean_summary_stays_korean():
    output = ExtractiveEngine().generate(prompts_for([sample_events()[2]]))[0]
    assert sum("\uac00" <= ch <= "\ud7a3" for ch in output.text) > 20


def test_no_usable_sentence_is_an_event_failure():
    event = sample_events()[0] | {"results": [{"rank": 1, "title": "t", "url": "u", "snippet": "short", "content": None}]}
    assert isinstance(ExtractiveEngine().generate(prompts_for([event]))[0], EventGenerationError)


class PoisonEngine(ExtractiveEngine):
    """Raises for the whole batch whenever a poisoned event is in it, like a CUDA error or a tokenizer crash."""

    def __init__(self, poisoned: set[str], empty: set[str] = frozenset()):
        super().__init__()
        self.poisoned, self.empty, self.calls = poisoned, empty, 0

    def generate(self, prompts):
        self.calls += 1
        if any(p.event.event_id in self.poisoned for p in prompts):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return [Generation(" ", "stop", 1, 0) if p.event.event_id in self.empty else out for p, out in zip(prompts, super().generate(prompts))]


def test_bisection_isolates_the_failing_events_and_keeps_the_rest():
    events = [e | {"event_id": f"e{i}"} for i, e in enumerate(sample_events() * 3)]
    engine = PoisonEngine({"e4", "e11"})
    outputs = generate_isolated(engine, prompts_for(events))
    failed = [i for i, o in enumerate(outputs) if not isinstance(o, Generation)]
    assert failed == [4, 11]
    assert isinstance(outputs[4], EngineCallError) and "CUDA error" in str(outputs[4])
    assert engine.calls < 2 * 2 * 5 + 1, "bisection, not one call per event"


def test_an_empty_summary_is_a_failure_never_a_summary():
    events = [e | {"event_id": f"e{i}"} for i, e in enumerate(sample_events())]
    outputs = generate_isolated(PoisonEngine(set(), empty={"e2"}), prompts_for(events))
    assert isinstance(outputs[2], EmptySummaryError)
    assert sum(isinstance(o, Generation) for o in outputs) == len(events) - 1


def test_a_wrong_output_count_is_a_failed_call_never_a_crash_nor_blamed_on_the_events():
    from processor.engines.isolation import probe_with
    from processor.errors import EngineUnavailableError

    class Miscounts(ExtractiveEngine):
        """Drops an output on its first `bad` calls (the probe's included), then answers properly."""

        def __init__(self, bad: int) -> None:
            super().__init__()
            self.bad = bad

        def generate(self, prompts):
            self.bad -= 1
            outputs = super().generate(prompts)
            return outputs[:-1] if self.bad >= 0 else outputs

    prompts = prompts_for(sample_events())
    transient = Miscounts(bad=1)
    outcomes = generate_isolated(transient, prompts, probe_with(transient, prompts[0]))
    assert all(isinstance(o, Generation) for o in outcomes), "a call that miscounted once is retried, nobody blamed"
    broken = Miscounts(bad=10_000)
    with pytest.raises(EngineUnavailableError):
        generate_isolated(broken, prompts, probe_with(broken, prompts[0]))


def test_every_event_failed_by_one_sick_call_gets_a_second_try_alone():
    class SickOnce(ExtractiveEngine):
        calls = 0

        def generate(self, prompts):
            self.calls += 1
            outputs = super().generate(prompts)
            return [EventGenerationError("sick") for _ in outputs] if self.calls == 1 else outputs

    outcomes = generate_isolated(SickOnce(), prompts_for(sample_events()))
    assert all(isinstance(o, Generation) for o in outcomes)


def test_the_extractive_engine_streams_out_of_order_with_the_same_summaries():
    from processor.engines.base import StreamingEngine

    engine = ExtractiveEngine()
    assert isinstance(engine, StreamingEngine) and engine.in_flight_budget() is None
    prompts = prompts_for([e | {"event_id": f"s{i}"} for i, e in enumerate(sample_events())])
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt)
    engine.abort(["r1", "unknown"])
    order, outcomes = [], {}
    while engine.has_unfinished():
        for item in engine.step():
            order.append(item.request_id)
            outcomes[item.request_id] = item.outcome
    assert "r1" not in outcomes and sorted(order) == sorted(f"r{i}" for i in range(len(prompts)) if i != 1)
    assert order != sorted(order, key=lambda r: int(r[1:])), "finished out of order"
    expected = ExtractiveEngine().generate(prompts)
    assert all(outcomes[f"r{i}"] == expected[i] for i in range(len(prompts)) if i != 1)


def test_a_poisoned_generate_makes_the_extractive_step_fail_as_a_whole():
    engine = PoisonEngine({"s2"})
    prompts = prompts_for([e | {"event_id": f"s{i}"} for i, e in enumerate(sample_events())])
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt)
    with pytest.raises(RuntimeError, match="CUDA error"):
        while engine.has_unfinished():
            engine.step()


class FailsFirstCalls(ExtractiveEngine):
    """generate() raises for its first `failures` calls that hold event `target` (a transient CUDA error), then works."""

    def __init__(self, target: str, failures: int):
        super().__init__()
        self.target, self.failures, self.calls = target, failures, []

    def generate(self, prompts):
        ids = [p.event.event_id for p in prompts]
        self.calls.append(ids)
        if self.target in ids and self.failures > 0:
            self.failures -= 1
            raise RuntimeError("CUDA error: unspecified launch failure")
        return super().generate(prompts)


def test_an_event_whose_call_failed_alone_is_retried_once_alone_before_it_is_blamed():
    events = [sample_events()[0] | {"event_id": "lone"}]
    engine = FailsFirstCalls("lone", failures=1)
    probe = prompts_for([sample_events()[1] | {"event_id": "probe"}])[0]
    from processor.engines.isolation import probe_with

    [outcome] = generate_isolated(engine, prompts_for(events), probe_with(engine, probe))
    assert isinstance(outcome, Generation), "one transient failure on a batch of one must not dead-letter a good event"
    assert engine.calls == [["lone"], ["probe"], ["lone"]]


def test_an_event_that_fails_alone_twice_is_its_own_failure():
    events = [e | {"event_id": f"e{i}"} for i, e in enumerate(sample_events())]
    engine = FailsFirstCalls("e1", failures=10**6)
    outputs = generate_isolated(engine, prompts_for(events))
    assert isinstance(outputs[1], EngineCallError)
    assert [o for i, o in enumerate(outputs) if i != 1] == ExtractiveEngine().generate(prompts_for([e for i, e in enumerate(events) if i != 1]))
    assert engine.calls.count(["e1"]) == 2, "alone once, then once more alone: no more"


def test_an_engine_fault_spanning_two_retries_alone_is_caught_by_the_probe_between_them():
    from processor.engines.isolation import probe_with
    from processor.errors import EngineUnavailableError

    class SickSpell(ExtractiveEngine):
        """The first call fails two events by error; calls 3 and 4 raise (a two-call fault) whatever they hold."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def generate(self, prompts):
            self.calls += 1
            if self.calls in (3, 4):
                raise RuntimeError("simulated CUDA error")
            outputs = super().generate(prompts)
            return [EventGenerationError("sick") for _ in outputs] if self.calls == 1 else outputs

    events = [e | {"event_id": f"e{i}"} for i, e in enumerate(sample_events()[:2])]
    engine = SickSpell()
    probe = prompts_for([sample_events()[2] | {"event_id": "probe"}])[0]
    with pytest.raises(EngineUnavailableError):
        generate_isolated(engine, prompts_for(events), probe_with(engine, probe))
