"""Guards against runaway output: a summary that loops is trimmed to before the loop, and a summary cut by the token
cap ends on a whole character and, where one is near, a whole sentence.

A small model at the ADR's sampling (0.7 / 0.9 / 1,536 tokens) runs 41 % of its summaries to the cap in loops such as
"No. No. No. …" or one sentence over and over (issue 18). Sampling penalties (SAMPLING_REPETITION_PENALTY, …) make
loops rarer; this catches the ones left, on the text, in either generation mode and with any engine. Both checks are
linear in the text's words with a small constant (bench/loop_cpu.py: ~25 µs for a 250-token English summary).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import islice

REPLACEMENT_CHAR = "\ufffd"
# Short units must repeat more often to count: "very very very" is English, "No No No No No" is a loop.
MAX_UNIT_WORDS = 12
_REPEATS_FOR_UNIT = {1: 5, 2: 4}
DEFAULT_REPEATS = 3
# The same sentence (of this many words or more) a third time anywhere in the summary is a loop too.
SENTENCE_REPEATS = 3
MIN_SENTENCE_WORDS = 2
# A cut-off summary is shortened to its last whole sentence only if that keeps at least this share of it.
MIN_SENTENCE_KEEP = 0.5

_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?。！？]+[\"'”’)\]]*(?=\s|$)")
_WORD_OR_END = re.compile(r"(\w+)|" + _SENTENCE_END.pattern)


@dataclass(frozen=True)
class Guarded:
    text: str
    loop_trimmed: bool  # a repetition loop was found; text stops before its first repeat
    trimmed_chars: int  # characters removed for the loop (0 when none)
    cut_to_sentence: bool  # a cut-off or trimmed summary was shortened to its last whole sentence


def loop_start(text: str) -> int | None:
    """Where a repetition loop's first repeat begins in `text` (keep text[:start]: one copy of the repeated unit), or
    None when nothing repeats enough to be a loop."""
    # ASCII text may be lower-cased whole (the same words, far cheaper); other text is lower-cased word by word, as
    # lower-casing may turn one word character into two with a non-word one between them (İ → i + U+0307), and a Greek
    # final sigma lower-cases by what follows it.
    lower = text.lower() if text.isascii() else None
    # One pass for both checks: the words, and an empty string where a sentence ends (the two never overlap: a
    # sentence end is punctuation, never a word character).
    marked = _WORD_OR_END.findall(lower) if lower is not None else list(map(str.lower, _WORD_OR_END.findall(text)))
    found = _unit_repeat(list(filter(None, marked)))
    if found is not None:  # the offset of that word: only now is a match object's position worth its cost
        found = next(islice(_WORD.finditer(text), found, None)).start()
    sentence = _sentence_repeat(text, lower) if _some_sentence_repeats(marked) else None
    candidates = [start for start in (found, sentence) if start is not None]
    return min(candidates) if candidates else None


def _words(text: str, lower: str | None, start: int, end: int) -> list[str]:
    """The words of text[start:end], each lower-cased (`lower`: the whole text lower-cased, where that is the same)."""
    if lower is not None:
        return _WORD.findall(lower, start, end)
    return list(map(str.lower, _WORD.findall(text, start, end)))


def _unit_repeat(tokens: list[str]) -> int | None:
    """The earliest run of 1 to MAX_UNIT_WORDS words repeated back to back often enough: the index of the word that
    starts its second copy.

    Each word becomes one byte, so comparing the text with itself shifted by a period is one XOR of two big integers,
    and a run of equal words is a run of zero bytes that bytes.find looks for in C; a text of more than 256 distinct
    words (rare below the token cap) is compared word by word."""
    distinct = dict.fromkeys(tokens)
    if len(distinct) > 256:
        return _unit_repeat_by_word(tokens)
    codes = dict(zip(distinct, range(len(distinct))))
    data = bytes(map(codes.__getitem__, tokens))
    size = len(data)
    best: int | None = None
    for period in range(1, min(MAX_UNIT_WORDS, size // 2) + 1):
        needed = (_REPEATS_FOR_UNIT.get(period, DEFAULT_REPEATS) - 1) * period
        same = (int.from_bytes(data[period:], "little") ^ int.from_bytes(data[: size - period], "little")).to_bytes(size - period, "little")
        run = same.find(bytes(needed))  # byte i is zero where word period + i equals word i
        if run >= 0 and (best is None or run + period < best):
            best = run + period
    return best


def _unit_repeat_by_word(tokens: list[str]) -> int | None:
    best: int | None = None
    for period in range(1, min(MAX_UNIT_WORDS, len(tokens) // 2) + 1):
        needed = (_REPEATS_FOR_UNIT.get(period, DEFAULT_REPEATS) - 1) * period
        run = 0
        for index in range(period, len(tokens)):
            if best is not None and index - run >= best:
                break  # anything found from here starts later than the loop already found
            run = run + 1 if tokens[index] == tokens[index - period] else 0
            if run >= needed:
                second_copy = index - run + 1
                if best is None or second_copy < best:
                    best = second_copy
                break
    return best


def _some_sentence_repeats(marked: list[str]) -> bool:
    """Whether a sentence occurs SENTENCE_REPEATS times (words, "" at each sentence end): rarely, and only then is
    its offset worth _sentence_repeat's pass."""
    seen: dict[tuple[str, ...], int] = {}
    sentence: list[str] = []
    for token in marked:
        if token:
            sentence.append(token)
            continue
        if len(sentence) >= MIN_SENTENCE_WORDS:
            key = tuple(sentence)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] >= SENTENCE_REPEATS:
                return True
        sentence = []
    return False


