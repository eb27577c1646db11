import textwrap

from processor.ops.display import cell_width, fill, wrap
from processor.ops.samples import sample_events

KOREAN = " ".join(r["content"] or r["snippet"] for r in sample_events()[0]["results"])


def test_hangul_takes_two_cells():
    assert cell_width("배터리") == 6 and cell_width("abc") == 3 and cell_width("20~80% 사이") == 11
    assert cell_width("e\u0301") == 1, "a combining mark takes no cell"


def test_korean_wraps_at_the_width_in_cells_not_characters():
    lines = wrap(KOREAN, 100)
    assert all(cell_width(line) <= 100 for line in lines)
    assert max(cell_width(line) for line in lines) > 90, "and uses the width"
    assert " ".join(lines) == " ".join(KOREAN.split()), "nothing lost"
    # textwrap counts characters: its Korean lines come out up to twice as wide as the terminal allows.
    assert max(cell_width(line) for line in textwrap.wrap(KOREAN, 100)) > 150


def test_english_wraps_like_textwrap():
    english = " ".join(r["content"] or r["snippet"] for r in sample_events()[1]["results"])
    assert wrap(english, 100) == textwrap.wrap(english, 100)


def test_a_word_wider_than_the_line_is_broken_and_indent_counts():
    assert wrap("가" * 30, 20) == ["가" * 10, "가" * 10, "가" * 10]
    filled = fill(KOREAN, 60, indent="   ")
    assert all(line.startswith("   ") and cell_width(line) <= 60 for line in filled.splitlines())
