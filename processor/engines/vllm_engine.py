"""ENGINE=vllm: vLLM 0.6.3's offline `LLM.generate()`, configured as the ADR decided.

Facts this relies on (read from the 0.6.3 wheel):
* `VLLM_USE_V1` must be in the environment before vllm is first imported (0.6.3 has no V1 engine; the guard is
  for upgrades), so vllm is imported lazily, here, after setting it.
* `max_model_len`, `max_num_seqs`, `enable_prefix_caching` travel through `LLM(**kwargs)` into EngineArgs.
* Prompts go in as `TokensPrompt(prompt_token_ids=…)` built with the model's chat template, so the count the
  batcher used is what vLLM schedules. Outputs come back in input order, one RequestOutput per prompt.
* A prompt longer than max_model_len does not raise: it comes back with finish_reason="length", empty text and
  no token ids. That is this event's failure, never a summary.
* generate() mutates the SamplingParams it gets, so each call builds its own.
* With `quantization="awq"` vLLM keeps the plain AWQ kernels. Left empty (VLLM_QUANTIZATION=), an AWQ checkpoint
  is upgraded to `awq_marlin` on GPUs of compute capability ≥ 8.0 (an RTX 4070 is 8.9), the faster kernels.
* A GPU that cannot hold the model raises ValueError("No available memory for the cache blocks…") or says the
  max seq len is larger than the KV cache; that becomes an EngineStartupError naming the two settings.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

from processor.capacity import CapacityPlan, plan_for
from processor.engines.base import EngineStartupError, EventGenerationError, Generation, Prompt
from processor.engines.hf_tokenizer import HFChatTokenizer
from processor.settings import Settings

log = logging.getLogger(__name__)


class PromptIgnoredError(EventGenerationError):
    """vLLM returned no tokens with finish_reason="length": it refused the prompt as longer than max_model_len."""


def llm_kwargs(settings: Settings) -> dict[str, Any]:
    """The `LLM(...)` arguments, exactly as the ADR runs it."""
    return {
        "model": settings.model,
        "quantization": settings.vllm_quantization,
        "gpu_memory_utilization": settings.vllm_gpu_memory_utilization,
        "max_model_len": settings.max_model_len,
        "tensor_parallel_size": settings.vllm_tensor_parallel_size,
        "max_num_seqs": settings.vllm_max_num_seqs,
        "enable_prefix_caching": settings.vllm_enable_prefix_caching,
        "seed": settings.seed,
    }


def sampling_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        "temperature": settings.sampling_temperature,
        "top_p": settings.sampling_top_p,
        "max_tokens": settings.sampling_max_tokens,
    }


def import_vllm(settings: Settings) -> Any:
    # Must precede the first import of vllm anywhere in the process.
    os.environ["VLLM_USE_V1"] = str(settings.vllm_use_v1)
    try:
        import vllm
    except ImportError as exc:
        raise EngineStartupError(
            f"ENGINE=vllm needs vllm==0.6.3 (the GPU image's requirements.txt): {exc}"
        ) from None
    return vllm


class VllmEngine:
    kind = "vllm"

    def __init__(self, llm: Any, vllm_module: Any, settings: Settings) -> None:
        self.llm = llm
        self.vllm = vllm_module
        self.settings = settings
        self.model = settings.model
        self.tokenizer = HFChatTokenizer(llm.get_tokenizer())

    @classmethod
    def from_settings(cls, settings: Settings, llm_factory: Callable[..., Any] | None = None) -> "VllmEngine":
        vllm = import_vllm(settings)
        kwargs = llm_kwargs(settings)
        log.info("vLLM %s: LLM(%s)", getattr(vllm, "__version__", "?"), kwargs)
        try:
            llm = (llm_factory or vllm.LLM)(**kwargs)
        except ValueError as exc:
            text = str(exc)
            if "cache blocks" in text or "KV cache" in text or "gpu_memory_utilization" in text:
                raise EngineStartupError(
                    f"the GPU cannot hold {settings.model} with its KV cache ({text}). Raise "
                    f"VLLM_GPU_MEMORY_UTILIZATION (now {settings.vllm_gpu_memory_utilization}) if other processes "
                    f"leave room, or lower VLLM_MAX_MODEL_LEN (now {settings.max_model_len}); "
                    "`python -m processor plan <config.json>` shows the arithmetic"
                ) from None
            raise EngineStartupError(f"vLLM rejected the configuration: {text}") from None
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower() or "infer device type" in str(exc):
                raise EngineStartupError(
                    f"vLLM could not start on this machine ({exc}); it needs an NVIDIA GPU with room for the weights: "
                    f"check VLLM_GPU_MEMORY_UTILIZATION={settings.vllm_gpu_memory_utilization} and "
                    f"VLLM_MAX_MODEL_LEN={settings.max_model_len}"
                ) from None
            raise
        engine = cls(llm, vllm, settings)
        plan = engine.capacity()
        if plan is not None:
            log.info("capacity plan:\n%s", plan.report())
        return engine

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation | EventGenerationError]:
        requests = [self.vllm.TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in prompts]
        params = self.vllm.SamplingParams(**sampling_kwargs(self.settings))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        results: list[Generation | EventGenerationError] = []
        for prompt, output in zip(prompts, outputs):  # 0.6.3 returns outputs in input order
            completion = output.outputs[0]
            if completion.finish_reason == "length" and not completion.token_ids and not completion.text:
                results.append(
                    PromptIgnoredError(
                        f"vLLM ignored the prompt ({prompt.prompt_tokens} tokens): longer than "
                        f"VLLM_MAX_MODEL_LEN={self.settings.max_model_len}"
                    )
                )
            elif completion.finish_reason == "abort":
                results.append(EventGenerationError("vLLM aborted the request"))
            else:
                results.append(
                    Generation(
                        completion.text,
                        completion.finish_reason or "stop",
                        len(output.prompt_token_ids or prompt.token_ids),
                        len(completion.token_ids),
                    )
                )
        return results

    def capacity(self) -> CapacityPlan | None:
        """From the model's own config and the GPU's memory; vLLM's real block count is logged beside it."""
        try:
            engine = self.llm.llm_engine
            config = engine.model_config.hf_config.to_dict()
            import torch

            total = torch.cuda.get_device_properties(0).total_memory
        except Exception:  # noqa: BLE001 - planning is advice; its absence must not stop the worker
            return None
        cache = getattr(engine, "cache_config", None)
        if cache is not None and getattr(cache, "num_gpu_blocks", None):
            log.info("vLLM KV cache: %d GPU blocks × %d tokens", cache.num_gpu_blocks, cache.block_size)
        return plan_for(config, total, self.settings, self.settings.vllm_quantization)

    def close(self) -> None:
        self.llm = None
