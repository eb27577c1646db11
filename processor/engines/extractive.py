"""A model-free engine: a deterministic extractive summary of the ranked results.

It scores each sentence of the packed results by how much of the query it covers (words for spaced scripts,
character bigrams for Hangul and CJK, so Korean works), weighted towards higher-ranked results, and returns the
best few sentences in rank order with their citations. No GPU, no weights: the whole loop runs anywhere.

It is also a StreamingEngine, so GENERATION_MODE=continuous (and its fault suite) runs on a CPU: a request added
finishes after a number of steps derived from its prompt length (1 + prompt tokens mod 4), so requests finish
out of order as vLLM's do. The summary itself is made by generate() when the request finishes, so a subclass
that slows down or poisons generate() slows down or poisons step() the same way.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterable, Sequence

from processor.engines.base import ChatMessage, Encoded, EventGenerationError, Finished, Generation, Prompt

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|(?<=다\.)|\n+")
_CJK = re.compile(r"[\uac00-\ud7a3\u3040-\u30ff\u4e00-\u9fff]")
_STOPWORDS = frozenset(
    "a an the of and or to in on for with is are was were be by at as from that this what how why which who "
    "은 는 이 가 을 를 의 에 에서 와 과 도 로 으로".split()
)
_ROLE_MARKER = "<|{role}|>"


class RegexTokenizer:
    """Words and punctuation as tokens: a stable, model-free stand-in with the Tokenizer protocol's shape.

    Its role markers (<|system|>, <|user|>, <|assistant|>) are its control tokens: one token each with an id of
    their own above the 16-bit word ids, matched in any text like a real tokenizer's special tokens are.
    """

    _ROLES = ("system", "user", "assistant")
    _CONTROL = {_ROLE_MARKER.format(role=role): 0x10000 + index for index, role in enumerate(_ROLES)}
    _PATTERN = re.compile("|".join([*map(re.escape, _CONTROL), _TOKEN.pattern]), re.UNICODE)  # markers first
    control_tokens = frozenset(_CONTROL)
    control_token_ids = frozenset(_CONTROL.values())

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return "".join(_ROLE_MARKER.format(role=m.role) + m.content for m in messages) + _ROLE_MARKER.format(role="assistant")

    def encode(self, text: str) -> Encoded:
        control = self._CONTROL
        ids = [control.get(token) or zlib.crc32(token.encode()) & 0xFFFF for token in self._PATTERN.findall(text)]
        return Encoded(ids, lambda: [match.start() for match in self._PATTERN.finditer(text)])

    def chat_token_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return list(self.encode(self.render_chat(messages)).ids)

    def count(self, text: str) -> int:
        return sum(1 for _ in self._PATTERN.finditer(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        if max_tokens <= 0:
            return ""
        end = 0
        for index, match in enumerate(self._PATTERN.finditer(text)):
            if index == max_tokens:
                return text[:end]
            end = match.end()
        return text


def _terms(text: str) -> set[str]:
    terms: set[str] = set()
    for word in re.findall(r"\w+", text.lower()):
        if word in _STOPWORDS:
            continue
        if _CJK.search(word):
            # Korean attaches particles to nouns (검색엔진은 → 검색엔진 + 은): compare character bigrams instead.
            terms.update(word[i : i + 2] for i in range(max(1, len(word) - 1)))
        elif len(word) > 1:
            terms.add(word)
    return terms


def _overlap(a: set[str], b: set[str]) -> float:
    return len(a & b) / (min(len(a), len(b)) or 1)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and len(s.strip()) >= 12]


class ExtractiveEngine:
    kind = "extractive"

    # Steps a request stays in flight: 1 + prompt tokens mod STEPS_SPREAD (out-of-order finishing, like vLLM).
    STEPS_SPREAD = 4

    def __init__(self, max_sentences: int = 4, max_chars: int = 900) -> None:
        self.model = "extractive-v1"
        self.tokenizer = RegexTokenizer()
        self.max_sentences = max_sentences
        self.max_chars = max_chars
        # Continuous mode: request id → [steps left, prompt], in the order added.
        self._in_flight: dict[str, list] = {}

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation | EventGenerationError]:
        return [self._summarise(prompt) for prompt in prompts]

    def capacity(self) -> None:
        return None

    # ------------------------------------------------------------------------ StreamingEngine (continuous)
    def add_request(self, request_id: str, prompt: Prompt) -> None:
        if request_id in self._in_flight:
            raise ValueError(f"request {request_id!r} is already in flight")
        self._in_flight[request_id] = [1 + prompt.prompt_tokens % self.STEPS_SPREAD, prompt]

    def step(self) -> list[Finished]:
        done: list[tuple[str, Prompt]] = []
        for request_id, entry in self._in_flight.items():
            entry[0] -= 1
            if entry[0] <= 0:
                done.append((request_id, entry[1]))
        if not done:
            return []
        # One generate() for all that finish in this step: an override that raises fails the step as a whole
        # (like a CUDA error), one that sleeps makes the step slow. Requests stay in flight if it raises.
        outcomes = self.generate([prompt for _, prompt in done])
        for request_id, _ in done:
            del self._in_flight[request_id]
        return [Finished(request_id, outcome) for (request_id, _), outcome in zip(done, outcomes)]

    def abort(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._in_flight.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._in_flight)

    def in_flight_budget(self) -> None:
        """No KV cache: memory does not bound how many requests are in flight (the feed's default applies)."""
        return None

    def close(self) -> None:
        self._in_flight.clear()

    def _summarise(self, prompt: Prompt) -> Generation | EventGenerationError:
        query_terms = _terms(prompt.event.query)
        candidates: list[tuple[float, int, int, str]] = []
        for order, result in enumerate(prompt.event.results):
            rank_weight = 1.0 / (1.0 + 0.35 * order)
            body = " ".join(part for part in (result.snippet, result.content or "") if part)
            for position, sentence in enumerate(_sentences(body)[:40]):
                terms = _terms(sentence)
                coverage = len(query_terms & terms) / (len(query_terms) or 1)
                lead_bonus = 0.15 if position == 0 else 0.0
                score = (coverage + lead_bonus) * rank_weight
                candidates.append((score, order, position, f"{sentence} [{result.rank}]"))
        if not candidates:
            return EventGenerationError("no sentence of at least 12 characters in any search result")
        chosen: list[tuple[int, int, str]] = []
        chosen_terms: list[set[str]] = []
        length = 0
        for score, order, position, sentence in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
            terms = _terms(sentence.rsplit(" [", 1)[0])
            # Snippets usually repeat the page's lead sentence: skip what mostly repeats a chosen sentence.
            if any(_overlap(terms, other) > 0.7 for other in chosen_terms) or length + len(sentence) > self.max_chars and chosen:
                continue
            chosen_terms.append(terms)
            chosen.append((order, position, sentence))
            length += len(sentence) + 1
            if len(chosen) == self.max_sentences:
                break
        text = " ".join(sentence for _, _, sentence in sorted(chosen))
        return Generation(text, "stop", prompt.prompt_tokens, self.tokenizer.count(text))
