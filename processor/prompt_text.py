"""Text handling for the prompt builder: the event's language (a producer's tag, else the query's script), and
untrusted text made inert (Cleaner) and cut to a size in characters and UTF-8 bytes. Pure functions of the text."""

from __future__ import annotations

import re
import unicodedata

from processor.events import SearchEvent

# The longest BCP-47 tags in use (language-script-region-variant) are well under 35 characters.
MAX_LANGUAGE_CHARS = 35

LANGUAGE_NAMES = {
    "ko": "Korean (한국어)",
    "en": "English",
    "ja": "Japanese (日本語)",
    "zh": "Chinese (中文)",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
}
_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HAN = re.compile(r"[\u4e00-\u9fff]")
# A query's script shows in its first characters; scanning a 4 MiB one three times would cost 100 ms.
_DETECT_CHARS = 1024
# A BCP-47-like tag: a 2–3 letter language, then subtags (script, region, variant). Anything else is not a language.
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*")
# Codes that name no language to write in (undetermined, multiple, no linguistic content): detect instead.
_NOT_A_LANGUAGE = frozenset({"und", "mul", "zxx", "mis"})
# Web text may close our delimiters to escape them; neutralise any tag we use inside untrusted text.
_DELIMITER = re.compile(r"<\s*/?\s*(search_results|result|query)\b", re.IGNORECASE)
# Unicode format characters (category Cf: zero-width spaces and joiners, bidi controls, tag characters, soft
# hyphen, BOM, …) are invisible but split a delimiter or a control string apart so no match sees it: drop them.
# Generated from unicodedata (Unicode 14, Python 3.11); tests/unit/test_prompt.py checks it against the running one.
FORMAT_CHARS = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)
# What breaks a matched delimiter or control string: its first character swapped for a look-alike that no
# tokenizer treats as markup (and NFKC leaves alone), else a word joiner after it.
_LOOKALIKE = {"<": "‹", ">": "›", "[": "⁅", "]": "⁆", "{": "❴", "}": "❵", "|": "¦"}
_WORD_JOINER = "\u2060"


def language_tag(value: str | None) -> str | None:
    """The primary subtag of a BCP-47-like language tag, lower-cased ("ko-KR", "EN_us" → "ko", "en"), or None for
    anything that is not one: a producer's bad `language` means "detect it", never a dead letter or prompt text."""
    if not value or len(value) > MAX_LANGUAGE_CHARS:
        return None
    tag = unicodedata.normalize("NFKC", value).strip().replace("_", "-")
    if not _LANGUAGE_TAG.fullmatch(tag):  # fullmatch: "$" would accept a trailing newline
        return None
    primary = tag.split("-", 1)[0].lower()
    return None if primary in _NOT_A_LANGUAGE else primary


def detect_language(event: SearchEvent) -> str:
    tag = language_tag(event.language)
    if tag:
        return tag
    head = event.query[:_DETECT_CHARS]
    if _HANGUL.search(head):
        return "ko"
    if _KANA.search(head):
        return "ja"
    if _HAN.search(head):
        return "zh"
    return "en"


def _break(match: re.Match[str]) -> str:
    text = match.group(0)
    first = text[0]
    return _LOOKALIKE.get(first, first + _WORD_JOINER) + text[1:]


class Cleaner:
    """Makes untrusted text inert: it cannot close our delimiters nor produce one of the tokenizer's control tokens.

    Format characters out, so zero-width characters cannot split a match; then NFKC, so full-width and other
    compatibility look-alikes (＜／search_results＞, ＜｜im_start｜＞) become the ASCII they would be read as (no
    NFKC mapping yields a format character, so none comes back); last, every delimiter and control string, in any
    case, gets its first character swapped — after NFKC, which would otherwise rebuild them.
    """

    def __init__(self, control_tokens: frozenset[str]) -> None:
        ordered = sorted(control_tokens, key=len, reverse=True)  # longest first: <|im_start|> before <|im
        self.controls = re.compile("|".join(map(re.escape, ordered)), re.IGNORECASE) if ordered else None
        # The characters a match must start with: text without any of them needs no regex pass (the common case).
        self.triggers = tuple({"<"} | {c for token in ordered for c in (token[0].lower(), token[0].upper())})

    def __call__(self, text: str) -> str:
        if not text.isascii():  # ASCII is already NFKC and has no format characters
            text = FORMAT_CHARS.sub("", text)
            if not unicodedata.is_normalized("NFKC", text):
                text = unicodedata.normalize("NFKC", text)
        for trigger in self.triggers:
            if trigger in text:
                return self._neutralise(text)
        return text

    def _neutralise(self, text: str) -> str:
        text = _DELIMITER.sub(_break, text)
        return self.controls.sub(_break, text) if self.controls is not None else text


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def prefix(text: str, max_chars: int, max_bytes: int) -> str:
    """The longest prefix of at most `max_chars` characters and `max_bytes` UTF-8 bytes (the text itself if it fits)."""
    text = text[:max_chars]
    if text.isascii():
        return text[:max_bytes]
    data = text.encode("utf-8", "surrogatepass")
    return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", "ignore")
