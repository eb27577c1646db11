"""Quality signals: computed on the summary as published, carried in schema v3, counted in the metrics."""

import time
from datetime import datetime, timezone

from processor.source import BatchItem, SourceRecord
from processor.codec import SUMMARY_SCHEMA, AvroCodec
from processor.engines.base import Generation, Prompt
from processor.events import validate_event
from processor.guards import guard_summary
from processor.metrics import Metrics
from processor.quality import assess, grounded_share, language_mismatch
from processor.records import RecordBuilder
from processor.ops.samples import sample_events

CODEC = AvroCodec()
EVENT = validate_event(next(e for e in sample_events() if e.get("language") == "en"))


def prompt_for(event=EVENT, language="en"):
    return Prompt(event, (), (1, 2, 3), language, len(event.results), 0)


def test_citations_in_and_out_of_range():
    top = max(r.rank for r in EVENT.results)
    quality = assess(prompt_for(), f"One [1]. Two [1][{top}]. Made up [{top + 1}], [99].", "stop")
    assert (quality.citations, quality.citations_out_of_range) == (2, 2)


def test_grounded_share_is_high_for_words_from_the_results_and_low_for_invented_ones():
    words = " ".join(r.title for r in EVENT.results)
    assert grounded_share(words, prompt_for()) == 1.0
    assert grounded_share("Zebras juggle marmalade spoons beautifully", prompt_for()) == 0.0
    assert grounded_share("[1] [2] a to of", prompt_for()) == 1.0  # no content words: nothing to doubt


def test_language_mismatch_by_script():
    assert not language_mismatch("서울은 한국의 수도이다 [1].", "ko")
    assert language_mismatch("Seoul is the capital of Korea [1].", "ko")
    assert language_mismatch("서울은 한국의 수도이다.", "en")
    assert not language_mismatch("Kafka rebalances partitions [1].", "en")
    assert not language_mismatch("[1] [2]", "ko")  # no letters: no verdict


def test_cut_off_and_loop_come_from_the_finish_reason_and_the_guard():
    text = "Kafka consumers rebalance [1]. No. No. No. No. No. No."
    guarded = guard_summary(text, "length")
    quality = assess(prompt_for(), guarded.text, "length", guarded)
    assert quality.cut_off and quality.loop_trimmed and quality.trimmed_chars == guarded.trimmed_chars > 0
    assert not assess(prompt_for(), "Fine [1].", "stop").cut_off


def test_signals_cost_well_under_a_millisecond_for_a_long_summary():
    text = " ".join(f"Consumers in group {i} rebalance partitions [{i % 5 + 1}]." for i in range(150))
    prompt = prompt_for()
    started = time.perf_counter()
    for _ in range(50):
        assess(prompt, text, "length")
    assert (time.perf_counter() - started) / 50 < 0.001


def builder():
    return RecordBuilder(encode_summary=lambda r: CODEC.encode(r, SUMMARY_SCHEMA), output_topic="out", dlq_topic="dlq",
                         engine_kind="transformers", model="m", prompt_version="p")


def item_for(prompt):
    return BatchItem(source=SourceRecord("in", 0, 5, b"k", b"v", 0), prompt=prompt)


def test_a_published_summary_is_trimmed_carries_its_signals_and_counts_them():
    generation = Generation("Kafka consumers rebalance [1]. No. No. No. No. No. No. No. No", "length", 100, 1536)
    record = builder().for_item(item_for(prompt_for()), generation, datetime(2026, 12, 1, tzinfo=timezone.utc))
    decoded = CODEC.decode(record.value, SUMMARY_SCHEMA)
    assert decoded["summary"] == "Kafka consumers rebalance [1]. No."
    assert decoded["finish_reason"] == "length" and decoded["completion_tokens"] == 1536
    assert decoded["quality"]["loop_trimmed"] and decoded["quality"]["cut_off"] and decoded["quality"]["citations"] == 1
    metrics = Metrics()
    metrics.acknowledged(record)
    value = metrics.registry.get_sample_value
    assert value("ai_worker_summaries_loop_trimmed_total") == 1 and value("ai_worker_summaries_cut_off_total") == 1
    assert value("ai_worker_summaries_uncited_total") == 0 and value("ai_worker_summary_grounded_share_count") == 1
    assert value("ai_worker_summaries_prompt_echo_total") == 0


