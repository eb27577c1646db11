"""Repetition control reaches both engines as settings: vLLM's SamplingParams (0.6.3 names) in both generation
modes, and Transformers' generate()."""

import pytest

from processor.engines.vllm_engine import VllmEngine
from processor.events import validate_event
from processor.prompt import PromptBuilder
from processor.ops.samples import sample_events
from processor.settings import ConfigurationError, load_settings

PENALTIES = {"sampling_repetition_penalty": 1.15, "sampling_frequency_penalty": 0.4, "sampling_presence_penalty": 0.2}


def _prompts(engine, count=2):
    builder = PromptBuilder(engine.tokenizer, 6144, 1536)
    return [builder.build(validate_event(e)) for e in sample_events()[:count]]


def _penalties(params):
    return (params.repetition_penalty, params.frequency_penalty, params.presence_penalty)


def test_vllm_defaults_are_neutral_the_adr_sampling(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(load_settings(engine="vllm", vllm_model=str(tiny_model_dir)))
    engine.generate(_prompts(engine))
    assert _penalties(engine.llm.calls[-1][1]) == (1.0, 0.0, 0.0)


def test_vllm_penalties_reach_generate_and_add_request(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(load_settings(engine="vllm", vllm_model=str(tiny_model_dir), **PENALTIES))
    batch = _prompts(engine)
    engine.generate(batch)
    assert _penalties(engine.llm.calls[-1][1]) == (1.15, 0.4, 0.2)
    engine.add_request("r-1", batch[0])
    assert _penalties(engine.llm.llm_engine.waiting[0].params) == (1.15, 0.4, 0.2)


@pytest.mark.parametrize("name, value", [("SAMPLING_REPETITION_PENALTY", "0"), ("SAMPLING_FREQUENCY_PENALTY", "3"),
                                         ("SAMPLING_NO_REPEAT_NGRAM_SIZE", "-1")])
def test_out_of_range_penalties_name_their_setting(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_settings()


class RecordingModel:
    """Stands in for a Hugging Face model: records generate()'s arguments, answers end-of-turn at once."""

    def __init__(self, torch, eos_id):
        self.torch, self.eos_id, self.kwargs = torch, eos_id, None
        self.generation_config = type("G", (), {"eos_token_id": eos_id})()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.weight])

    def generate(self, input_ids, **kwargs):
        self.kwargs = kwargs
        tail = self.torch.full((input_ids.shape[0], 1), self.eos_id, dtype=self.torch.long)
        return self.torch.cat([input_ids, tail], dim=1)


@pytest.mark.parametrize("overrides, expected", [
    ({}, {"repetition_penalty": None, "no_repeat_ngram_size": None}),
    ({"sampling_repetition_penalty": 1.2, "sampling_no_repeat_ngram_size": 4}, {"repetition_penalty": 1.2, "no_repeat_ngram_size": 4}),
])
def test_transformers_generate_gets_the_penalties(tiny_model_dir, overrides, expected):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer

    from processor.engines.transformers_engine import TransformersEngine

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = RecordingModel(torch, tokenizer.eos_token_id)
    engine = TransformersEngine(model, tokenizer, load_settings(engine="transformers", **overrides), "m")
    engine.generate(_prompts(engine, 1))
    assert {k: model.kwargs.get(k) for k in expected} == expected
