"""Configuration: one pydantic-settings class, read from the environment and validated at start-up.

Env names follow the ADR (`VLLM_MODEL`, `VLLM_GPU_MEMORY_UTILIZATION`, ...). librdkafka settings that have no
field of their own pass through with the prefix `KAFKA_OPT_`: `KAFKA_OPT_FETCH_MAX_BYTES=1048576` becomes
`fetch.max.bytes=1048576` on every client the processor makes.
"""

from __future__ import annotations

import logging
import os
from enum import Enum
from typing import Any, Mapping

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from processor.errors import StartupError

KAFKA_PASSTHROUGH_PREFIX = "KAFKA_OPT_"


class ConfigurationError(StartupError):
    """A setting is missing or invalid; the message names the environment variable to fix."""


class EngineKind(str, Enum):
    EXTRACTIVE = "extractive"
    TRANSFORMERS = "transformers"
    VLLM = "vllm"
    OPENAI = "openai"  # any OpenAI-compatible server: vllm serve, Ollama, llama.cpp, TGI, NIM


class GenerationMode(str, Enum):
    MICRO_BATCH = "micro_batch"  # one blocking generate() per batch: the card's shape, the default
    CONTINUOUS = "continuous"  # requests fed to the engine one by one and refilled as each finishes (vLLM)


class ProcessingGuarantee(str, Enum):
    AT_LEAST_ONCE = "at_least_once"
    EXACTLY_ONCE = "exactly_once"