def _sentence_repeat(text: str, lower: str | None) -> int | None:
    """The offset of the second occurrence of the first sentence seen SENTENCE_REPEATS times."""
    seen: dict[tuple[str, ...], list[int]] = {}
    start = 0
    for end in _SENTENCE_END.finditer(text):
        key = tuple(_words(text, lower, start, end.end()))
        if len(key) >= MIN_SENTENCE_WORDS:
            offsets = seen.setdefault(key, [])
            sentence = text[start : end.end()]
            offsets.append(start + len(sentence) - len(sentence.lstrip()))
            if len(offsets) >= SENTENCE_REPEATS:
                return offsets[1]
        start = end.end()
    return None


def whole_ending(text: str, *, mid_word: bool = True) -> tuple[str, bool]:
    """`text` cut at its last whole sentence when that keeps most of it, else (when it may end `mid_word`) at its last
    whole word; never ending in U+FFFD (half a multi-byte character). Returns the text and whether it was cut to a
    sentence."""
    text = text.rstrip().rstrip(REPLACEMENT_CHAR).rstrip()
    ends = list(_SENTENCE_END.finditer(text))
    if ends and ends[-1].end() == len(text):
        return text, False  # already ends on a sentence
    if ends and ends[-1].end() >= MIN_SENTENCE_KEEP * len(text):
        return text[: ends[-1].end()], True
    space = text.rfind(" ")
    if mid_word and space > 0 and len(text) - space < 40:  # drop a half word, not a whole CJK run without spaces
        return text[:space].rstrip(" ,;:-"), False
    return text, False


def guard_summary(text: str, finish_reason: str) -> Guarded:
    """The summary as published: loop trimmed, a cut-off end tidied, no trailing U+FFFD. Never empty for a non-empty
    input (the first copy of a looping unit is always kept)."""
    text = text.strip()
    start = loop_start(text)
    trimmed = 0
    kept = text
    if start is not None:
        kept = text[:start].rstrip()
        trimmed = len(text) - len(kept)
    cut_to_sentence = False
    if start is not None or finish_reason == "length":
        # A trimmed loop ends where a word began; only text cut by the token cap may end inside a word.
        kept, cut_to_sentence = whole_ending(kept, mid_word=start is None)
    else:
        kept = kept.rstrip(REPLACEMENT_CHAR).rstrip()
    if not kept:  # only half a character or a loop with nothing before it: publish what the model wrote
        return Guarded(text, False, 0, False)
    return Guarded(kept, start is not None, trimmed, cut_to_sentence)
