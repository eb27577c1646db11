"""bench/vllm_modes.py's build-7b: a Qwen2.5-7B-architecture folder with no weights, for vLLM's load_format=dummy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from bench.vllm_modes import QWEN25_7B, build_7b_config


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_7b_config(tmp_path_factory.mktemp("q7") / "m")


def test_the_7b_folder_has_qwen25_7b_shape_and_a_vocabulary_its_tokenizer_covers(bf16: Path) -> None:
    config = AutoConfig.from_pretrained(bf16)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("qwen2", 3584, 28)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (28, 4, 18944)
    assert not config.tie_word_embeddings
    # vLLM detokenises every sampled id: the model must not be able to sample one the tokenizer lacks.
    assert config.vocab_size == len(AutoTokenizer.from_pretrained(bf16)) == QWEN25_7B["vocab"]
    raw = json.loads((bf16 / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16" and "quantization_config" not in raw
    assert not list(bf16.glob("*.safetensors"))  # no weights: load_format=dummy makes them


def test_the_awq_folder_carries_awq_4_bit_group_128_zero_point_gemm(bf16: Path, tmp_path: Path) -> None:
    awq = build_7b_config(tmp_path / "awq", awq=True, tokenizer_from=bf16)
    raw = json.loads((awq / "config.json").read_text())
    assert raw["quantization_config"] == {"bits": 4, "group_size": 128, "modules_to_not_convert": None,
                                          "quant_method": "awq", "version": "gemm", "zero_point": True}
    assert raw["torch_dtype"] == "float16"
    assert len(AutoTokenizer.from_pretrained(awq)) == raw["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(awq)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")
