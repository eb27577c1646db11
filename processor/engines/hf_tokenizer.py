"""The Hugging Face tokenizer behind the Tokenizer protocol — one code path for the Transformers and vLLM engines.

The chat template renders to text, which is encoded without adding special tokens (the template already has
them), so the ids counted by the prompt builder and the batcher are exactly the ids the model receives.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Sequence

from processor.engines.base import ChatMessage, Encoded

# Added tokens that are not flagged special but still look like markup (Qwen2.5's <tool_call>, <|fim_prefix|>, …)
# are matched atomically in raw text too: treat them as control tokens, never let web text produce them.
_MARKUP = re.compile(r"<[^<>\s]{1,64}>|\[[^\[\]\s]{1,64}\]")


class HFChatTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: use an instruction-tuned model (…-Instruct)")
        self.hf = tokenizer
        controls = _control_tokens(tokenizer)
        self._control_tokens = frozenset(controls)
        self._control_token_ids = frozenset(controls.values())
        self.native_cpu_s = 0.0  # this thread's CPU inside the Rust tokenizer's GIL-free batch calls (bench/loop_cpu.py)

    @property
    def control_tokens(self) -> frozenset[str]:
        return self._control_tokens

    @property
    def control_token_ids(self) -> frozenset[int]:
        return self._control_token_ids

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return str(
            self.hf.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
            )
        )

    def encode(self, text: str) -> Encoded:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[Encoded]:
        """The texts' ids in one call. A fast tokenizer's Rust backend encodes the whole batch with the GIL released
        (and on several cores where TOKENIZERS_PARALLELISM allows), so the engine's front end, which shares this
        interpreter, keeps running meanwhile; `native_cpu_s` adds up this thread's CPU inside those calls."""
        if not texts:
            return []
        backend = getattr(self.hf, "backend_tokenizer", None)
        # Called directly only while it truncates and pads nothing: the Transformers call would switch both off first.
        if backend is not None and backend.truncation is None and backend.padding is None:
            started = time.thread_time()
            encodings = backend.encode_batch(list(texts), add_special_tokens=False)
            self.native_cpu_s += time.thread_time() - started
            return [Encoded(encoding.ids, _starts_of(encoding)) for encoding in encodings]
        batch = self.hf(list(texts), add_special_tokens=False, return_attention_mask=False)
        encodings = getattr(batch, "encodings", None)
        if encodings:  # a fast tokenizer keeps its Rust encoding: offsets come from it only if asked for
            return [Encoded(ids, _starts_of(encoding)) for ids, encoding in zip(batch["input_ids"], encodings)]
        # A slow tokenizer has no offsets: spread the tokens evenly over the text. The builder treats starts as an
        # estimate and always re-measures exactly, so a poor one costs correction passes, never a wrong prompt.
        return [Encoded(ids, _spread(len(text), len(ids))) for text, ids in zip(texts, batch["input_ids"])]

    def chat_token_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return list(self.encode(self.render_chat(messages)).ids)

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


def _starts_of(encoding: Any) -> Callable[[], list[int]]:
    return lambda: [start for start, _ in encoding.offsets]


def _spread(length: int, tokens: int) -> Callable[[], list[int]]:
    count = max(1, tokens)
    return lambda: [index * length // count for index in range(tokens)]


def _control_tokens(tokenizer: Any) -> dict[str, int]:
    """Every string the tokenizer matches as a control token, with its id: its special tokens (eos, pad, …), the
    added tokens flagged special (ChatML's <|im_start|>, which Qwen2.5 lists only there) and markup-like added ones."""
    found: dict[str, int] = {}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = str(added.content if hasattr(added, "content") else added)
        if getattr(added, "special", False) or _MARKUP.fullmatch(content):
            found[content] = int(token_id)
    for content in getattr(tokenizer, "all_special_tokens", []):
        token_id = tokenizer.convert_tokens_to_ids(content)
        if isinstance(token_id, int):
            found.setdefault(content, token_id)
    # A one-character or blank "special token" would have us rewrite ordinary text; no chat model has one.
    return {content: token_id for content, token_id in found.items() if len(content.strip()) >= 2}
