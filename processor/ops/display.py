"""Text for terminals: width in display cells, not characters. A Hangul syllable or a CJK ideograph takes two
cells (East Asian Width W or F), so wrapping Korean at 100 *characters* makes lines twice as wide as English ones."""

from __future__ import annotations

import unicodedata


def cell_width(text: str) -> int:
    """Display cells `text` takes in a monospace terminal (combining marks take none)."""
    width = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def wrap(text: str, width: int = 100) -> list[str]:
    """Lines of at most `width` cells, broken at spaces; a word wider than a line is broken between characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line, line_width = "", 0
        for word in paragraph.split():
            word_width = cell_width(word)
            if line and line_width + 1 + word_width <= width:
                line, line_width = f"{line} {word}", line_width + 1 + word_width
                continue
            if line:
                lines.append(line)
            line, line_width = "", 0
            while word_width > width:  # a long URL, or an unspaced run of CJK
                head, head_width = _take(word, width)
                lines.append(head)
                word, word_width = word[len(head):], word_width - head_width
            line, line_width = word, word_width
        lines.append(line)
    return lines


def fill(text: str, width: int = 100, indent: str = "") -> str:
    return "\n".join(indent + line for line in wrap(text, width - cell_width(indent)))


def _take(word: str, width: int) -> tuple[str, int]:
    taken = 0
    for index, char in enumerate(word):
        cells = cell_width(char)
        if taken + cells > width and index:
            return word[:index], taken
        taken += cells
    return word, taken
