"""A test double of vllm==0.6.3's offline API, written from its documented shapes (not its code).

What it reproduces, because the engine depends on it:
* `LLM(model, ..., quantization=None, seed=0, gpu_memory_utilization=0.9, **kwargs)`; max_model_len etc. via kwargs,
  among them EngineArgs' `load_format` (LoadFormat's values; "dummy" makes random weights from the config alone).
* `LLM.generate(prompts, sampling_params, use_tqdm=True)`: prompts are TokensPrompt dicts; a bare list of token-id
  lists raises TypeError; an empty prompt raises ValueError("Prompt cannot be empty"); a list of SamplingParams
  must match the prompts' length; the SamplingParams passed in is mutated (output_kind); outputs come back in
  input order.
* A prompt longer than max_model_len: no exception, a RequestOutput with finish_reason="length", text "" and no
  token ids (0.6.3's scheduler marks it FINISHED_IGNORED).
* Start-up on a GPU that cannot hold the model: ValueError("No available memory for the cache blocks. …").
* `LLM.llm_engine`, the LLMEngine underneath (what a continuous feed drives): `add_request(request_id, prompt,
  params, arrival_time=None, …, *, inputs=None)`, `step()`, `abort_request(str | Iterable[str])`,
  `has_unfinished_requests()`, `get_num_unfinished_requests()`, `cache_config.num_gpu_blocks/block_size` (the
  real count is known only once started; `num_gpu_blocks_override` sets it, as in EngineArgs) and
  `scheduler_config.max_num_seqs`. Scheduling as 0.6.3 does it without chunked prefill: FCFS from the waiting
  queue while a sequence slot and the prompt's blocks are free (keeping the 1 % watermark); every running
  request gains one token per step (its prefill step gives the first); a running request that needs a block
  when none is free preempts the newest running one (recompute: back to waiting, its tokens dropped), counted in
  `preemptions`. A request's output length is deterministic per prompt (1 + sum(ids) % 8, or max_tokens with
  ignore_eos), so requests finish OUT OF ORDER. With output_kind FINAL_ONLY a step returns finished requests
  only, else one output per running request: everything so far (CUMULATIVE) or what is new since the last
  (DELTA). A prompt longer than max_model_len comes back, finished, with the empty "length" answer. `fail_for_token` applies to step() too: it raises while such a prompt is running.
  `step_log` records (running, waiting, KV tokens held, blocks used) at every step. `loop_ids`: every request
  added generates these ids over and over (a model in a repetition loop).
* generate() steps the same engine, as 0.6.3's LLM._run_engine does: it refuses to run while requests added
  directly are unfinished (the real one would step them and return them mixed with its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, List, Optional, TypedDict, Union

__version__ = "0.6.3"
IMPORTED_WITH_USE_V1 = os.environ.get("VLLM_USE_V1")  # what the environment said when vllm was first imported
CREATED: list["LLM"] = []
FAIL_START_WITH: Optional[BaseException] = None  # set by a test to simulate a start-up failure


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: List[int]
    multi_modal_data: Any
    mm_processor_kwargs: Any


class RequestOutputKind(Enum):  # vllm.sampling_params.RequestOutputKind
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


# SamplingParams' other fields in 0.6.3 (a msgspec.Struct: any other keyword is a TypeError there, and here).
# vllm/config.py LoadFormat in 0.6.3; EngineArgs turns the string into it and refuses any other.
_LOAD_FORMATS = frozenset({
    "auto", "pt", "safetensors", "npcache", "dummy", "tensorizer", "sharded_state", "gguf", "bitsandbytes", "mistral",
})
_OTHER_SAMPLING_FIELDS = frozenset({
    "best_of", "min_p", "stop", "stop_token_ids", "include_stop_str_in_output", "logprobs", "prompt_logprobs",
    "detokenize", "skip_special_tokens", "spaces_between_special_tokens", "logits_processors", "output_kind",
    "guided_decoding", "logit_bias", "allowed_token_ids",
})


class SamplingParams:
    def __init__(self, n: int = 1, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 repetition_penalty: float = 1.0, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                 seed: Optional[int] = None, ignore_eos: bool = False, max_tokens: Optional[int] = 16, min_tokens: int = 0,
                 truncate_prompt_tokens: Optional[int] = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - _OTHER_SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"Unexpected keyword argument(s) {sorted(unknown)}")
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.repetition_penalty = repetition_penalty
        self.n, self.temperature, self.top_p, self.top_k, self.seed = n, temperature, top_p, top_k, seed
        self.ignore_eos = ignore_eos
        self.max_tokens, self.min_tokens, self.truncate_prompt_tokens = max_tokens, min_tokens, truncate_prompt_tokens
        self.output_kind = RequestOutputKind.CUMULATIVE
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
        if kwargs.get("load_format", "auto") not in _LOAD_FORMATS:
            raise ValueError(f"{kwargs['load_format']!r} is not a valid LoadFormat")
        from transformers import AutoTokenizer

        self.init_args = {"model": model, "quantization": quantization, "seed": seed, "tensor_parallel_size": tensor_parallel_size,
                          "gpu_memory_utilization": gpu_memory_utilization, **kwargs}
        self.max_model_len = kwargs.get("max_model_len") or 32768
        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.calls: list[tuple[list[Any], SamplingParams]] = []
        self.fail_for_token: Optional[int] = None  # a test sets it: generate() and step() raise for a prompt with it
        # A test sets it: requests added to llm_engine generate these ids over and over (a model in a loop) instead of
        # echoing their prompt.
        self.loop_ids: Optional[List[int]] = None
        self.llm_engine = LLMEngine(self, kwargs)
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
            p.output_kind = RequestOutputKind.FINAL_ONLY
        if self.llm_engine.has_unfinished_requests():
            raise AssertionError("generate() while requests added to llm_engine are unfinished: 0.6.3's _run_engine "
                                 "would step them too and return them mixed with this call's outputs")
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


# --------------------------------------------------------------------------------------------- engine API
@dataclass
class CacheConfig:
    block_size: int
    num_gpu_blocks: Optional[int]


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_model_len: int


@dataclass
class _Request:
    request_id: str
    ids: List[int]
    params: Any
    target: int  # tokens it will generate
    generated: List[int] = field(default_factory=list)
    sent_tokens: int = 0  # DELTA outputs: tokens and text already reported
    sent_text: str = ""


class LLMEngine:
    WATERMARK = 0.01  # 0.6.3's block manager default

    def __init__(self, llm: "LLM", kwargs: dict) -> None:
        self.llm = llm
        self.cache_config = CacheConfig(block_size=kwargs.get("block_size", 16), num_gpu_blocks=kwargs.get("num_gpu_blocks_override", 2048))
        self.scheduler_config = SchedulerConfig(max_num_seqs=kwargs.get("max_num_seqs", 256), max_model_len=llm.max_model_len)
        self.waiting: List[_Request] = []
        self.running: List[_Request] = []
        self.preemptions = 0
        self.steps = 0
        self.step_log: list[tuple[int, int, int, int]] = []  # (running, waiting, KV tokens held, blocks used)
        self.aborted: list[list[str]] = []  # each abort_request call's ids, as given
        self.fail_step_with: Optional[BaseException] = None  # a test sets it: the next step() raises it

    # 0.6.3: add_request(request_id, prompt, params, arrival_time=None, lora_request=None, trace_headers=None,
    #                    prompt_adapter_request=None, priority=0, *, inputs=None)
    def add_request(self, request_id: str, prompt: Any = None, params: Any = None, arrival_time: Optional[float] = None,
                    lora_request: Any = None, trace_headers: Any = None, prompt_adapter_request: Any = None, priority: int = 0,
                    *, inputs: Any = None) -> None:
        prompt = inputs if inputs is not None else prompt
        assert prompt is not None and params is not None
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id)}")
        if any(r.request_id == request_id for r in self.waiting + self.running):
            raise AssertionError(f"request id {request_id!r} is already unfinished (the double refuses duplicates)")
        ids = list(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else self.llm._tokenizer.encode(prompt)
        if not ids:
            raise ValueError("Prompt cannot be empty")
        target = params.max_tokens or 16
        if not params.ignore_eos:
            target = min(target, 1 + sum(ids) % 8)
        self.waiting.append(_Request(request_id, ids, params, target))

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.aborted.append(ids)
        self.waiting = [r for r in self.waiting if r.request_id not in ids]
        self.running = [r for r in self.running if r.request_id not in ids]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def _blocks(self, request: _Request, extra: int = 0) -> int:
        size = self.cache_config.block_size
        return -(-(len(request.ids) + len(request.generated) + extra) // size)

    def step(self) -> List[RequestOutput]:
        if self.fail_step_with is not None:
            error, self.fail_step_with = self.fail_step_with, None
            raise error
        self.steps += 1
        total = self.cache_config.num_gpu_blocks or 0
        watermark = int(self.WATERMARK * total)
        outputs: List[RequestOutput] = []
        # Running requests first: each needs room for one more token; without a free block, preempt the newest.
        used = sum(self._blocks(r) for r in self.running)
        for request in list(self.running):
            if request not in self.running:
                continue
            need = self._blocks(request, 1) - self._blocks(request)
            while need and used + need > total and self.running:
                victim = self.running.pop()
                used -= self._blocks(victim)
                victim.generated = []
                self.waiting.insert(0, victim)
                self.preemptions += 1
                if victim is request:
                    need = 0
                    break
            if request in self.running:
                used += need
        decoding = list(self.running)
        # Then admit waiting prompts (FCFS) while a slot and their blocks (above the watermark) are free.
        prefilled: List[_Request] = []
        while self.waiting and len(self.running) < self.scheduler_config.max_num_seqs:
            request = self.waiting[0]
            if len(request.ids) > self.scheduler_config.max_model_len:  # 0.6.3: FINISHED_IGNORED
                self.waiting.pop(0)
                outputs.append(RequestOutput(request.request_id, None, request.ids, None, [CompletionOutput(0, "", [], None, None, "length")], True))
                continue
            need = self._blocks(request, 1)
            if total - used - need < watermark:
                break
            self.waiting.pop(0)
            self.running.append(request)
            prefilled.append(request)
            used += need
        if self.llm.fail_for_token is not None and any(self.llm.fail_for_token in r.ids for r in self.running):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        loop = self.llm.loop_ids
        for request in decoding + prefilled:
            if loop:
                request.generated.append(loop[len(request.generated) % len(loop)])
            else:
                request.generated.append(request.ids[-1 - (len(request.generated) % len(request.ids))])
        held = sum(len(r.ids) + len(r.generated) for r in self.running)
        self.step_log.append((len(self.running), len(self.waiting), held, used))
        final_only = lambda r: r.params.output_kind == RequestOutputKind.FINAL_ONLY  # noqa: E731
        for request in list(self.running):
            done = len(request.generated) >= request.target
            if done:
                self.running.remove(request)
            if done or not final_only(request):
                outputs.append(self._output(request, done))
        return outputs

    def _output(self, request: _Request, finished: bool) -> RequestOutput:
        tokens = list(request.generated)
        text = "summary: " + self.llm._tokenizer.decode(tokens, skip_special_tokens=True)
        reason = None
        if finished:
            reason = "length" if len(tokens) >= (request.params.max_tokens or 16) else "stop"
        if request.params.output_kind == RequestOutputKind.DELTA:
            # Only what is new since the last output: the tokens, and the text as an incremental detokenizer gives it.
            delta_tokens, delta_text = tokens[request.sent_tokens:], text[len(request.sent_text):]
            request.sent_tokens, request.sent_text = len(tokens), text
            tokens, text = delta_tokens, delta_text
        return RequestOutput(request.request_id, None, request.ids, None, [CompletionOutput(0, text, tokens, -1.0, None, reason)], finished)
