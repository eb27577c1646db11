"""Quality signals of one summary, computed on the CPU as it is published (schema v3's `quality`, Prometheus counters,
`python -m processor quality`).

Cheap by design (well under a millisecond for a summary at the token cap): no model, no tokenizer, only string work
on the summary and the prompt's own packed results. They flag, they do not judge: a grounded share of 0.9 is no proof
of a faithful summary, but a share of 0.2, a loop or a citation to a result that does not exist is worth a look.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from processor.citations import cited_ranks
from processor.engines.base import Prompt
from processor.guards import Guarded

# Words shorter than this are mostly function words ("the", "and", "은", "는"): they say nothing about grounding.
MIN_LATIN_WORD = 4
MIN_CJK_WORD = 2
_WORD = re.compile(r"\w+")
_LONG_WORD = re.compile(r"\w{%d,}" % MIN_LATIN_WORD)  # a whole word (a word's first character starts the match)
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HAN = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")
_ASCII_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# What may surround a word in text split at whitespace (the ASCII punctuation; a word is never made of it).
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~"
# Scripts each summary language is written in; a summary whose letters are mostly of another script is a mismatch.
_SCRIPTS = {"ko": (_HANGUL,), "ja": (_KANA, _HAN), "zh": (_HAN,)}
MISMATCH_BELOW = 0.3  # share of the letters in the expected script
SAMPLE_CHARS = 2000
# The delimiters processor/prompt.py wraps the query and results in; web text inside them is neutralised there, so in
# a summary they can only come from the model copying its prompt.
_PROMPT_MARKUP = re.compile(r"<\s*/?\s*(?:search_results|result|query)\b", re.IGNORECASE)  # the script shows in the first characters; a loop of 1,536 tokens need not be read whole


@dataclass(frozen=True)
class Quality:
    cut_off: bool  # the engine stopped at the token cap (finish_reason length)
    loop_trimmed: bool  # a repetition loop was cut off (processor/guards.py)
    trimmed_chars: int
    citations: int  # distinct [n] markers that name a result of the prompt
    citations_out_of_range: int  # distinct [n] markers that name no result of the prompt
    grounded_share: float  # share of the summary's content words found in the query or the results, 0..1
    language_mismatch: bool  # the summary is not written in the script of the language it was asked for
    prompt_echo: bool  # the summary copies the prompt's own markup (<query>, <result …>): the input echoed back

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def assess(prompt: Prompt, text: str, finish_reason: str, guarded: Guarded | None = None) -> Quality:
    """The signals of `text`, the summary as published for `prompt` (after the guard, whose verdict is `guarded`)."""
    ranks = {result.rank for result in prompt.event.results}
    cited = cited_ranks(text)
    in_range = sum(1 for rank in cited if rank in ranks)
    return Quality(
        cut_off=finish_reason == "length",
        loop_trimmed=bool(guarded and guarded.loop_trimmed),
        trimmed_chars=guarded.trimmed_chars if guarded else 0,
        citations=in_range,
        citations_out_of_range=len(cited) - in_range,
        grounded_share=grounded_share(text, prompt),
        language_mismatch=language_mismatch(text, prompt.language),
        prompt_echo=bool(_PROMPT_MARKUP.search(text)),
    )


def grounded_share(text: str, prompt: Prompt) -> float:
    """Share of the summary's content words that occur in the query or the packed results (as a substring of their
    lower-cased text: "batteries" is grounded by "batteries", a Korean word by its stem without the last syllable,
    which is often a particle). 1.0 for a summary with no content words."""
    lower = text.lower()
    if lower.isascii():  # content words: four letters or more, not all digits (a word too short has no CJK letter)
        counts = Counter(word for word in _LONG_WORD.findall(lower) if not word.isdigit())
    else:
        counts = Counter(word for word in _WORD.findall(lower) if _content(word))
    total = sum(counts.values())
    if not total:
        return 1.0
    source = _Source(prompt)
    found = sum(counts[word] for word in counts.keys() & source.words)  # whole pieces of the source: a set operation
    for word in counts.keys() - source.words:
        if word in source.joined or (_HANGUL.match(word) and len(word) > 2 and source.holds(word[:-1])):
            found += counts[word]
    return round(found / total, 3)


class _Source:
    """The query and packed results, lower-cased, for "is this word a substring of them".

    A word is made of word characters only, and whitespace is never one, so the word is a substring of the text
    exactly when it is a substring of one of the text's whitespace-separated pieces: it is looked up among the
    distinct pieces (as a whole piece, or one with its punctuation stripped, first: a set lookup) and only then
    searched for in those distinct pieces joined, a fraction of the text's length where text repeats itself."""

    def __init__(self, prompt: Prompt) -> None:
        event = prompt.event
        # Lower-cased whole, as before: a Greek final sigma lower-cases by what follows it.
        text = " ".join([event.query, *(f"{r.title} {r.snippet} {r.content or ''}" for r in event.results)]).lower()
        pieces = set(text.split())
        self.words = pieces | {piece.strip(_PUNCTUATION) for piece in pieces}
        self.joined = " ".join(pieces)

    def holds(self, word: str) -> bool:
        return word in self.words or word in self.joined


