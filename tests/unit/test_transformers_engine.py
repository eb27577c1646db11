"""The Transformers engine, for real, on a tiny random-weight Qwen2 model built by the test session."""

import pytest

from processor.engines import create_engine
from processor.engines.base import EngineStartupError, Generation
from processor.engines.transformers_engine import TransformersEngine
from processor.events import validate_event
from processor.prompt import PromptBuilder
from processor.ops.samples import sample_events
from processor.settings import load_settings
from tests.helpers import make_event


def settings(model_dir, **overrides):
    values = {"engine": "transformers", "transformers_model": str(model_dir), "sampling_max_tokens": 12, "vllm_max_model_len": 2048,
              "generation_mode": "micro_batch"}
    values.update(overrides)
    return load_settings(**values)


def test_batched_generation_with_left_padding_matches_one_by_one(tiny_model_dir):
    engine = create_engine(settings(tiny_model_dir, sampling_temperature=0.0))  # greedy: comparable
    assert isinstance(engine, TransformersEngine)
    builder = PromptBuilder(engine.tokenizer, 2048, 12)
    batch = [builder.build(validate_event(e)) for e in sample_events()]
    assert len({p.prompt_tokens for p in batch}) > 1, "different lengths, so padding matters"
    together = engine.generate(batch)
    alone = [engine.generate([p])[0] for p in batch]
    for prompt, a, b in zip(batch, together, alone):
        assert isinstance(a, Generation) and a.prompt_tokens == prompt.prompt_tokens
        assert a.finish_reason in ("stop", "length") and 0 <= a.completion_tokens <= 12
        assert a.text == b.text, "left padding must not change what a prompt generates"


def test_sampling_settings_are_applied(tiny_model_dir):
    engine = create_engine(settings(tiny_model_dir, sampling_max_tokens=5))
    builder = PromptBuilder(engine.tokenizer, 2048, 5)
    out = engine.generate([builder.build(validate_event(make_event(1, language="ko")))])[0]
    assert out.completion_tokens <= 5
    assert out.finish_reason == ("length" if out.completion_tokens == 5 else "stop")


def test_a_korean_event_with_8_long_results_fits_the_real_tokenizer(tiny_model_dir):
    engine = create_engine(settings(tiny_model_dir, vllm_max_model_len=6144, sampling_max_tokens=1536))
    raw = make_event(2, language="ko", results=8)
    for result in raw["results"]:
        result["content"] = "배터리 수명을 늘리려면 충전 상태를 20~80% 사이로 유지하는 것이 좋습니다. " * 60
    prompt = PromptBuilder(engine.tokenizer, 6144, 1536).build(validate_event(raw))
    assert prompt.prompt_tokens <= 6144 - 1536
    assert prompt.results_used == 8 and prompt.results_truncated >= 1
    assert prompt.prompt_tokens == len(engine.tokenizer.chat_token_ids(prompt.messages))


def test_a_context_longer_than_the_model_fails_at_start_up(tiny_model_dir):
    with pytest.raises(EngineStartupError, match="VLLM_MAX_MODEL_LEN"):
        create_engine(settings(tiny_model_dir, vllm_max_model_len=100_000, sampling_max_tokens=16))


def test_a_missing_model_names_the_setting(tmp_path):
    with pytest.raises(EngineStartupError, match="TRANSFORMERS_MODEL"):
        create_engine(settings(tmp_path / "nope"))
