"""Capacity arithmetic: how much KV cache fits on the GPU, and the batch limits that follow from it.

KV bytes per token = 2 (K and V) × layers × KV heads × head dim × KV dtype bytes. Qwen2.5-7B uses grouped-query
attention with 4 KV heads of 128, so it needs 2 × 28 × 4 × 128 × 2 = 57,344 B/token (56 KiB), not the
2 × hidden × layers × 2 ≈ 0.4 MB that ignores GQA (7× more).

Tokens that fit = (GPU memory × VLLM_GPU_MEMORY_UTILIZATION − weights − activation reserve) / KV bytes per token.
The batch limits are chosen so a whole micro-batch's KV cache fits at once (no preemption, no recompute):
  max_records       = ⌊tokens / (max_tokens + prompt_budget / 2)⌋, capped by VLLM_MAX_NUM_SEQS
  max_prompt_tokens = tokens − max_records × max_tokens
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processor.settings import EngineKind, Settings

GIB = 1024**3
# Activations of the profiling forward pass, CUDA graphs and the allocator's slack, measured by vLLM at start-up;
# this estimate stands in for it when planning without a GPU.
ACTIVATION_RESERVE_BYTES = int(1.25 * GIB)
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "fp8": 1, "float8_e4m3fn": 1}
# 4-bit AWQ/GPTQ: half a byte per weight plus an fp16 scale and a 4-bit zero per group of 128 weights.
_QUANTIZED_BYTES_PER_WEIGHT = {"awq": 0.5 + 2.5 / 128, "awq_marlin": 0.5 + 2.5 / 128, "gptq": 0.5 + 2.5 / 128}

DEFAULT_LIMITS = {
    EngineKind.EXTRACTIVE: (64, 1_000_000),
    EngineKind.TRANSFORMERS: (8, 32_768),  # CPU: memory does not bound batching, time does
    EngineKind.VLLM: (16, 65_536),
    EngineKind.OPENAI: (64, 1_000_000),  # the server batches; OPENAI_MAX_IN_FLIGHT bounds what it holds at once
}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    dtype: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelShape":
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        return cls(
            layers=config["num_hidden_layers"],
            hidden=hidden,
            attention_heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            intermediate=config.get("intermediate_size", 4 * hidden),
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            dtype=str(config.get("torch_dtype") or config.get("dtype") or "float16"),
        )

    def kv_bytes_per_token(self, kv_dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_dtype_bytes

    def naive_kv_bytes_per_token(self, kv_dtype_bytes: int = 2) -> int:
        """The ADR's figure: as if every attention head had its own K and V (no grouped-query attention)."""
        return 2 * self.hidden * self.layers * kv_dtype_bytes

    def weight_bytes(self, quantization: str | None) -> int:
        kv_dim = self.kv_heads * self.head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv_dim
        mlp = 3 * self.hidden * self.intermediate
        linear = self.layers * (attention + mlp)
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        linear_bytes = _QUANTIZED_BYTES_PER_WEIGHT.get(quantization or "", _DTYPE_BYTES.get(self.dtype, 2))
        return int(linear * linear_bytes + embeddings * 2)


