"""Which search results a summary cites. The prompt asks the model to cite results by rank (`[1]`, `[2][3]`); the
summary record carries the cited results' rank, URL and title, so a consumer of the summary topic can resolve a
citation without the input event."""

from __future__ import annotations

import re
from typing import Any

from processor.events import SearchEvent

# [1], [2][3], and the list forms models also write: [1, 3], [1,2,4]. Full-width brackets/commas appear in
# CJK output. Numbers of more than three digits are not ranks (years, prices).
_MARKER = re.compile(r"[\[［]\s*(\d{1,3}(?:\s*[,，、]\s*\d{1,3})*)\s*[\]］]")
_NUMBER = re.compile(r"\d+")


def cited_ranks(summary_text: str) -> list[int]:
    """Ranks cited by `[n]` markers, in order of first citation, each once."""
    ranks: list[int] = []
    for marker in _MARKER.finditer(summary_text):
        for number in _NUMBER.findall(marker.group(1)):
            if int(number) not in ranks:
                ranks.append(int(number))
    return ranks


def cited_results(event: SearchEvent, summary_text: str) -> list[dict[str, Any]]:
    """The event's results the summary cites — {rank, url, title} each, in order of first citation. A marker whose
    rank is not among the event's results (a model's invention) is left out: a citation must resolve."""
    by_rank = {result.rank: result for result in event.results}
    return [
        {"rank": rank, "url": by_rank[rank].url, "title": by_rank[rank].title}
        for rank in cited_ranks(summary_text)
        if rank in by_rank
    ]
