"""bench/realmodel_gpu.py's scoring: the shares it records are the ones `python -m processor quality` prints."""

from __future__ import annotations

import random
import re
from typing import Any

from bench.realmodel_gpu import quality_shares, repeats_a_4gram
from processor.quality import report

LABELS = {
    "cut off by the token cap": "cut_off",
    "loop trimmed": "loop_trimmed",
    "cite no result": "cite_none",
    "cite a result that is absent": "citations_out_of_range",
    "language mismatch": "language_mismatch",
    "prompt echoed back": "prompt_echo",
}


def summaries(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        record: dict[str, Any] = {
            "event_id": f"e{i}", "engine": "vllm", "model": "m", "prompt_version": "p",
            "summary": rng.choice(["A short summary [1].", "No. No. No.", "The module reads files [2] and [9]."]),
            "finish_reason": rng.choice(["stop", "stop", "length", "loop"]),
            "completion_tokens": rng.randint(1, 1536),
            "citations": rng.choice([[], [1], [1, 2]]),
        }
        if rng.random() < 0.8:  # the rest are schema v2 records, with no signals
            record["quality"] = {
                "cut_off": record["finish_reason"] == "length", "loop_trimmed": rng.random() < 0.3, "trimmed_chars": 0,
                "citations": len(record["citations"]), "citations_out_of_range": rng.choice([0, 0, 1, 2]),
                "grounded_share": round(rng.random(), 3), "language_mismatch": rng.random() < 0.1,
                "prompt_echo": rng.random() < 0.1,
            }
        out.append(record)
    return out


def test_the_shares_are_the_quality_commands_counts_over_its_denominators() -> None:
    for seed in range(5):
        batch = summaries(57, seed)
        text = report(batch, worst=0)
        shares = quality_shares(batch)
        for label, key in LABELS.items():
            count, of = map(int, re.search(rf"{label}\s+[\d.]+%\s+\((\d+) of (\d+)\)", text).groups())
            assert shares[key] == round(count / of, 4), (label, text)
        grounded = re.search(r"grounded share\s+median ([\d.]+), p10 ([\d.]+)", text).groups()
        assert f"{shares['grounded_share_median']:.2f}" == grounded[0] and f"{shares['grounded_share_p10']:.2f}" == grounded[1]
        tokens = re.search(r"completion tokens\s+p50 (\d+), p90 (\d+), max (\d+)", text).groups()
        figures = shares["completion_tokens"]
        assert (f"{figures['p50']:.0f}", f"{figures['p90']:.0f}", f"{figures['max']:.0f}") == tokens
        assert shares["summaries"] == 57 and sum(shares["finish_reasons"].values()) == 57


def test_a_4_word_sequence_three_times_is_issue_18s_loop_measure() -> None:
    assert repeats_a_4gram("it is a test, it is a test, and it is a test")
    assert not repeats_a_4gram("it is a test, it is a test, and then something else entirely")
    assert not repeats_a_4gram("")
