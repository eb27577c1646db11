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
