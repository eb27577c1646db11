from processor.capacity import GIB, ModelShape, plan_for, resolve_batch_limits
from processor.settings import load_settings

# Qwen/Qwen2.5-7B-Instruct-AWQ config.json (the fields that matter)
QWEN25_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}


def test_kv_bytes_per_token_counts_grouped_query_attention():
    shape = ModelShape.from_config(QWEN25_7B)
    assert shape.head_dim == 128
    assert shape.kv_bytes_per_token() == 2 * 28 * 4 * 128 * 2 == 57_344
    assert shape.naive_kv_bytes_per_token() == 2 * 3584 * 28 * 2  # the ADR's ~0.4 MB
    assert shape.naive_kv_bytes_per_token() / shape.kv_bytes_per_token() == 7.0


def test_awq_weights_estimate_is_close_to_the_checkpoint():
    # The published AWQ checkpoint is about 5.58 GB on disk.
    assert 5.2e9 < ModelShape.from_config(QWEN25_7B).weight_bytes("awq") < 6.0e9


def test_rtx_4070_plan_and_the_batch_defaults_that_follow():
    settings = load_settings(engine="vllm")
    plan = plan_for(QWEN25_7B, 12 * GIB, settings, "awq")
    assert 60_000 < plan.kv_tokens < 110_000
    assert plan.full_context_sequences == plan.kv_tokens // 6144 >= 10
    # a whole batch's KV fits at once
    assert plan.batch_max_prompt_tokens + plan.batch_max_records * 1536 <= plan.kv_tokens
    limits = resolve_batch_limits(settings, plan)
    assert (limits.max_records, limits.max_prompt_tokens, limits.source) == (plan.batch_max_records, plan.batch_max_prompt_tokens, "capacity plan")
    assert "57,344 B" in plan.report() and "7.0×" in plan.report()


def test_settings_override_the_plan():
    settings = load_settings(engine="vllm", batch_max_records=5, batch_max_prompt_tokens=9000)
    plan = plan_for(QWEN25_7B, 12 * GIB, settings, "awq")
    limits = resolve_batch_limits(settings, plan)
    assert (limits.max_records, limits.max_prompt_tokens, limits.source) == (5, 9000, "settings")


def test_a_gpu_too_small_has_no_tokens():
    plan = plan_for(QWEN25_7B, 6 * GIB, load_settings(engine="vllm"), "awq")
    assert plan.kv_tokens == 0 and plan.full_context_sequences == 0


# --- any model: the config's own quantization_config sizes the weights ---------------------------------------------
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from processor.capacity import ModelConfigNotFoundError, load_model_config, weight_format  # noqa: E402

AWQ_7B_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "qwen2.5-7b-instruct-awq"


def test_the_awq_7b_config_is_sized_as_4_bit_with_vllm_quantization_empty():
    """VLLM_QUANTIZATION empty (the README's Marlin tip): vLLM reads the config's quantization_config, so must the plan."""
    config = load_model_config(AWQ_7B_DIR)
    settings = load_settings(engine="vllm", vllm_quantization="")
    assert settings.vllm_quantization is None and settings.vllm_gpu_memory_utilization == 0.92
    plan = plan_for(config, 12 * GIB, settings, settings.vllm_quantization)
    assert 5.2e9 < plan.weight_bytes < 6.0e9, plan.weight_bytes / GIB  # the checkpoint: 5.58 GB on disk
    assert plan.weight_bytes == plan_for(config, 12 * GIB, settings, "awq").weight_bytes
    assert plan.fits and plan.full_context_sequences >= 10
    assert "awq 4-bit, group 128 (the config's quantization_config)" in plan.report()
    assert "BATCH_MAX_RECORDS" in plan.report()


def test_the_same_shape_without_a_quantization_config_is_16_bit():
    config = {k: v for k, v in load_model_config(AWQ_7B_DIR / "config.json").items() if k != "quantization_config"}
    plan = plan_for(config, 12 * GIB, load_settings(engine="vllm", vllm_quantization=""), None)
    assert 14.0 < plan.weight_bytes / GIB < 14.4 and not plan.fits


@pytest.mark.parametrize(
    "quantization_config, bits, group",
    [
        ({"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False}, 8, 128),
        ({"quant_method": "gptq", "bits": 4, "group_size": -1}, 4, None),  # per channel: no group overhead
        ({"quant_method": "awq", "w_bit": 4, "q_group_size": 64}, 4, 64),  # AutoAWQ's older key names
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, 8, None),
        ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}}}, 8, None),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, 4, None),
    ],
)
def test_bits_per_weight_come_from_the_config(quantization_config, bits, group):
    weights = weight_format({"torch_dtype": "bfloat16", "quantization_config": quantization_config}, None)
    assert (weights.bits, weights.group_size) == (bits, group)
    assert weights.quantized and weights.source == "the config's quantization_config"


def test_a_named_method_sizes_a_config_without_one_and_an_unknown_one_is_sized_unquantized():
    assert weight_format({"torch_dtype": "bfloat16"}, "fp8").bytes_per_weight == 1
    assert weight_format({"torch_dtype": "bfloat16"}, "awq").bytes_per_weight == 0.5 + 2.5 / 128
    unknown = weight_format({"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mystery"}}, None)
    assert unknown.bytes_per_weight == 2 and "mystery not understood" in unknown.describe()


def test_a_hub_id_that_is_not_cached_says_how_to_get_its_config():
    with pytest.raises(ModelConfigNotFoundError) as caught:
        load_model_config("nobody-at-all/no-such-model-7B")
    message = str(caught.value)
    assert "huggingface-cli download nobody-at-all/no-such-model-7B config.json --local-dir DIR" in message


def test_a_folder_without_a_config_names_what_is_missing(tmp_path):
    with pytest.raises(ModelConfigNotFoundError, match="has no config.json"):
        load_model_config(tmp_path)


def test_the_readme_plan_example_is_what_the_command_prints(capsys, monkeypatch):
    """The Capacity plan section's command works as written, from the repository root, and prints its block."""
    import re

    from processor.cli import main

    root = Path(__file__).resolve().parents[2]
    section = (root / "README.md").read_text(encoding="utf-8").split("### Capacity plan")[1].split("\n## ")[0]
    example = re.search(r"`python -m processor (plan tests/fixtures/[^`]+)` prints:\n\n((?:    .*\n)+)", section)
    command, shown = example.group(1), [line[4:] for line in example.group(2).splitlines()]
    monkeypatch.chdir(root)
    monkeypatch.delenv("VLLM_QUANTIZATION", raising=False)
    assert main(command.split()) == 0
    assert capsys.readouterr().out.splitlines()[1:] == shown
