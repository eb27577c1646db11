"""The Hugging Face tokenizer behind the Tokenizer protocol — one code path for the Transformers and vLLM engines.

The chat template renders to text, which is encoded without adding special tokens (the template already has
them), so the ids counted by the prompt builder and the batcher are exactly the ids the model receives.
"""

from __future__ import annotations

from typing import Any, Sequence

from processor.engines.base import ChatMessage


class HFChatTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: use an instruction-tuned model (…-Instruct)")
        self.hf = tokenizer

    def chat_token_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        text = self.hf.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
        )
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def count(self, text: str) -> int:
        return len(self.hf(text, add_special_tokens=False)["input_ids"]) if text else 0

    def truncate(self, text: str, max_tokens: int) -> str:
        if max_tokens <= 0 or not text:
            return ""
        encoded = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoded["input_ids"]) <= max_tokens:
            return text
        return text[: encoded["offset_mapping"][max_tokens - 1][1]]

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.hf.decode(list(token_ids), skip_special_tokens=True))
