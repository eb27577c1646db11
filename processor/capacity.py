"""Capacity arithmetic: how much KV cache fits on the GPU, and the batch limits that follow from it.

KV bytes per token = 2 (K and V) × layers × KV heads × head dim × KV dtype bytes. Qwen2.5-7B uses grouped-query
attention with 4 KV heads of 128, so it needs 2 × 28 × 4 × 128 × 2 = 57,344 B/token (56 KiB), not the
2 × hidden × layers × 2 ≈ 0.4 MB that ignores GQA (7× more).

Tokens that fit = (GPU memory × VLLM_GPU_MEMORY_UTILIZATION − weights − activation reserve) / KV bytes per token.
The batch limits are chosen so a whole micro-batch's KV cache fits at once (no preemption, no recompute):
  max_records       = ⌊tokens / (max_tokens + prompt_budget / 2)⌋, capped by VLLM_MAX_NUM_SEQS
  max_prompt_tokens = tokens − max_records × max_tokens

The weights are sized as the checkpoint stores them: a config's own `quantization_config` (AWQ, GPTQ, FP8,
compressed-tensors, bitsandbytes) gives the bits per weight whether or not VLLM_QUANTIZATION names a method — left
empty, vLLM reads the same config and picks its fastest kernel (awq_marlin) for the same 4-bit weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processor.failures import CommandError
from processor.settings import EngineKind, Settings

GIB = 1024**3
# Activations of the profiling forward pass, CUDA graphs and the allocator's slack, measured by vLLM at start-up;
# this estimate stands in for it when planning without a GPU.
ACTIVATION_RESERVE_BYTES = int(1.25 * GIB)
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "fp8": 1, "float8_e4m3fn": 1}
# vLLM's method names (VLLM_QUANTIZATION, a config's quant_method) by how they store a weight.
_GROUPED_INT = {"awq", "awq_marlin", "gptq", "gptq_marlin", "gptq_marlin_24", "marlin"}
_FP8 = {"fp8", "fbgemm_fp8", "modelopt", "fp8_e4m3"}
_DEFAULT_BITS = {"bitsandbytes": 4, **{m: 4 for m in _GROUPED_INT}, **{m: 8 for m in _FP8}}


def hub_config_hint(model: str = "MODEL") -> str:
    return (
        f"a hub id cannot be resolved offline: fetch its config.json first "
        f"(`huggingface-cli download {model} config.json --local-dir DIR`), then give DIR"
    )

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

    def weight_bytes(self, weights: "WeightFormat | str | None") -> int:
        """Linear layers as `weights` stores them; embeddings and LM head stay 16-bit (quantizers leave them be)."""
        if not isinstance(weights, WeightFormat):
            weights = weight_format({"torch_dtype": self.dtype}, weights)
        kv_dim = self.kv_heads * self.head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv_dim
        mlp = 3 * self.hidden * self.intermediate
        linear = self.layers * (attention + mlp)
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return int(linear * weights.bytes_per_weight + embeddings * 2)


@dataclass(frozen=True)
class WeightFormat:
    """How a checkpoint stores its linear weights: a quantization method's bits, or the config's dtype."""

    method: str | None  # None: not quantized
    bits: float
    group_size: int | None  # weights sharing one scale (and zero); None: per channel or per tensor, negligible
    source: str  # where the method came from, for the report

    @property
    def quantized(self) -> bool:
        return self.method is not None

    @property
    def bytes_per_weight(self) -> float:
        if self.method is None or self.group_size is None:
            return self.bits / 8
        # An fp16 scale and a zero of the same width per group (AWQ/GPTQ checkpoints, as stored on disk).
        return self.bits / 8 + (2 + self.bits / 8) / self.group_size

    def describe(self) -> str:
        if self.method is None:
            return f"not quantized ({self.source})"
        group = f", group {self.group_size}" if self.group_size else ""
        return f"{self.method} {self.bits:g}-bit{group} ({self.source})"


def _compressed_tensors_weights(quant_config: dict[str, Any]) -> dict[str, Any]:
    groups = quant_config.get("config_groups") or {}
    for group in groups.values():
        if isinstance(group, dict) and isinstance(group.get("weights"), dict):
            return group["weights"]
    return {}


def weight_format(config: dict[str, Any], quantization: str | None = None) -> WeightFormat:
    """The weights' storage: the config's `quantization_config` wins for bits and groups (it describes the files);
    `quantization` (VLLM_QUANTIZATION, or --quantization) names a method for a config that has none (fp8 on the fly)."""
    quant_config = config.get("quantization_config")
    quant_config = quant_config if isinstance(quant_config, dict) else {}
    configured = str(quant_config.get("quant_method") or "").lower() or None
    method = (quantization or "").lower() or configured
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    if method is None:
        return WeightFormat(None, 8 * _DTYPE_BYTES.get(dtype, 2), None, dtype)
    source = "the config's quantization_config" if configured else "VLLM_QUANTIZATION"
    details = _compressed_tensors_weights(quant_config) if configured == "compressed-tensors" else quant_config
    bits = details.get("bits") or details.get("w_bit") or details.get("num_bits") or details.get("weight_bits")
    if not bits and configured == "bitsandbytes":
        bits = 8 if quant_config.get("load_in_8bit") else 4
    bits = bits or _DEFAULT_BITS.get(method)
    if not bits:
        # A method this arithmetic does not know: sized unquantized, which can only overstate the weights.
        return WeightFormat(None, 8 * _DTYPE_BYTES.get(dtype, 2), None, f"{dtype}; {method} not understood, sized unquantized")
    group = details.get("group_size") or details.get("q_group_size")
    float_weights = method in _FP8 or details.get("type") == "float"
    group_size = int(group) if isinstance(group, int) and group > 0 and not float_weights else None
    if group_size is None and not float_weights and method in _GROUPED_INT and group is None:
        group_size = 128  # AWQ/GPTQ's usual group when neither config nor setting says
    return WeightFormat(method, float(bits), group_size, source)


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
    weights: WeightFormat | None = None

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
            f"weights (estimated)        {gib(self.weight_bytes)}" + (f", {self.weights.describe()}" if self.weights else ""),
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
    """`quantization`: VLLM_QUANTIZATION (None: the config's own quantization_config, if any, as vLLM does)."""
    shape = ModelShape.from_config(config)
    weights = weight_format(config, quantization)
    # Quantized and float32 checkpoints compute (and cache K/V) in 16 bits.
    kv_dtype_bytes = 2 if shape.dtype in ("float32",) or weights.quantized else _DTYPE_BYTES.get(shape.dtype, 2)
    return CapacityPlan(
        gpu_bytes=gpu_bytes,
        utilization=settings.vllm_gpu_memory_utilization,
        weight_bytes=shape.weight_bytes(weights),
        reserve_bytes=reserve_bytes,
        kv_bytes_per_token=shape.kv_bytes_per_token(kv_dtype_bytes),
        naive_kv_bytes_per_token=shape.naive_kv_bytes_per_token(kv_dtype_bytes),
        max_model_len=settings.max_model_len,
        max_tokens=settings.sampling_max_tokens,
        max_num_seqs=settings.vllm_max_num_seqs,
        weights=weights,
    )


class ModelConfigNotFoundError(CommandError):
    """No config.json where the plan was told to look."""


def _cached_hub_config(model_id: str) -> Path | None:
    """A hub id's config.json from the local Hugging Face cache (where an earlier download left it), offline."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # noqa: BLE001 - not installed, or not a valid repo id: nothing cached to use
        return None
    return Path(found) if isinstance(found, str) else None


def _looks_like_hub_id(text: str) -> bool:
    owner, _, name = text.partition("/")
    return bool(owner and name) and "/" not in name and not text.endswith(".json") and not text.startswith(".")


def load_model_config(path_or_dir: str | Path) -> dict[str, Any]:
    """A model folder, its config.json, or a hub id already in the local Hugging Face cache; never the network."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists():
        cached = _cached_hub_config(str(path_or_dir))
        if cached is None:
            raise ModelConfigNotFoundError(
                f"cannot read {path_or_dir}: no such file or folder. Give a model folder or its config.json; "
                + hub_config_hint(str(path_or_dir) if _looks_like_hub_id(str(path_or_dir)) else "MODEL")
            )
        path = cached
    if not path.exists():
        raise ModelConfigNotFoundError(f"cannot read {path}: the folder has no config.json. Give a model folder or its config.json")
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