def _content(word: str) -> bool:
    if word.isdigit():
        return False  # citation numbers, years: not words
    cjk = _HANGUL.match(word) or _HAN.match(word) or _KANA.match(word)
    return len(word) >= (MIN_CJK_WORD if cjk else MIN_LATIN_WORD)


def language_mismatch(text: str, language: str) -> bool:
    """Whether the summary's letters are mostly not in the script of `language` (ko: Hangul; ja: kana or Han;
    zh: Han; anything else: Latin). By script only: English written for a German request is not caught."""
    sample = text[:SAMPLE_CHARS]
    scripts = _SCRIPTS.get(language.split("-")[0].lower(), (_LATIN,))
    if sample.isascii():  # its letters are A-Z and a-z: all Latin, none of another script
        data = sample.encode("ascii")
        letters = len(data) - len(data.translate(None, _ASCII_LETTERS))
        return bool(letters) and scripts != (_LATIN,)
    letters = sum(map(str.isalpha, sample))
    if not letters:
        return False
    expected = sum(len(pattern.findall(sample)) for pattern in scripts)
    return expected / letters < MISMATCH_BELOW


# ------------------------------------------------------------------------------------ `python -m processor quality`
def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def _badness(summary: dict[str, Any]) -> float:
    """How much a summary deserves a look: loops and cut-offs first, then invented citations, then low grounding."""
    quality = summary.get("quality") or {}
    return (2.0 * bool(quality.get("loop_trimmed")) + 1.5 * (summary.get("finish_reason") == "length")
            + 1.0 * bool(quality.get("citations_out_of_range")) + 1.0 * bool(quality.get("language_mismatch"))
            + 1.5 * bool(quality.get("prompt_echo"))
            + (1.0 - float(quality.get("grounded_share", 1.0))))


def report(summaries: list[dict[str, Any]], worst: int = 3, width: int = 160) -> str:
    """The shares of each signal, the length distribution and the `worst` summaries, as text for an operator."""
    total = len(summaries)
    if not total:
        return "no summaries read"
    measured = [s for s in summaries if s.get("quality")]
    quality = [s["quality"] for s in measured]

    def share(count: int, of: int) -> str:
        return f"{count / of:6.1%}  ({count} of {of})" if of else "     —  (not measured)"

    tokens = [float(s.get("completion_tokens", 0)) for s in summaries]
    chars = [float(len(s.get("summary", ""))) for s in summaries]
    grounded = [float(q["grounded_share"]) for q in quality]
    models = sorted({f"{s.get('engine')}:{s.get('model')} prompt {s.get('prompt_version')}" for s in summaries})
    lines = [
        f"{total} summaries ({len(measured)} with quality signals, schema v3); " + "; ".join(models[:3])
        + (f" and {len(models) - 3} more" if len(models) > 3 else ""),
        f"  cut off by the token cap     {share(sum(s.get('finish_reason') == 'length' for s in summaries), total)}",
        f"  loop trimmed                 {share(sum(bool(q['loop_trimmed']) for q in quality), len(quality))}",
        f"  cite no result               {share(sum(not s.get('citations') for s in summaries), total)}",
        f"  cite a result that is absent {share(sum(q['citations_out_of_range'] > 0 for q in quality), len(quality))}",
        f"  language mismatch            {share(sum(bool(q['language_mismatch']) for q in quality), len(quality))}",
        f"  prompt echoed back           {share(sum(bool(q.get('prompt_echo')) for q in quality), len(quality))}",
        f"  grounded share               median {_percentile(grounded, 0.5):.2f}, p10 {_percentile(grounded, 0.1):.2f}"
        if grounded else "  grounded share               — (not measured)",
        f"  completion tokens            p50 {_percentile(tokens, 0.5):.0f}, p90 {_percentile(tokens, 0.9):.0f}, "
        f"max {max(tokens):.0f}",
        f"  summary characters           p50 {_percentile(chars, 0.5):.0f}, p90 {_percentile(chars, 0.9):.0f}, "
        f"max {max(chars):.0f}",
    ]
    flagged = sorted((s for s in summaries if _badness(s) > 0.5), key=_badness, reverse=True)[:worst]
    if flagged:
        lines.append(f"worst {len(flagged)}:")
    for summary in flagged:
        q = summary.get("quality") or {}
        flags = [name for name, on in (("cut off", summary.get("finish_reason") == "length"),
                                       ("loop trimmed", q.get("loop_trimmed")),
                                       (f"{q.get('citations_out_of_range')} absent citation(s)", q.get("citations_out_of_range")),
                                       ("language mismatch", q.get("language_mismatch")),
                                       ("prompt echoed", q.get("prompt_echo"))) if on]
        text = " ".join(str(summary.get("summary", "")).split())
        lines.append(f"  {summary.get('event_id')}  grounded {q.get('grounded_share', '—')}  "
                     f"{summary.get('completion_tokens')} tokens  {', '.join(flags) or 'low grounding'}")
        lines.append(f"    {text[:width]}{'…' if len(text) > width else ''}")
    return "\n".join(lines)
