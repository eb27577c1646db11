"""bench/corpus.py: the real-text corpus of search-result events the real-model benchmarks run on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.corpus import corpus_digest, corpus_events
from processor.events import validate_event
from processor.ops.tools import parse_event_lines
from processor.quality import language_mismatch

ROOT = Path(__file__).resolve().parents[2]


def test_it_builds_500_valid_distinct_english_events_with_3_to_8_results() -> None:
    events = corpus_events(520)
    validated = [validate_event(event) for event in events]
    assert len({e.event_id for e in validated}) == 520
    assert len({(e.query, tuple(r.url for r in e.results)) for e in validated}) == 520
    assert all(3 <= len(e.results) <= 8 for e in validated)
    assert all(e.language == "en" and not language_mismatch(e.query + " " + e.results[0].snippet, "en") for e in validated)
    # Real documentation, not a template repeated: many different subjects and texts.
    assert len({e.results[0].snippet for e in validated}) > 400
    assert len({e.query.split()[0] for e in validated}) > 10
    # Related results: most pages hold another result of the subject's own module or topic family.
    same_site = sum(len({r.url.split("#")[0] for r in e.results}) < len(e.results) for e in validated)
    assert same_site > 0.5 * len(validated)


def test_it_is_deterministic_per_seed_and_differs_between_seeds() -> None:
    assert corpus_digest(corpus_events(30, seed=3)) == corpus_digest(corpus_events(30, seed=3))
    assert corpus_events(30, seed=3)[0]["event_id"] != corpus_events(30, seed=4)[0]["event_id"]


def test_the_command_writes_lines_that_produce_accepts(tmp_path: Path) -> None:
    out = tmp_path / "corpus.jsonl"
    subprocess.run([sys.executable, str(ROOT / "bench" / "corpus.py"), "--events", "40", "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    with out.open(encoding="utf-8") as stream:
        parsed = parse_event_lines(stream)
    assert len(parsed) == 40 and all(line.error is None for line in parsed)
    assert [json.loads(line)["event_id"] for line in out.read_text().splitlines()] == [e["event_id"] for e in corpus_events(40)]
