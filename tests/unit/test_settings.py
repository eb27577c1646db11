import pytest

from processor.settings import ConfigurationError, EngineKind, load_settings


def test_adr_defaults():
    s = load_settings()
    assert s.kafka_input_topic == "search-results"
    assert s.kafka_output_topic == "search-summaries"
    assert s.kafka_dlq_topic == "search-results.dlq"
    assert s.kafka_group_id == "ai-worker"
    assert s.model == "Qwen/Qwen2.5-7B-Instruct-AWQ"
    assert s.vllm_quantization == "awq"
    assert s.vllm_gpu_memory_utilization == 0.92
    assert s.max_model_len == 6144
    assert s.vllm_use_v1 == 0
    assert (s.sampling_temperature, s.sampling_top_p, s.sampling_max_tokens) == (0.7, 0.9, 1536)


def test_env_names(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9093")
    monkeypatch.setenv("ENGINE", "transformers")
    monkeypatch.setenv("BATCH_MAX_RECORDS", "12")
    monkeypatch.setenv("VLLM_GPU_MEMORY_UTILIZATION", "0.8")
    monkeypatch.setenv("VLLM_QUANTIZATION", "")
    s = load_settings()
    assert s.kafka_bootstrap_servers == "broker:9093"
    assert s.engine is EngineKind.TRANSFORMERS
    assert s.batch_max_records == 12
    assert s.vllm_gpu_memory_utilization == 0.8
    assert s.vllm_quantization is None  # empty: let vLLM choose (awq_marlin on capable GPUs)


@pytest.mark.parametrize(
    "name,value",
    [
        ("VLLM_GPU_MEMORY_UTILIZATION", "1.5"),
        ("VLLM_GPU_MEMORY_UTILIZATION", "lots"),
        ("BATCH_MAX_RECORDS", "0"),
        ("ENGINE", "gpt"),
        ("VLLM_MAX_MODEL_LEN", "-1"),
        ("KAFKA_INPUT_TOPIC", " "),
        ("PROCESSING_GUARANTEE", "maybe"),
    ],
)
def test_a_bad_value_names_the_setting(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_settings()


def test_cross_field_rules_name_the_settings(monkeypatch):
    monkeypatch.setenv("KAFKA_OUTPUT_TOPIC", "search-results")
    with pytest.raises(ConfigurationError, match="KAFKA_OUTPUT_TOPIC"):
        load_settings()
    monkeypatch.delenv("KAFKA_OUTPUT_TOPIC")
    monkeypatch.setenv("SAMPLING_MAX_TOKENS", "8000")
    with pytest.raises(ConfigurationError, match="VLLM_MAX_MODEL_LEN"):
        load_settings()


def test_librdkafka_passthrough(monkeypatch):
    monkeypatch.setenv("KAFKA_OPT_FETCH_MAX_BYTES", "1048576")
    monkeypatch.setenv("KAFKA_OPT_CLIENT_ID", "worker-7")
    conf = load_settings().kafka_common()
    assert conf["fetch.max.bytes"] == "1048576"
    assert conf["client.id"] == "worker-7"


def test_secrets_are_hidden(monkeypatch):
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2-secret")
    s = load_settings()
    assert "hunter2-secret" not in repr(s) and "hunter2-secret" not in str(s.model_dump())
    assert s.kafka_common()["sasl.password"] == "hunter2-secret"  # only librdkafka sees it


def test_a_bad_secret_is_not_echoed(monkeypatch):
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2-secret")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert "hunter2-secret" not in str(info.value)
    assert "KAFKA_SASL_MECHANISM" in str(info.value)


def test_an_openai_request_deadline_must_end_before_the_engine_call_deadline():
    with pytest.raises(ConfigurationError, match="OPENAI_TIMEOUT_S"):
        load_settings(engine="openai", openai_base_url="http://127.0.0.1:1/v1", openai_timeout_s=300, engine_call_timeout_s=300)
    assert load_settings(engine="openai", openai_base_url="http://127.0.0.1:1/v1", openai_timeout_s=60, engine_call_timeout_s=300)