class Settings(BaseSettings):
    """Every knob of the worker. Field names are the env names, lower-cased."""

    # populate_by_name: code and tests may use the engine-neutral field names; the environment uses the ADR's.
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True, populate_by_name=True)

    # Kafka
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_input_topic: str = "search-results"
    kafka_output_topic: str = "search-summaries"
    kafka_dlq_topic: str = "search-results.dlq"
    kafka_group_id: str = "ai-worker"
    kafka_auto_offset_reset: str = Field("earliest", pattern="^(earliest|latest)$")
    kafka_session_timeout_ms: int = Field(45_000, ge=1_000)
    kafka_heartbeat_interval_ms: int = Field(3_000, ge=100)
    kafka_max_poll_interval_ms: int = Field(300_000, ge=1_000)
    kafka_security_protocol: str = Field("PLAINTEXT", pattern="^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$")
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = None
    kafka_ssl_certificate_location: str | None = None
    kafka_ssl_key_location: str | None = None
    kafka_ssl_key_password: SecretStr | None = None
    schema_registry_url: str | None = None

    # Delivery
    processing_guarantee: ProcessingGuarantee = ProcessingGuarantee.AT_LEAST_ONCE
    transactional_id_suffix: str | None = Field(
        None,
        description="exactly_once (required there): makes transactional.id unique and stable per worker — a "
        "StatefulSet pod name, say. Two workers with the same suffix fence each other.",
    )
    max_event_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger input records go to the DLQ undecoded")
    max_event_results: int = Field(
        1_000, ge=1, description="events with more search results go to the DLQ (TooManyResultsError), decided from the "
        "Avro block counts before any result is decoded; the prompt uses the top 100 ranks",
    )
    produce_max_attempts: int = Field(3, ge=1, description="times a batch's output is re-sent before the worker stops")
    delivery_timeout_ms: int = Field(120_000, ge=1_000, description="librdkafka message.timeout.ms per attempt")
    broker_unavailable_timeout_s: float = Field(
        300.0, gt=0, description="all brokers down for longer than this: exit non-zero instead of spinning"
    )
    infrastructure_retry_timeout_s: float = Field(
        300.0, gt=0, description="how long a broken engine, registry or commit is retried (with backoff) before the worker exits"
    )
    # The slowest legal call of the reference setup (Qwen2.5-7B-AWQ on an RTX 4070): a whole batch generating the full
    # SAMPLING_MAX_TOKENS=1,536 tokens at a conservative ~15 tokens/s per sequence under load is 1,536 / 15 ≈ 102 s
    # (decoding a batch runs its sequences side by side, so the batch takes about as long as its longest sequence);
    # 300 s leaves about 3× that for prefill, a slower card or a busier GPU.
    engine_call_timeout_s: float = Field(
        300.0, gt=0, description="an engine call (generate(), or a continuous step() with requests in flight) that has not "
        "returned after this long means a hung engine: the worker exits 5 and leaves the work in flight uncommitted. "
        "Default: 1,536 new tokens at ~15 tokens/s per sequence ≈ 100 s on the reference RTX 4070 + Qwen2.5-7B-AWQ, ~3× margin",
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="on SIGTERM, how long the in-flight batch may still run before it is abandoned"
    )

    # Batching (None: derived from the engine's capacity plan at start-up)
    batch_max_records: int | None = Field(None, ge=1)
    batch_max_wait_ms: int = Field(2_000, ge=0)
    batch_max_prompt_tokens: int | None = Field(None, ge=1)

    # Engine and model (names from the ADR)
    engine: EngineKind = EngineKind.EXTRACTIVE
    generation_mode: GenerationMode = Field(
        GenerationMode.MICRO_BATCH, description="micro_batch (default) or continuous (ENGINE=vllm, openai or extractive)"
    )
    continuous_refill_min: int | None = Field(
        None, ge=1, description="continuous: refill the engine once this many sequence slots are free (default: window/8)"
    )
    continuous_max_uncommitted: int | None = Field(
        None, ge=1, description="continuous: records read but not yet committed, at most (the duplicate bound after a "
        "crash; default: 8 in-flight windows)",
    )
    continuous_reserve_new_tokens: int | None = Field(
        None, ge=0, description="continuous: new tokens counted against the KV budget for each request in flight "
        "(default: SAMPLING_MAX_TOKENS, so vLLM never has to preempt). Lower admits more requests at once — vLLM's "
        "own policy is 0: admit while the prompt fits — and vLLM preempts and later recomputes a request when the "
        "cache runs out: more throughput when most summaries are far shorter than the cap",
    )
    continuous_loop_check_tokens: int = Field(
        0, ge=0, description="continuous, ENGINE=vllm: every this many new tokens, look for a repetition loop in a "
        "request's text so far and stop it there (finish_reason loop), its GPU time returned to others; vLLM then "
        "reports every running request at every step (DELTA outputs). 0: off",
    )
    model: str = Field("Qwen/Qwen2.5-7B-Instruct-AWQ", validation_alias=AliasChoices("vllm_model", "model"))
    vllm_quantization: str | None = "awq"
    vllm_gpu_memory_utilization: float = Field(0.92, gt=0.0, le=1.0)
    max_model_len: int = Field(6144, ge=256, validation_alias=AliasChoices("vllm_max_model_len", "max_model_len"))
    vllm_use_v1: int = Field(0, ge=0, le=1)
    vllm_tensor_parallel_size: int = Field(1, ge=1)
    vllm_max_num_seqs: int = Field(256, ge=1)
    vllm_enable_prefix_caching: bool = False
    vllm_load_format: str = Field(
        "auto", min_length=1, description="vLLM's load_format; dummy: random weights from the model's config alone "
        "(throughput and capacity checks with no weights downloaded)",
    )
    seed: int = Field(0, validation_alias=AliasChoices("vllm_seed", "seed"))
    transformers_model: str | None = Field(None, description="model path or name for ENGINE=transformers; VLLM_MODEL when unset")
    transformers_device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    transformers_dtype: str = Field("auto", pattern="^(auto|float32|float16|bfloat16)$")

    # ENGINE=openai: an OpenAI-compatible server (the official client's variable names for the address and the key)
    openai_base_url: str = Field("http://localhost:8000/v1", description="ENGINE=openai: the server's API root, up to /v1")
    openai_api_key: SecretStr | None = Field(None, description="ENGINE=openai: sent as a Bearer token; a secret, never logged")
    openai_model: str | None = Field(None, description="ENGINE=openai: the served model's name (its /v1/models id); VLLM_MODEL when unset")
    openai_max_in_flight: int = Field(64, ge=1, description="ENGINE=openai: requests sent to the server at once, at most")
    openai_timeout_s: float = Field(
        180.0, gt=0, description="ENGINE=openai: one request's deadline, connect to last byte; a server that accepts and "
        "never answers is an infrastructure failure after this long",
    )
    openai_tokenizer: str | None = Field(
        None, description="ENGINE=openai: a local Hugging Face tokenizer (the served model's) for exact packing; unset: the "
        "server's /tokenize where it has one (vLLM), else an estimate of one token per 3 ASCII or 1 other character",
    )

    # Sampling (ADR: temperature 0.7, top_p 0.9, max_tokens 1536)
    sampling_temperature: float = Field(0.7, ge=0.0)
    sampling_top_p: float = Field(0.9, gt=0.0, le=1.0)
    sampling_max_tokens: int = Field(1536, ge=1)
    # Repetition control (issue 18: a small model loops to the token cap). Neutral by default, the ADR's sampling;
    # the loop guard (processor/guards.py) trims what loops anyway.
    sampling_repetition_penalty: float = Field(
        1.0, gt=0.0, description="both engines: > 1 makes tokens already in the prompt or the summary less likely (1: off)"
    )
    sampling_frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="ENGINE=vllm: lowers a token's logit by this much per time it was generated (0: off)"
    )
    sampling_presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="ENGINE=vllm: lowers a token's logit by this much once it was generated (0: off)"
    )
    sampling_no_repeat_ngram_size: int = Field(
        0, ge=0, description="ENGINE=transformers: never generate an n-gram of this many tokens twice (0: off)"
    )

    # Prompt
    summary_language: str = Field("auto", description="auto: the query's language; or a language name/tag to force")

    # Operations
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve /metrics, /healthz, /readyz")
    log_format: str = Field("json", pattern="^(json|text)$")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")

    @field_validator("kafka_bootstrap_servers", "kafka_input_topic", "kafka_output_topic", "kafka_dlq_topic", "kafka_group_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("vllm_quantization", mode="before")
    @classmethod
    def _empty_quantization_is_none(cls, value: Any) -> Any:
        # An empty VLLM_QUANTIZATION lets vLLM choose (awq_marlin on compute capability >= 8.0).
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        topics = {self.kafka_input_topic, self.kafka_output_topic, self.kafka_dlq_topic}
        if len(topics) != 3:
            raise ValueError("KAFKA_INPUT_TOPIC, KAFKA_OUTPUT_TOPIC and KAFKA_DLQ_TOPIC must be three different topics")
        if self.sampling_max_tokens >= self.max_model_len:
            raise ValueError("SAMPLING_MAX_TOKENS must be smaller than VLLM_MAX_MODEL_LEN: no room is left for the prompt")
        if self.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE and not (self.transactional_id_suffix or "").strip():
            raise ValueError(
                "PROCESSING_GUARANTEE=exactly_once needs TRANSACTIONAL_ID_SUFFIX, stable and unique per worker (a "
                "StatefulSet pod name, say): workers sharing a transactional.id fence each other"
            )
        if self.generation_mode is GenerationMode.CONTINUOUS and self.engine is EngineKind.TRANSFORMERS:
            raise ValueError(
                "GENERATION_MODE=continuous needs an engine that takes requests one by one (ENGINE=vllm, or the "
                "model-free ENGINE=extractive); ENGINE=transformers runs GENERATION_MODE=micro_batch only"
            )
        if self.engine is EngineKind.OPENAI and self.openai_timeout_s >= self.engine_call_timeout_s:
            raise ValueError(
                "OPENAI_TIMEOUT_S must be below ENGINE_CALL_TIMEOUT_S: a request's own deadline must end it before the "
                "engine call is taken for hung"
            )
        if self.kafka_sasl_mechanism and not self.kafka_security_protocol.startswith("SASL"):
            raise ValueError("KAFKA_SASL_MECHANISM needs KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT or SASL_SSL")
        return self

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name → the environment variable that sets it (the ADR's name where the field is engine-neutral)."""
        names = {}
        for name, info in cls.model_fields.items():
            alias = info.validation_alias
            names[name] = (alias.choices[0] if isinstance(alias, AliasChoices) else alias or name).upper()
        return names

    @property
    def model_for_openai(self) -> str:
        return self.openai_model or self.model

    @property
    def model_for_transformers(self) -> str:
        return self.transformers_model or self.model

    def kafka_passthrough(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """librdkafka properties given as KAFKA_OPT_<NAME>=value (NAME with _ for .)."""
        environ = os.environ if environ is None else environ
        return {
            key[len(KAFKA_PASSTHROUGH_PREFIX):].lower().replace("_", "."): value
            for key, value in environ.items()
            if key.upper().startswith(KAFKA_PASSTHROUGH_PREFIX)
        }

    def kafka_common(self) -> dict[str, Any]:
        """Connection and security properties shared by consumer, producer and admin clients."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            # librdkafka's own log lines go through Python logging (JSON, levels) instead of raw stderr.
            "logger": logging.getLogger("librdkafka"),
            "security.protocol": self.kafka_security_protocol,
        }
        optional = {
            "sasl.mechanism": self.kafka_sasl_mechanism,
            "sasl.username": self.kafka_sasl_username,
            "ssl.ca.location": self.kafka_ssl_ca_location,
            "ssl.certificate.location": self.kafka_ssl_certificate_location,
            "ssl.key.location": self.kafka_ssl_key_location,
        }
        conf.update({k: v for k, v in optional.items() if v})
        if self.kafka_sasl_password is not None:
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_key_password is not None:
            conf["ssl.key.password"] = self.kafka_ssl_key_password.get_secret_value()
        conf.update(self.kafka_passthrough())
        return conf


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the environment; raise ConfigurationError naming each bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = "_".join(str(part) for part in error["loc"]).upper() or "settings"
            if not error["loc"]:
                problems.append(error["msg"])
            elif "PASSWORD" in location or "API_KEY" in location:  # never echo a secret back into logs
                problems.append(f"{location}: {error['msg']}")
            else:
                problems.append(f"{location}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigurationError("invalid configuration — " + "; ".join(problems)) from None
