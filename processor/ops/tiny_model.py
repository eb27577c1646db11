"""Build a tiny Qwen2-architecture chat model with random weights and a tokenizer trained on the spot.

No model hub is reachable in CI or on air-gapped boxes, yet the Transformers engine must run for real in tests:
this makes a complete model directory (config, weights, tokenizer, chat template) in a second. Its output is
gibberish by design; everything around it — template, token counts, batching, padding — is the real path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

# Qwen2.5's ChatML template, without the tool-calling branches.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_chat_model(
    directory: Path,
    corpus: Iterable[str],
    vocab_size: int = 1024,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_position_embeddings: int = 8192,
    seed: int = 0,
    intermediate_size: int | None = None,
    model_vocab_size: int | None = None,
    dtype: str = "float32",
) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token=None))
    # Byte-level: every string, Korean and invalid input included, encodes without an unknown token.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # Its progress bars print blank lines where stdout is not a terminal, before anything the command says.
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    config = Qwen2Config(
        # A model vocabulary larger than the tokenizer's gives a real model's embedding and LM-head cost.
        vocab_size=max(model_vocab_size or 0, len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(directory)
    return directory


# Qwen2.5-0.5B-Instruct's architecture (its config.json), for benchmarks with random weights.
QWEN25_05B = {
    "hidden_size": 896,
    "layers": 24,
    "heads": 14,
    "kv_heads": 2,
    "intermediate_size": 4864,
    "model_vocab_size": 151936,
    "max_position_embeddings": 32768,
}


def sample_corpus() -> list[str]:
    """Text the tiny tokenizer learns from: the sample events (Korean and English) and the prompt template."""
    from processor.prompt import CONTENT_TEMPLATE, RESULT_TEMPLATE, SYSTEM_TEMPLATE, USER_TEMPLATE
    from processor.ops.samples import SAMPLE_EVENTS

    texts = [SYSTEM_TEMPLATE, USER_TEMPLATE, RESULT_TEMPLATE, CONTENT_TEMPLATE]
    for event in SAMPLE_EVENTS:
        texts.append(event["query"])
        for result in event["results"]:
            texts.extend(str(result[k]) for k in ("title", "url", "snippet", "content") if result.get(k))
    return texts * 3