def test_the_report_shows_shares_lengths_and_the_worst_first():
    from processor.quality import report

    base = {"engine": "vllm", "model": "m", "prompt_version": "p", "citations": [{"rank": 1}]}
    good = {**base, "event_id": "good", "summary": "Fine [1].", "finish_reason": "stop", "completion_tokens": 40,
            "quality": {"loop_trimmed": False, "citations_out_of_range": 0, "language_mismatch": False, "grounded_share": 0.9}}
    looped = {**base, "event_id": "looped", "summary": "No.", "finish_reason": "length", "completion_tokens": 1536, "citations": [],
              "quality": {"loop_trimmed": True, "citations_out_of_range": 0, "language_mismatch": False, "grounded_share": 0.2, "prompt_echo": True}}
    old = {**base, "event_id": "v2", "summary": "Old [1].", "finish_reason": "stop", "completion_tokens": 60, "quality": None}
    text = report([good, looped, old], worst=2)
    assert "3 summaries (2 with quality signals" in text
    assert "cut off by the token cap      33.3%  (1 of 3)" in text and "loop trimmed                  50.0%  (1 of 2)" in text
    assert "max 1536" in text and "prompt echoed back            50.0%  (1 of 2)" in text
    worst = text[text.index("worst"):]
    assert worst.index("looped") < (worst.index("good") if "good" in worst else len(worst))
    assert report([]) == "no summaries read"


def test_a_summary_that_copies_its_prompt_back_is_flagged():
    echoed = "<query>best practices</query>\n\n<search_results>\n<result rank=\"1\">\ntitle: Error handling"
    assert assess(prompt_for(), echoed, "length").prompt_echo
    assert not assess(prompt_for(), "Send failing records to a dead letter topic [1].", "stop").prompt_echo


def test_summarize_prints_the_published_summary_with_its_signals():
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "processor", "summarize", "--samples"], capture_output=True, text=True,
                            env={**os.environ, "ENGINE": "extractive"}, timeout=120, check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 6
    for line in lines:
        assert set(line["quality"]) >= {"cut_off", "loop_trimmed", "grounded_share", "language_mismatch", "prompt_echo"}
        assert not line["quality"]["language_mismatch"] and line["quality"]["grounded_share"] > 0.5  # extractive: copied


# The signals as first written (one substring search of the whole source per word, one isalpha() per character):
# the faster code must give the same numbers on inputs where its shortcuts could go wrong.
def _reference_grounded_share(text, prompt):
    import re

    event = prompt.event
    source = " ".join([event.query, *(f"{r.title} {r.snippet} {r.content or ''}" for r in event.results)]).lower()
    hangul, han, kana = re.compile(r"[\uac00-\ud7a3]"), re.compile(r"[\u4e00-\u9fff]"), re.compile(r"[\u3040-\u30ff]")

    def content(word):
        return not word.isdigit() and len(word) >= (2 if hangul.match(word) or han.match(word) or kana.match(word) else 4)

    words = [w for w in re.findall(r"\w+", text.lower()) if content(w)]
    if not words:
        return 1.0
    return round(sum(1 for w in words if w in source or (hangul.match(w) and len(w) > 2 and w[:-1] in source)) / len(words), 3)


def _reference_language_mismatch(text, language):
    import re

    sample = text[:2000]
    letters = sum(1 for c in sample if c.isalpha())
    if not letters:
        return False
    scripts = {"ko": (r"[\uac00-\ud7a3]",), "ja": (r"[\u3040-\u30ff]", r"[\u4e00-\u9fff]"), "zh": (r"[\u4e00-\u9fff]",)}
    expected = sum(len(re.findall(p, sample)) for p in scripts.get(language.split("-")[0].lower(), (r"[A-Za-z\u00c0-\u024f]",)))
    return expected / letters < 0.3


TRICKY_SOURCE = validate_event(EVENT.model_dump() | {
    "query": "ΟΔΟΣ'Α and İstanbul, (batteries) co-op self_driving",
    "results": [r.model_dump() | {"snippet": "Lithium-ion «batteries»; e-mail: x@y.z … 서울은 크다. 東京の電池 ΣΟΦΟΣ."}
                for r in EVENT.results],
})
TRICKY_SUMMARIES = [
    "Batteries [1] and battery-powered cars; ion e-mail mail co-op cooperative self_driving driving. 2024 1234.",
    "Οδος and οδοσ, istanbul İstanbul i̇stanbul, ΣΟΦΟΣ σοφοσ σοφος.",
    "서울은 크다 서울 서울이 東京 東京の電池 電池 ᄀᄀ ㄱㄴ.",
    "Ünïcödé wörds, « guillemets », full-width ＡＢＣＤ and ａｂｃｄ; stanbul anbul ithium.",
    "", "[1] [2] a to of", "ｘ" * 10,
]


def test_grounded_share_and_language_match_the_first_implementation_on_tricky_text():
    prompt = prompt_for(TRICKY_SOURCE)
    for text in TRICKY_SUMMARIES:
        assert grounded_share(text, prompt) == _reference_grounded_share(text, prompt), text
        for language in ("en", "ko", "ja", "zh", "de-AT", "KO-kr"):
            assert language_mismatch(text, language) == _reference_language_mismatch(text, language), (text, language)