@dataclass(frozen=True)
class CapacityPlan:
    gpu_bytes: int
    utilization: float
    weight_bytes: int
    reserve_bytes: int
    kv_bytes_per_token: int
    naive_kv_bytes_per_token: int
    max_model_len: int
    max_tokens: int
    max_num_seqs: int

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.gpu_bytes * self.utilization) - self.weight_bytes - self.reserve_bytes

    @property
    def kv_tokens(self) -> int:
        return max(0, self.kv_cache_bytes // self.kv_bytes_per_token)

    @property
    def fits(self) -> bool:
        """At least one full-context sequence fits next to the weights."""
        return self.kv_tokens >= self.max_model_len

    @property
    def full_context_sequences(self) -> int:
        return self.kv_tokens // self.max_model_len

    @property
    def batch_max_records(self) -> int:
        prompt_budget = self.max_model_len - self.max_tokens
        return max(1, min(self.max_num_seqs, self.kv_tokens // (self.max_tokens + prompt_budget // 2)))

    @property
    def batch_max_prompt_tokens(self) -> int:
        return max(self.max_model_len - self.max_tokens, self.kv_tokens - self.batch_max_records * self.max_tokens)

    def report(self) -> str:
        def gib(value: int) -> str:
            return f"{value / GIB:.2f} GiB"

        lines = [
            f"GPU memory                 {gib(self.gpu_bytes)} × {self.utilization} = {gib(int(self.gpu_bytes * self.utilization))}",
            f"weights (estimated)        {gib(self.weight_bytes)}",
            f"activation reserve         {gib(self.reserve_bytes)}",
            f"KV cache                   {gib(self.kv_cache_bytes)}" + ("" if self.kv_cache_bytes > 0 else " (the weights and the reserve do not fit)"),
            f"KV bytes per token         {self.kv_bytes_per_token:,} B (without GQA it would be {self.naive_kv_bytes_per_token:,} B, "
            f"{self.naive_kv_bytes_per_token / self.kv_bytes_per_token:.1f}×)",
            f"tokens that fit            {self.kv_tokens:,}",
            f"full-context sequences     {self.full_context_sequences} × {self.max_model_len} tokens",
        ]
        if not self.fits:
            # Batch limits for a model that cannot hold one sequence would be advice nobody can follow.
            return "\n".join(lines + ["does not fit: not one full-context sequence fits next to the weights"])
        return "\n".join(
            lines
            + [
                f"BATCH_MAX_RECORDS          {self.batch_max_records}",
                f"BATCH_MAX_PROMPT_TOKENS    {self.batch_max_prompt_tokens:,}",
            ]
        )


def plan_for(
    config: dict[str, Any],
    gpu_bytes: int,
    settings: Settings,
    quantization: str | None = None,
    reserve_bytes: int = ACTIVATION_RESERVE_BYTES,
) -> CapacityPlan:
    shape = ModelShape.from_config(config)
    kv_dtype_bytes = 2 if shape.dtype in ("float32",) or quantization else _DTYPE_BYTES.get(shape.dtype, 2)
    return CapacityPlan(
        gpu_bytes=gpu_bytes,
        utilization=settings.vllm_gpu_memory_utilization,
        weight_bytes=shape.weight_bytes(quantization),
        reserve_bytes=reserve_bytes,
        kv_bytes_per_token=shape.kv_bytes_per_token(kv_dtype_bytes),
        naive_kv_bytes_per_token=shape.naive_kv_bytes_per_token(kv_dtype_bytes),
        max_model_len=settings.max_model_len,
        max_tokens=settings.sampling_max_tokens,
        max_num_seqs=settings.vllm_max_num_seqs,
    )


def load_model_config(path_or_dir: str | Path) -> dict[str, Any]:
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "config.json"
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class BatchLimits:
    max_records: int
    max_prompt_tokens: int
    source: str

    def describe(self) -> str:
        return f"{self.max_records} records / {self.max_prompt_tokens} prompt tokens ({self.source})"


def resolve_batch_limits(settings: Settings, plan: CapacityPlan | None) -> BatchLimits:
    """Settings win; otherwise the capacity plan; otherwise the engine's static default."""
    default_records, default_tokens = DEFAULT_LIMITS[settings.engine]
    source = "engine default"
    if plan is not None:
        default_records, default_tokens, source = plan.batch_max_records, plan.batch_max_prompt_tokens, "capacity plan"
    records = settings.batch_max_records or default_records
    tokens = settings.batch_max_prompt_tokens or default_tokens
    if settings.batch_max_records or settings.batch_max_prompt_tokens:
        source = "settings" if settings.batch_max_records and settings.batch_max_prompt_tokens else source + " + settings"
    return BatchLimits(records, tokens, source)
