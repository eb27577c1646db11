"""ENGINE=vllm: vLLM's offline `LLM`, configured as the ADR decided; micro-batches or a continuous feed.

Two supported vLLM versions, one code path: 0.6.3 (the ADR's, V0 engine; requirements.txt) and 0.24.0 (current,
V1 engine only; requirements-vllm-current.txt). Facts this relies on, read from each wheel's own source
(0.6.3: vllm/engine/llm_engine.py, vllm/entrypoints/llm.py; 0.24.0: vllm/v1/engine/llm_engine.py,
vllm/entrypoints/offline_utils.py, vllm/v1/engine/input_processor.py, vllm/v1/engine/core_client.py):

* `VLLM_USE_V1` must be in the environment before vllm is first imported where it means something (0.6.3 has no
  V1 engine, the guard is for 0.8-0.10 upgrades), so vllm is imported lazily, here, after setting it. From 0.11
  on V1 is the only engine and 0.24.0's envs.py no longer knows the variable (it logs "Unknown vLLM environment
  variable"): the installed version is read with importlib.metadata before the import and the variable is
  dropped there, with one warning of our own if it asked for V0.
* `max_model_len`, `max_num_seqs`, `enable_prefix_caching` travel through `LLM(**kwargs)` into EngineArgs.
  Prefix caching defaults to off in 0.6.3 and on in V1 (config/cache.py: enable_prefix_caching=True; EngineArgs
  picks the model's default): it is always passed explicitly, so both versions run what the settings say.
* Prompts go in as `TokensPrompt(prompt_token_ids=…)` built with the model's chat template, so the count the
  batcher used is what vLLM schedules. generate() returns outputs in input order (both versions sort by id).
* A prompt longer than max_model_len: 0.6.3 does not raise, it returns finish_reason="length" with empty text
  and no token ids (scheduler FINISHED_IGNORED); V1 raises ValueError("The decoder prompt (length N) is longer
  than the maximum model length of M") from add_request/generate. Both are this event's failure
  (PromptIgnoredError), never a summary.
* generate() mutates the SamplingParams it gets, so each call builds its own.
* Continuous feed, the engine under `LLM` (`llm.llm_engine`), same names in both versions:
  `add_request(request_id, prompt, params)` positionally (0.6.3: request_id, prompt, params, arrival_time, …;
  V1: request_id, prompt, params, arrival_time, lora_request, tokenization_kwargs, …; V1 returns an internal
  id with a random suffix but reports and aborts by the id we gave); `step()` → list[RequestOutput], which with
  output_kind=FINAL_ONLY (what LLM.generate sets) holds only finished requests, in any order;
  `abort_request(ids)` takes a list in both (0.6.3 accepts str or iterable; V1 iterates its argument, so a bare
  str would be read as one id per character); `has_unfinished_requests()`.
* CONTINUOUS_LOOP_CHECK_TOKENS: requests are added with output_kind=DELTA instead (both versions have it): step()
  then reports every running request with the tokens and text new since its last report, which are collected per
  request; the end of the text so far is checked for a repetition loop every N tokens, and a looping request is
  aborted and reported as finished (finish_reason "loop") with what it wrote.
* The KV cache vLLM really allocated, once started: 0.6.3 `llm_engine.cache_config.num_gpu_blocks` × block_size
  (admission keeps 1 % of the blocks free: block manager watermark=0.01) and `llm_engine.scheduler_config
  .max_num_seqs`; V1 the same fields under `llm_engine.vllm_config`, filled in the front-end process from the
  engine core's ready message (core_client.py `_apply_ready_response`); block 0 is V1's null block.
* With `quantization="awq"` 0.6.3 keeps the plain AWQ kernels (V1 runs Marlin-family kernels). Left empty
  (VLLM_QUANTIZATION=), an AWQ checkpoint is upgraded to `awq_marlin` on GPUs of compute capability ≥ 8.0.
* A GPU that cannot hold the model raises ValueError("No available memory for the cache blocks…") or says the
  max seq len is larger than the KV cache; that becomes an EngineStartupError naming the two settings.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

from processor.capacity import CapacityPlan, plan_for
from processor.engines.base import (
    EngineStartupError,
    EventGenerationError,
    Finished,
    Generation,
    InFlightBudget,
    Prompt,
)
from processor.engines.hf_tokenizer import HFChatTokenizer
from processor.engines.vllm_version import final_only_kind, import_vllm, output_kind
from processor.guards import loop_start
from processor.settings import Settings

log = logging.getLogger(__name__)

# 0.6.3's block manager keeps this share of the KV blocks free when it admits a prompt (watermark=0.01).
V0_WATERMARK = 0.01


class PromptIgnoredError(EventGenerationError):
    """vLLM refused the prompt as longer than max_model_len: 0.6.3 answers with no tokens and
    finish_reason="length"; V1 raises ValueError from add_request."""


def llm_kwargs(settings: Settings) -> dict[str, Any]:
    """The `LLM(...)` arguments, exactly as the ADR runs it."""
    return {
        "model": settings.model,
        "quantization": settings.vllm_quantization,
        "gpu_memory_utilization": settings.vllm_gpu_memory_utilization,
        "max_model_len": settings.max_model_len,
        "tensor_parallel_size": settings.vllm_tensor_parallel_size,
        "max_num_seqs": settings.vllm_max_num_seqs,
        # Explicit in both versions: the default is off in 0.6.3 and on in V1.
        "enable_prefix_caching": settings.vllm_enable_prefix_caching,
        "load_format": settings.vllm_load_format,
        "seed": settings.seed,
    }


def sampling_kwargs(settings: Settings) -> dict[str, Any]:
    """SamplingParams fields; the repetition penalties are fields of 0.6.3's and of V1's SamplingParams alike."""
    return {
        "temperature": settings.sampling_temperature,
        "top_p": settings.sampling_top_p,
        "max_tokens": settings.sampling_max_tokens,
        "repetition_penalty": settings.sampling_repetition_penalty,
        "frequency_penalty": settings.sampling_frequency_penalty,
        "presence_penalty": settings.sampling_presence_penalty,
    }


# The loop check reads only the end of the text so far: a loop in progress is there, and a check stays ~0.1 ms
# however long the request has run. The summary's own guard (processor/guards.py) reads it all once, at the end.
LOOP_CHECK_TAIL_CHARS = 1500


class _Partial:
    """A streamed request's text and token count so far (DELTA outputs), and when to look for a loop next."""

    __slots__ = ("pieces", "tokens", "next_check")

    def __init__(self, every: int) -> None:
        self.pieces: list[str] = []
        self.tokens = 0
        self.next_check = every

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class VllmEngine:
    kind = "vllm"

    def __init__(self, llm: Any, vllm_module: Any, settings: Settings) -> None:
        self.llm = llm
        self.vllm = vllm_module
        self.settings = settings
        self.model = settings.model
        self.tokenizer = HFChatTokenizer(llm.get_tokenizer())
        # Per-request sampling overrides (a benchmark's controlled output lengths: max_tokens with ignore_eos);
        # None in the product, where every request samples with the settings' parameters.
        self.sampling_override: Callable[[Prompt], Mapping[str, Any]] | None = None
        self._streaming: dict[str, int] = {}  # request id → prompt tokens, for requests added and unfinished
        # Requests streamed for the loop check (CONTINUOUS_LOOP_CHECK_TOKENS), by id; empty when it is off.
        self._partial: dict[str, _Partial] = {}
        self._loop_check_every = settings.continuous_loop_check_tokens
        self._budget_logged = False

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
        engine.in_flight_budget()  # logs what vLLM really allocated
        return engine

    # ------------------------------------------------------------------------------------------ shared
    def _sampling_params(self, prompt: Prompt) -> Any:
        kwargs = sampling_kwargs(self.settings)
        if self.sampling_override is not None:
            kwargs.update(self.sampling_override(prompt))
        return self.vllm.SamplingParams(**kwargs)

    def _outcome(self, output: Any, prompt_tokens: int, partial: "_Partial | None" = None) -> Generation | EventGenerationError:
        """One finished RequestOutput → this event's summary or failure (generate() and step() alike). `partial`: the
        request was streamed (DELTA), its text and tokens are what was collected, this output's included."""
        completion = output.outputs[0] if output.outputs else None
        if completion is None:
            return EventGenerationError("vLLM finished the request without a completion")
        text = completion.text if partial is None else partial.text
        tokens = len(completion.token_ids) if partial is None else partial.tokens
        if completion.finish_reason == "length" and not tokens and not text:
            return self._ignored(prompt_tokens)
        if completion.finish_reason == "abort":
            return EventGenerationError("vLLM aborted the request")
        if completion.finish_reason == "error":  # V1: a request-level internal error
            return EventGenerationError("vLLM reported an internal error for the request")
        return Generation(
            text,
            completion.finish_reason or "stop",
            len(output.prompt_token_ids or ()) or prompt_tokens,
            tokens,
        )

    def _ignored(self, prompt_tokens: int) -> PromptIgnoredError:
        return PromptIgnoredError(
            f"vLLM ignored the prompt ({prompt_tokens} tokens): longer than "
            f"VLLM_MAX_MODEL_LEN={self.settings.max_model_len}"
        )

    def _rejected(self, prompt: Prompt, exc: ValueError) -> EventGenerationError:
        """A ValueError from add_request is about this request's input (V1 validates the prompt there; 0.6.3
        raises "Prompt cannot be empty")."""
        text = str(exc)
        if "longer than the maximum model length" in text or "too long" in text:
            return self._ignored(prompt.prompt_tokens)
        return EventGenerationError(f"vLLM refused the prompt: {text}")

    # ------------------------------------------------------------------------------------- micro-batch
    def generate(self, prompts: Sequence[Prompt]) -> list[Generation | EventGenerationError]:
        requests = [self.vllm.TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in prompts]
        if self.sampling_override is None:
            params: Any = self.vllm.SamplingParams(**sampling_kwargs(self.settings))
        else:
            params = [self._sampling_params(p) for p in prompts]
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        except ValueError as exc:
            # V1 validates every prompt before running any: an over-long one fails the whole call. Re-raised as
            # the batch's failure, bisection (isolation.py) narrows it to the one event.
            if len(prompts) == 1:
                return [self._rejected(prompts[0], exc)]
            raise
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        # Both versions return outputs in input order (sorted by their numeric request id).
        return [self._outcome(output, prompt.prompt_tokens) for prompt, output in zip(prompts, outputs)]

    def generate_short(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[Generation | EventGenerationError]:
        override = self.sampling_override
        self.sampling_override = lambda prompt: {**(override(prompt) if override else {}), "max_tokens": max_new_tokens}
        try:
            return self.generate(prompts)
        finally:
            self.sampling_override = override

    # -------------------------------------------------------------------------------------- continuous
    def add_request(self, request_id: str, prompt: Prompt) -> None:
        if request_id in self._streaming:
            raise ValueError(f"request {request_id!r} is already in flight")
        params = self._sampling_params(prompt)
        delta = output_kind(self.vllm, "DELTA") if self._loop_check_every else None
        final_only = final_only_kind(self.vllm)
        if delta is not None:
            params.output_kind = delta
        elif final_only is not None:
            params.output_kind = final_only
        try:
            # Positional: (request_id, prompt, params) in 0.6.3 and V1 alike.
            self.llm.llm_engine.add_request(
                request_id, self.vllm.TokensPrompt(prompt_token_ids=list(prompt.token_ids)), params
            )
        except ValueError as exc:
            raise self._rejected(prompt, exc) from None
        self._streaming[request_id] = prompt.prompt_tokens
        if delta is not None:
            self._partial[request_id] = _Partial(self._loop_check_every)

    def step(self) -> list[Finished]:
        finished: list[Finished] = []
        looping: list[str] = []
        for output in self.llm.llm_engine.step():
            partial = self._partial.get(output.request_id)
            if partial is not None and output.outputs:
                partial.pieces.append(output.outputs[0].text)
                partial.tokens += len(output.outputs[0].token_ids)
            if not output.finished:
                if partial is not None and partial.tokens >= partial.next_check:
                    partial.next_check = partial.tokens + self._loop_check_every
                    if loop_start(partial.text[-LOOP_CHECK_TAIL_CHARS:]) is not None:
                        looping.append(output.request_id)
                continue
            prompt_tokens = self._streaming.pop(output.request_id, None)
            self._partial.pop(output.request_id, None)
            if prompt_tokens is None:  # aborted meanwhile, or not one of ours
                continue
            finished.append(Finished(output.request_id, self._outcome(output, prompt_tokens, partial)))
        if looping:
            # Stopped where the loop shows: the rest of its max_tokens would only repeat it. The summary is what it
            # wrote so far (the guard trims the loop off and flags it), finish_reason "loop".
            self.llm.llm_engine.abort_request(looping)
            for request_id in looping:
                prompt_tokens = self._streaming.pop(request_id)
                partial = self._partial.pop(request_id)
                finished.append(Finished(request_id, Generation(partial.text, "loop", prompt_tokens, partial.tokens)))
        return finished

    def abort(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        for request_id in request_ids:
            self._partial.pop(request_id, None)
        ids = [i for i in request_ids if self._streaming.pop(i, None) is not None]
        if ids:
            # Always a list: V1's abort_request iterates its argument (a str would abort one id per character).
            self.llm.llm_engine.abort_request(ids)

    def has_unfinished(self) -> bool:
        return bool(self.llm.llm_engine.has_unfinished_requests())

    def in_flight_budget(self) -> InFlightBudget | None:
        """Sequences and KV tokens vLLM really allocated (known once the engine has started), or None."""
        try:
            engine = self.llm.llm_engine
            v1_config = getattr(engine, "vllm_config", None)
            config = v1_config if v1_config is not None else engine  # V1 keeps the configs under vllm_config
            cache, scheduler = config.cache_config, config.scheduler_config
            blocks, block_size, max_sequences = int(cache.num_gpu_blocks), int(cache.block_size), int(scheduler.max_num_seqs)
        except (AttributeError, TypeError, ValueError):
            return None
        if blocks <= 0 or block_size <= 0 or max_sequences <= 0:
            return None
        if v1_config is not None:
            # V1: one null block; its watermark (scheduler_config.watermark) defaults to 0.
            reserved = 1 + int(float(getattr(scheduler, "watermark", 0.0) or 0.0) * blocks)
        else:
            reserved = int(V0_WATERMARK * blocks)
        budget = InFlightBudget(max_sequences, max(block_size, (blocks - reserved) * block_size), block_size)
        if not self._budget_logged:
            self._budget_logged = True
            log.info(
                "vLLM KV cache: %d GPU blocks × %d tokens = %d tokens (%d usable without preemption), "
                "max_num_seqs %d",
                blocks, block_size, blocks * block_size, budget.kv_tokens, max_sequences,
            )
        return budget

    # -------------------------------------------------------------------------------------------- rest
    def capacity(self) -> CapacityPlan | None:
        """From the model's own config and the GPU's memory; vLLM's real block count is logged beside it."""
        try:
            engine = self.llm.llm_engine
            config = engine.model_config.hf_config.to_dict()
            import torch

            total = torch.cuda.get_device_properties(0).total_memory
        except Exception:  # noqa: BLE001 - planning is advice; its absence must not stop the worker
            return None
        return plan_for(config, total, self.settings, self.settings.vllm_quantization)

    def close(self) -> None:
        self._streaming.clear()
        self._partial.clear()
        self.llm = None
