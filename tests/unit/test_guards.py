"""The loop guard and the whole-character, whole-sentence ending of a cut-off summary."""

import time

import pytest

from processor.guards import REPLACEMENT_CHAR, guard_summary, loop_start

# Loops a 135M model wrote at the ADR's sampling (issue 18), and their kin.
LOOPS = [
    ("Paris is large [1]. No. No. No. No. No. No. No. No.", "Paris is large [1]. No."),
    ("The museum opens at nine [2]. It is free on Sundays. It is free on Sundays. It is free on Sundays. It is free",
     "The museum opens at nine [2]. It is free on Sundays."),
    ("A. The city is old. B is new. The city is old. C. The city is old. D.", "A. The city is old. B is new."),
    ("results show that results show that results show that results show that", "results show that"),
    ("서울은 크다 [1]. 서울은 크다 [1]. 서울은 크다 [1].", "서울은 크다 [1]."),
]
NOT_LOOPS = [
    "It was a very very very good year [1]. Sales grew; costs fell.",
    "Python 3.11 is faster [1]. Python 3.12 is faster still [2]. Python 3.13 adds a JIT [3].",
    "The result [1] says yes. The result [2] says no. The results disagree.",
    "ha ha ha ha",
]


@pytest.mark.parametrize("text, kept", LOOPS)
def test_a_loop_is_trimmed_to_before_its_first_repeat_and_flagged(text, kept):
    guarded = guard_summary(text, "length")
    assert guarded.text == kept
    assert guarded.loop_trimmed and guarded.trimmed_chars == len(text.strip()) - len(kept)


@pytest.mark.parametrize("text", NOT_LOOPS)
def test_ordinary_repetition_is_not_a_loop(text):
    assert loop_start(text) is None
    guarded = guard_summary(text, "stop")
    assert (guarded.text, guarded.loop_trimmed, guarded.trimmed_chars) == (text, False, 0)


def test_a_cut_off_summary_ends_on_its_last_whole_sentence_never_on_half_a_character():
    guarded = guard_summary("서울은 한국의 수도이다 [1]. 인구는 약 천만 명이\ufffd", "length")
    assert guarded.text == "서울은 한국의 수도이다 [1]." and guarded.cut_to_sentence and not guarded.loop_trimmed


def test_a_cut_off_summary_without_a_near_sentence_end_ends_on_a_whole_word():
    guarded = guard_summary("Short one. Then a long sentence that goes on and on about the topic without ever reachi", "length")
    assert guarded.text == "Short one. Then a long sentence that goes on and on about the topic without ever"
    assert not guarded.cut_to_sentence


def test_a_finished_summary_is_left_alone_but_never_ends_in_u_fffd():
    assert guard_summary("Fine as it is", "stop").text == "Fine as it is"
    assert guard_summary("끝" + REPLACEMENT_CHAR, "stop").text == "끝"
    assert guard_summary(REPLACEMENT_CHAR, "length").text == REPLACEMENT_CHAR  # nothing else to publish: never empty


def test_the_guard_is_cheap_on_a_summary_at_the_token_cap():
    # ~1,500 tokens of prose without a loop: the worst case (every period scanned to the end).
    text = " ".join(f"Finding {i} of study {i % 7} holds in region {i % 11} [{i % 9 + 1}]." for i in range(150))
    started = time.perf_counter()
    for _ in range(20):
        guard_summary(text, "length")
    assert (time.perf_counter() - started) / 20 < 0.01  # well under the ~10+ s such a summary took to generate


def test_transformers_engine_drops_the_tokens_of_a_half_character_at_the_cap(tiny_model_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer

    from processor.engines.transformers_engine import TransformersEngine
    from processor.events import validate_event
    from processor.prompt import PromptBuilder
    from processor.ops.samples import sample_events
    from processor.settings import load_settings

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.encode("Seoul 鬱", add_special_tokens=False)  # a character the tiny vocabulary spells in bytes
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith(REPLACEMENT_CHAR))

    class Model:
        generation_config = type("G", (), {"eos_token_id": tokenizer.eos_token_id})()

        def parameters(self):
            return iter([torch.nn.Parameter(torch.zeros(1))])

        def generate(self, input_ids, **_kwargs):
            return torch.cat([input_ids, torch.tensor([ids[:cut]] * input_ids.shape[0])], dim=1)

    engine = TransformersEngine(Model(), tokenizer, load_settings(engine="transformers", sampling_max_tokens=cut), "m")
    prompt = PromptBuilder(engine.tokenizer, 6144, cut).build(validate_event(sample_events()[0]))
    [generation] = engine.generate([prompt])
    assert generation.finish_reason == "length" and generation.completion_tokens == cut
    assert generation.text.strip() == "Seoul" and REPLACEMENT_CHAR not in generation.text


def _reference_loop_start(text):
    """The loop finder as first written (word by word), the oracle for the faster one."""
    import re

    word_re, end_re = re.compile(r"\w+"), re.compile(r"[.!?。！？]+[\"'”’)\]]*(?=\s|$)")
    words = [(m.group().lower(), m.start()) for m in word_re.finditer(text)]
    tokens = [w for w, _ in words]
    best = None
    for period in range(1, min(12, len(tokens) // 2) + 1):
        needed = ({1: 5, 2: 4}.get(period, 3) - 1) * period
        run = 0
        for index in range(period, len(tokens)):
            run = run + 1 if tokens[index] == tokens[index - period] else 0
            if run >= needed:
                best = index - run + 1 if best is None else min(best, index - run + 1)
                break
    found = None if best is None else words[best][1]
    seen, start, sentence = {}, 0, None
    for end in end_re.finditer(text):
        key = tuple(w.lower() for w in word_re.findall(text[start : end.end()]))
        if len(key) >= 2:
            offsets = seen.setdefault(key, [])
            piece = text[start : end.end()]
            offsets.append(start + len(piece) - len(piece.lstrip()))
            if len(offsets) >= 3:
                sentence = offsets[1]
                break
        start = end.end()
    candidates = [s for s in (found, sentence) if s is not None]
    return min(candidates) if candidates else None


def test_loop_start_matches_the_word_by_word_finder():
    many = " ".join(f"w{i}" for i in range(300))  # more distinct words than one byte each can name
    texts = [text for text, _ in LOOPS] + NOT_LOOPS + [
        many, many + " x y z x y z x y z", "x y z x y z x y z " + many, many + " a a a a a",
        "ΟΔΟΣ ΟΔΟΣ οδος οδοσ ΟΔΟΣ ΟΔΟΣ", "İstanbul i̇stanbul İstanbul i̇stanbul İstanbul",
        "Go. Go! GO? go. Fine.", "a b a b a b a b", "x a b a b a b a b c c c c c c", "a b a b a b a", "one two three one two three one two",
        "1 2 3 4 5 6 7 8 9 10 11 12 1 2 3 4 5 6 7 8 9 10 11 12 1 2 3 4 5 6 7 8 9 10 11 12",
        "Ünïcödé Ünïcödé Ünïcödé Ünïcödé Ünïcödé", "", "word",
        'He said "Go now." She said "Go now." He said "Go now." Then "go now!" Go, now?', "v3.11. v3.11! v3.11? v3.11",
        "Σοφός ΟΔΟΣ. σοφός οδος! ΣΟΦΌΣ ΟΔΟΣ?", "A b.c d. A b.c d. A b.c d.", "end. end. end. . . . x y. x y. x y.",
    ]
    for text in texts:
        assert loop_start(text) == _reference_loop_start(text), text
