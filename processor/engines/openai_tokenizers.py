"""ENGINE=openai's token counting and server URLs (openai_engine.py sends the requests): a local Hugging Face
tokenizer where OPENAI_TOKENIZER names one, else the server's own /tokenize (vLLM), else an estimate."""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import httpx

from processor.engines.base import ChatMessage, Encoded, EngineStartupError, Tokenizer
from processor.settings import Settings

log = logging.getLogger(__name__)

# Control strings of the chat templates in common use (ChatML, Llama 3, Mistral, Gemma, Phi, Granite, DeepSeek):
# where no local tokenizer says which strings the served model treats as control tokens, untrusted text is cleaned
# of all of these (the server renders message content with its template and tokenises it, special tokens included).
KNOWN_CONTROL_TOKENS = frozenset({
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<|system|>",
    "<|user|>", "<|assistant|>", "<|end|>", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<tool_call>", "</tool_call>",
})
_ESTIMATED_TOKEN = re.compile(r"[\x00-\x7f]{1,3}|[^\x00-\x7f]", re.S)


class EstimateTokenizer:
    """No tokenizer of the model at hand: one token per 3 ASCII characters and one per other character.

    Conservative for the tokenizers of current chat models (English runs ~4 characters a token; a Korean or Chinese
    character is one token or less in Qwen2.5, Llama 3, Gemma), so a packed prompt fits the server's context at
    the cost of some unused room; the chat is rendered in ChatML, whose markers cost more here than in any template.
    Ids are placeholders: only their number means anything (the server gets messages, not ids)."""

    control_tokens = KNOWN_CONTROL_TOKENS
    control_token_ids: frozenset[int] = frozenset()  # no real ids: the cleaner alone keeps control strings out

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"

    def encode(self, text: str) -> Encoded:
        starts = [match.start() for match in _ESTIMATED_TOKEN.finditer(text)]
        return Encoded([0] * len(starts), lambda: starts)

    def chat_token_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return list(self.encode(self.render_chat(messages)).ids)

    def count(self, text: str) -> int:
        return sum(1 for _ in _ESTIMATED_TOKEN.finditer(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        if max_tokens <= 0:
            return ""
        for index, match in enumerate(_ESTIMATED_TOKEN.finditer(text)):
            if index == max_tokens:
                return text[: match.start()]
        return text


class ServerTokenizer(EstimateTokenizer):
    """The server's own count (vLLM's `POST /tokenize`), from the polling thread.

    The chat is rendered as its messages' contents; the template's overhead (the server's count of the chat minus
    its count of that rendering) is measured once and added to every count, so the total is what the server will
    see. Token starts are spread evenly over the text (the prompt builder re-measures whatever it cuts). A /tokenize
    that fails mid-run falls back to the estimate for that text: counting must never become a record's failure."""

    def __init__(self, *, client: httpx.Client, url: str, model: str) -> None:
        self.client = client
        self.url = url
        self.model = model
        self._estimate = EstimateTokenizer()
        probe = (ChatMessage("system", "You summarise."), ChatMessage("user", "What is Kafka?"))
        chat = self._tokens({"model": model, "messages": [{"role": m.role, "content": m.content} for m in probe],
                             "add_generation_prompt": True})
        plain = self._tokens({"model": model, "prompt": self.render_chat(probe), "add_special_tokens": False})
        if chat is None or plain is None:
            raise ValueError("the server has no usable /tokenize")
        self.overhead = max(0, chat - plain)
        self._warned = False

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return "\n".join(m.content for m in messages)

    def encode(self, text: str) -> Encoded:
        count = self._count(text) + self.overhead
        length = len(text)
        return Encoded([0] * count, lambda: [index * length // max(1, count) for index in range(count)])

    def count(self, text: str) -> int:
        return self._count(text) if text else 0

    def truncate(self, text: str, max_tokens: int) -> str:
        if max_tokens <= 0 or not text:
            return ""
        if self._count(text) <= max_tokens:
            return text
        return self._estimate.truncate(text, max_tokens)

    def _count(self, text: str) -> int:
        count = self._tokens({"model": self.model, "prompt": text, "add_special_tokens": False})
        if count is None:
            if not self._warned:
                log.warning("the server's /tokenize failed: counting tokens by the estimate until it answers again")
                self._warned = True
            return self._estimate.count(text)
        self._warned = False
        return count

    def _tokens(self, body: dict[str, Any]) -> int | None:
        try:
            response = self.client.post(self.url, json=body)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        try:
            payload = response.json()
            return int(payload["count"]) if "count" in payload else len(payload["tokens"])
        except (ValueError, KeyError, TypeError):
            return None


def api_root(base_url: str) -> str:
    return base_url.rstrip("/")


def tokenize_url(base_url: str) -> str | None:
    """vLLM serves /tokenize beside /v1, not under it."""
    root = api_root(base_url)
    return root[: -len("/v1")] + "/tokenize" if root.endswith("/v1") else None


def make_tokenizer(client: httpx.Client, settings: Settings) -> Tokenizer:
    if settings.openai_tokenizer:
        from processor.engines.hf_tokenizer import HFChatTokenizer

        try:
            from transformers import AutoTokenizer

            return HFChatTokenizer(AutoTokenizer.from_pretrained(settings.openai_tokenizer))
        except Exception as exc:  # noqa: BLE001 - any failure to load it is a configuration problem
            raise EngineStartupError(f"OPENAI_TOKENIZER={settings.openai_tokenizer} cannot be loaded: {exc}") from None
    url = tokenize_url(settings.openai_base_url)
    if url is not None:
        try:
            return ServerTokenizer(client=client, url=url, model=settings.model_for_openai)
        except ValueError:
            pass
    log.warning("ENGINE=openai: no OPENAI_TOKENIZER and no /tokenize on the server: prompts are packed by an estimate "
                "(one token per 3 ASCII characters, one per other character), leaving some of the context unused")
    return EstimateTokenizer()
