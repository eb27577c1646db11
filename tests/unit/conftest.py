"""Fixtures shared by the unit tests of prompt building: the two tokenizer kinds a prompt is measured with."""

from __future__ import annotations

from typing import Any

import pytest

from processor.engines.extractive import RegexTokenizer
from processor.engines.hf_tokenizer import HFChatTokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Any) -> HFChatTokenizer:
    from transformers import AutoTokenizer

    return HFChatTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture(params=["hf", "regex"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("hf_tokenizer") if request.param == "hf" else RegexTokenizer()
