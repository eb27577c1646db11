"""A test double of vllm==0.6.3's offline API, written from its documented shapes (not its code).

What it reproduces, because the engine depends on it:
* `LLM(model, ..., quantization=None, seed=0, gpu_memory_utilization=0.9, **kwargs)`; max_model_len etc. via kwargs.
* `LLM.generate(prompts, sampling_params, use_tqdm=True)`: prompts are TokensPrompt dicts; a bare list of token-id
  lists raises TypeError; an empty prompt raises ValueError("Prompt cannot be empty"); a list of SamplingParams
  must match the prompts' length; the SamplingParams passed in is mutated (output_kind); outputs come back in
  input order.
* A prompt longer than max_model_len: no exception, a RequestOutput with finish_reason="length", text "" and no
  token ids (0.6.3's scheduler marks it FINISHED_IGNORED).
* Start-up on a GPU that cannot hold the model: ValueError("No available memory for the cache blocks. …").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, TypedDict

__version__ = "0.6.3"
IMPORTED_WITH_USE_V1 = os.environ.get("VLLM_USE_V1")  # what the environment said when vllm was first imported
CREATED: list["LLM"] = []
FAIL_START_WITH: Optional[BaseException] = None  # set by a test to simulate a start-up failure


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: List[int]
    multi_modal_data: Any
    mm_processor_kwargs: Any


class SamplingParams:
    def __init__(self, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, seed: Optional[int] = None,
                 max_tokens: Optional[int] = 16, min_tokens: int = 0, truncate_prompt_tokens: Optional[int] = None, **kwargs: Any) -> None:
        self.n, self.temperature, self.top_p, self.top_k, self.seed = n, temperature, top_p, top_k, seed
        self.max_tokens, self.min_tokens, self.truncate_prompt_tokens = max_tokens, min_tokens, truncate_prompt_tokens
        self.output_kind = "CUMULATIVE"
        self.extra = kwargs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: List[int]
    cumulative_logprob: Optional[float]
    logprobs: Any
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    lora_request: Any = None


class RequestOutput:
    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: Optional[List[int]], prompt_logprobs: Any,
                 outputs: List[CompletionOutput], finished: bool, metrics: Any = None, lora_request: Any = None,
                 encoder_prompt: Optional[str] = None, encoder_prompt_token_ids: Optional[List[int]] = None) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.prompt_logprobs, self.outputs, self.finished, self.metrics = prompt_logprobs, outputs, finished, metrics
        self.lora_request, self.encoder_prompt, self.encoder_prompt_token_ids = lora_request, encoder_prompt, encoder_prompt_token_ids


class LLM:
    def __init__(self, model: str, tokenizer: Optional[str] = None, tokenizer_mode: str = "auto", skip_tokenizer_init: bool = False,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, dtype: str = "auto",
                 quantization: Optional[str] = None, revision: Optional[str] = None, tokenizer_revision: Optional[str] = None,
                 seed: int = 0, gpu_memory_utilization: float = 0.9, swap_space: float = 4, cpu_offload_gb: float = 0,
                 enforce_eager: Optional[bool] = None, max_seq_len_to_capture: int = 8192, **kwargs: Any) -> None:
        if FAIL_START_WITH is not None:
            raise FAIL_START_WITH
        from transformers import AutoTokenizer

        self.init_args = {"model": model, "quantization": quantization, "seed": seed, "tensor_parallel_size": tensor_parallel_size,
                          "gpu_memory_utilization": gpu_memory_utilization, **kwargs}
        self.max_model_len = kwargs.get("max_model_len") or 32768
        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.calls: list[tuple[list[Any], SamplingParams]] = []
        self.fail_for_token: Optional[int] = None  # a test sets it: generate() raises when any prompt contains it
        CREATED.append(self)

    def get_tokenizer(self) -> Any:
        return self._tokenizer

    def generate(self, prompts: Any = None, sampling_params: Any = None, prompt_token_ids: Any = None, use_tqdm: bool = True,
                 lora_request: Any = None, prompt_adapter_request: Any = None, guided_options_request: Any = None,
                 priority: Any = None) -> List[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        for prompt in prompts:
            if not isinstance(prompt, (str, dict)):
                raise TypeError(f"Invalid prompt type: {type(prompt)}")
        params = sampling_params or SamplingParams()
        if isinstance(params, list) and len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        for p in params if isinstance(params, list) else [params]:
            p.output_kind = "FINAL_ONLY"
        self.calls.append((list(prompts), params))
        outputs = []
        for index, prompt in enumerate(prompts):
            ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else self._tokenizer.encode(prompt)
            if not ids:
                raise ValueError("Prompt cannot be empty")
            if self.fail_for_token is not None and self.fail_for_token in ids:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            p = params[index] if isinstance(params, list) else params
            if len(ids) > self.max_model_len:
                completion = CompletionOutput(0, "", [], None, None, "length", None)
            else:
                token_ids = list(ids[-min(p.max_tokens or 16, 8):])  # "generate" by echoing the prompt's tail
                completion = CompletionOutput(0, "summary: " + self._tokenizer.decode(token_ids, skip_special_tokens=True), token_ids, -1.0, None,
                                              "length" if len(token_ids) >= (p.max_tokens or 16) else "stop", None)
            outputs.append(RequestOutput(str(index), None, list(ids), None, [completion], True))
        return outputs
