"""ENGINE=transformers: Hugging Face Transformers on CPU or CUDA, batched with left padding.

Same prompts (chat template, token ids), same sampling settings as the vLLM engine. Runs anywhere torch runs;
on a GPU its capacity plan comes from the model config and the device's memory.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from processor.capacity import CapacityPlan, plan_for
from processor.engines.base import EngineStartupError, EventGenerationError, Generation, Prompt
from processor.engines.hf_tokenizer import HFChatTokenizer
from processor.guards import REPLACEMENT_CHAR
from processor.settings import Settings

log = logging.getLogger(__name__)


class TransformersEngine:
    kind = "transformers"

    def __init__(self, model: Any, tokenizer: Any, settings: Settings, model_name: str) -> None:
        import torch

        self.torch = torch
        self.hf_model = model
        self.tokenizer = HFChatTokenizer(tokenizer)
        self.model = model_name
        self.settings = settings
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        if settings.seed is not None:
            torch.manual_seed(settings.seed)

    @classmethod
    def from_settings(cls, settings: Settings) -> "TransformersEngine":
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise EngineStartupError(f"ENGINE=transformers needs torch and transformers installed: {exc}") from None
        path = settings.model_for_transformers
        device = settings.transformers_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_name = settings.transformers_dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device.startswith("cuda") else "float32"
        try:
            if path.lower().endswith(".gguf"):
                # One GGUF file (what many users hold): dequantised on load, its head tied and tokens fixed as
                # `fetch-model` does; `fetch-model` converts once instead of on every start.
                from pathlib import Path

                from processor.model_fetch import load_gguf

                model, tokenizer = load_gguf(Path(path), getattr(torch, dtype_name))
                model = model.to(device).eval()
            else:
                tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=getattr(torch, dtype_name)).to(device).eval()
        except (OSError, ValueError) as exc:
            raise EngineStartupError(
                f"cannot load model {path!r} (TRANSFORMERS_MODEL or VLLM_MODEL): {exc}"
            ) from None
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and settings.max_model_len > context:
            raise EngineStartupError(
                f"VLLM_MAX_MODEL_LEN={settings.max_model_len} exceeds the model's max_position_embeddings={context}"
            )
        log.info("transformers engine: %s on %s (%s)", path, device, dtype_name)
        return cls(model, tokenizer, settings, path)

    def generate_short(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[Generation | EventGenerationError]:
        return self.generate(prompts, max_new_tokens=max_new_tokens)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int | None = None) -> list[Generation | EventGenerationError]:
        torch = self.torch
        width = max(p.prompt_tokens for p in prompts)
        # Left padding: every row's last prompt token sits at the same position, where generation starts.
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - prompt.prompt_tokens :] = torch.tensor(prompt.token_ids, dtype=torch.long)
            attention[row, width - prompt.prompt_tokens :] = 1
        sampling = self.settings.sampling_temperature > 0
        with torch.inference_mode():
            output = self.hf_model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max_new_tokens or self.settings.sampling_max_tokens,
                do_sample=sampling,
                temperature=self.settings.sampling_temperature if sampling else None,
                top_p=self.settings.sampling_top_p if sampling else None,
                top_k=None,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
                # None leaves each off (generate() treats 1.0 and 0 as set, and pays for them per step).
                repetition_penalty=self.settings.sampling_repetition_penalty if self.settings.sampling_repetition_penalty != 1.0 else None,
                no_repeat_ngram_size=self.settings.sampling_no_repeat_ngram_size or None,
            )
        results: list[Generation | EventGenerationError] = []
        for row, prompt in enumerate(prompts):
            new_tokens = output[row, width:].tolist()
            stop_at = next((i for i, token in enumerate(new_tokens) if token in self.eos_ids), None)
            kept = new_tokens if stop_at is None else new_tokens[:stop_at]
            finish = "stop" if stop_at is not None else "length"
            results.append(Generation(self._decode(kept, finish), finish, prompt.prompt_tokens, len(kept)))
        return results

    def _decode(self, tokens: list[int], finish: str) -> str:
        """The text of `tokens`; cut by the token cap, without the tokens of a character left half-finished (a
        byte-level tokenizer spends up to 4 tokens on one character: the decoder would end the text in U+FFFD)."""
        text = self.tokenizer.decode(tokens)
        if finish == "length":
            for drop in range(1, min(4, len(tokens)) + 1):
                if not text.endswith(REPLACEMENT_CHAR):
                    break
                text = self.tokenizer.decode(tokens[:-drop])
        return text

    def capacity(self) -> CapacityPlan | None:
        if self.device.type != "cuda":
            return None
        total = self.torch.cuda.get_device_properties(self.device).total_memory
        weights = sum(p.numel() * p.element_size() for p in self.hf_model.parameters())
        plan = plan_for(self.hf_model.config.to_dict(), total, self.settings, None)
        # The real weights are known here; only the estimate in the plan needs replacing.
        from dataclasses import replace

        return replace(plan, weight_bytes=weights)

    def close(self) -> None:
        self.hf_model = None
