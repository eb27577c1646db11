"""vLLM engine benchmark: continuous feed vs micro-batches, on a real vLLM (engine level, no Kafka).

A random-weight model of Qwen2.5-0.5B-Instruct's architecture (bf16, its full 151,936-token vocabulary, with a
synthetic byte-level BPE tokenizer of exactly that size: a random model samples every id, and vLLM detokenises
each one), prompts of exactly 1,500 tokens rendered by the processor's PromptBuilder (so they share its system
prompt), and output lengths drawn long-tailed like real summaries (log-normal, median 268, clipped to
[16, 1536]), enforced per request with max_tokens and ignore_eos=True (VllmEngine.sampling_override; the
product path samples with the settings). Measures:
  (a) events/s, continuous (ContinuousFeed + VllmEngine.add_request/step) vs micro-batch (VllmEngine.generate
      per batch) at windows 22 and 64 (window = sequences in flight / batch size); target ≥ 1.5×;
  (c) the engine's idle share in each: wall time with no request in the engine, and unused sequence slots
      (1 − time-weighted requests in the engine / window) — the batch tail;
  (d) continuous mode with prefix caching on vs off (the shared system prompt);
  (e) continuous mode at the window the real KV budget gives (in_flight_budget), as a share of one generate()
      over all the same prompts (vLLM's offline ideal); aim ≥ 0.9.

    python bench/vllm_modes.py all --out DIR            # build the model, both parts, JSON + PNG (GPU host)
    python bench/vllm_modes.py build --model-dir DIR    # only the model
    python bench/vllm_modes.py build-7b --model-dir DIR [--awq] [--tokenizer-from DIR]   # 7B shape, no weights (dummy)
    python bench/vllm_modes.py part --part A|B ...      # one part in this process (A: prefix caching off)
    python bench/vllm_modes.py merge --out DIR          # parts' JSON → vllm_modes.json (+ PNG with matplotlib)
    python bench/vllm_modes.py all --fake --events 40   # CPU smoke run against the test double of vLLM 0.6.3

Each part runs in its own process: vLLM is started once per prefix-caching setting, and the parent never
touches CUDA (V1 measures free GPU memory when its engine core starts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT_TOKENS = 1500
MAX_NEW_TOKENS = 1536
MEDIAN_NEW_TOKENS = 268
SIGMA = 0.7  # log-normal spread: p90 ≈ 660, p99 ≈ 1,360 new tokens, the longest clipped at 1,536
WINDOWS = (22, 64)
QWEN25_05B = {"hidden_size": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate_size": 4864, "vocab": 151936}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------ the model
def build_tokenizer(directory: Path, vocab_size: int) -> Any:
    """A byte-level BPE tokenizer of exactly `vocab_size` ids: the 256 byte symbols, every pair of them, then
    triples, plus the ChatML special tokens. Any text (Korean too) encodes; every id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from processor.ops.tiny_model import CHATML_TEMPLATE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    target = vocab_size - len(SPECIAL_TOKENS)
    pairs = [a + b for a in alphabet for b in alphabet]
    for a in alphabet:
        for b in alphabet:
            if len(vocab) < target:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    index = 0
    while len(vocab) < target:
        pair, last = pairs[index // len(alphabet)], alphabet[index % len(alphabet)]
        index += 1
        vocab[pair + last] = len(vocab)
        merges.append((pair, last))
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_model(directory: Path, tiny: bool = False) -> Path:
    """Qwen2.5-0.5B-Instruct's architecture with random bf16 weights; vocab_size == len(tokenizer)."""
    if (directory / "config.json").exists() and (directory / "tokenizer.json").exists():
        log(f"model already built in {directory}")
        return directory
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    shape = dict(QWEN25_05B)
    if tiny:  # a CPU smoke run of the harness
        shape.update(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, vocab=70_000)
    tokenizer = build_tokenizer(directory, shape["vocab"])
    config = Qwen2Config(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    with torch.device(device):  # initialising 0.5B weights is much faster on the GPU
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[config.eos_token_id], pad_token_id=config.pad_token_id)
    model.save_pretrained(directory)
    log(f"built a random-weight model ({'toy' if tiny else 'Qwen2.5-0.5B architecture'}, vocab {shape['vocab']}) "
        f"in {time.perf_counter() - started:.1f} s")
    return directory


# Qwen2.5-7B-Instruct's shape (its config.json), the ADR's model; the vocabulary is the synthetic tokenizer's length.
QWEN25_7B = {"hidden_size": 3584, "layers": 28, "heads": 28, "kv_heads": 4, "intermediate_size": 18944,
             "vocab": QWEN25_05B["vocab"]}
# Qwen2.5-7B-Instruct-AWQ's quantization_config: 4-bit, group 128, zero point, GEMM layout.
AWQ_CONFIG = {"bits": 4, "group_size": 128, "modules_to_not_convert": None, "quant_method": "awq", "version": "gemm",
              "zero_point": True}


def build_7b_config(directory: Path, awq: bool = False, tokenizer_from: Path | None = None) -> Path:
    """A Qwen2.5-7B-architecture model folder with no weights (config, generation config, tokenizer): vLLM makes
    random ones from the config with load_format="dummy". bf16, or with AWQ's quantization_config (fp16
    activations, as the AWQ checkpoint). The tokenizer is copied from `tokenizer_from` (a folder `build` wrote)
    when given, else built."""
    import shutil

    if (directory / "config.json").exists() and (directory / "tokenizer.json").exists():
        log(f"7B-shape folder already in {directory}")
        return directory
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    shape = QWEN25_7B
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (tokenizer_from / name).exists():
                shutil.copy(tokenizer_from / name, directory / name)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        if len(tokenizer) != shape["vocab"]:
            raise SystemExit(f"{tokenizer_from}'s tokenizer has {len(tokenizer)} ids, not {shape['vocab']}")
    else:
        tokenizer = build_tokenizer(directory, shape["vocab"])
    eos, bos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"], "vocab_size": shape["vocab"], "max_position_embeddings": 32768,
        "max_window_layers": shape["layers"], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 131072,
        "use_sliding_window": False, "tie_word_embeddings": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float16" if awq else "bfloat16",
    }
    if awq:
        config["quantization_config"] = dict(AWQ_CONFIG)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": [eos], "pad_token_id": tokenizer.pad_token_id}, indent=2) + "\n")
    log(f"wrote a Qwen2.5-7B-architecture folder ({'AWQ 4-bit' if awq else 'bf16'}, no weights: load_format=dummy) "
        f"in {directory} in {time.perf_counter() - started:.1f} s")
    return directory


# ------------------------------------------------------------------------------------------ workload
def make_event(i: int, content: str) -> dict[str, Any]:
    return {
        "event_id": f"bench-{i:05d}",
        "query": f"why does kafka consumer lag grow under load, case {i}",
        "results": [
            {"rank": r, "title": f"Result {r} for {i}", "url": f"https://example.com/{i}/{r}",
             "snippet": f"Consumer lag grows when processing is slower than production, case {i}.",
             "content": f"{i}.{r} " + content}
            for r in range(1, 5)
        ],
        "collected_at": datetime(2026, 11, 1, tzinfo=timezone.utc),
        "language": "en",
    }


def make_prompts(tokenizer: Any, count: int, length: int, salt: str = "") -> list[Any]:
    """`count` prompts of exactly `length` tokens, rendered by the processor's PromptBuilder: they share its system
    prompt and nothing after the query. `salt` makes a run's prompts its own, so that with prefix caching on a
    run never finds whole prompts cached by an earlier run (each event's results are new in production)."""
    from processor.events import validate_event
    from processor.prompt import PromptBuilder

    builder = PromptBuilder(tokenizer, 1_000_000, 1)
    unit = "Consumer lag grows when processing is slower than production; batching on the GPU closes the gap. "
    lo, hi = 0, 200
    while lo < hi:  # repetitions of `unit` per result that give at least `length` tokens
        mid = (lo + hi) // 2
        if builder.build(validate_event(make_event(0, unit * mid))).prompt_tokens < length:
            lo = mid + 1
        else:
            hi = mid
    prompts = []
    for i in range(count):
        prompt = builder.build(validate_event(make_event(i, f"{salt} " + unit * lo)))
        ids = list(prompt.token_ids)
        # Cut in the results (never the system prompt); the chat's closing tokens stay at the end.
        ids = ids[: length - 8] + ids[-8:] if len(ids) >= length else (ids * 2)[:length]
        prompts.append(replace(prompt, token_ids=tuple(ids)))
    return prompts


def output_lengths(prompts: list[Any], seed: int = 20261125) -> dict[str, int]:
    rng = random.Random(seed)
    return {
        p.event.event_id: max(16, min(MAX_NEW_TOKENS, round(MEDIAN_NEW_TOKENS * math.exp(rng.gauss(0.0, SIGMA)))))
        for p in prompts
    }


# ------------------------------------------------------------------------------------------ measuring
class StepProbe:
    """Wraps llm.llm_engine.add_request/step (instance attributes: LLM.generate calls them too) and records, for
    every step, its start and end and how many requests the engine held (added, not yet seen finished)."""

    def __init__(self, llm_engine: Any) -> None:
        self.live = 0
        self.samples: list[tuple[float, float, int]] = []
        step, add = llm_engine.step, llm_engine.add_request

        def probed_add(*args: Any, **kwargs: Any) -> Any:
            result = add(*args, **kwargs)
            self.live += 1
            return result

        def probed_step() -> Any:
            started = time.perf_counter()
            outputs = step()
            self.samples.append((started, time.perf_counter(), self.live))
            self.live -= sum(1 for o in outputs if o.finished)
            return outputs

        llm_engine.add_request, llm_engine.step = probed_add, probed_step

    def summary(self, start: float, end: float, window: int) -> dict[str, Any]:
        """Idle shares over [start, end]: each step's interval runs from the previous step's end."""
        samples = [s for s in self.samples if start <= s[0] and s[1] <= end]
        total = end - start
        previous, idle, slots = start, 0.0, 0.0
        for _, finished_at, live in samples:
            span = finished_at - previous
            if live == 0:
                idle += span
            slots += min(live, window) * span
            previous = finished_at
        idle += end - previous
        return {
            "steps": len(samples),
            "engine_idle_share": round(idle / total, 4) if total > 0 else 0.0,
            "slot_idle_share": round(1 - slots / (window * total), 4) if total > 0 else 0.0,
            "mean_requests_in_engine": round(slots / total, 2) if total > 0 else 0.0,
            "mean_step_ms": round(1000 * statistics.mean(b - a for a, b, _ in samples), 3) if samples else None,
        }


def synchronize() -> None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except ImportError:
        pass


def record(name: str, prompts: list[Any], outcomes: dict[str, Any], lengths: dict[str, int], seconds: float,
           probe: StepProbe, start: float, end: float, window: int, **extra: Any) -> dict[str, Any]:
    from processor.engines.base import Generation

    generated = [o for o in outcomes.values() if isinstance(o, Generation)]
    failures = {k: f"{type(o).__name__}: {o}" for k, o in outcomes.items() if not isinstance(o, Generation)}
    tokens = sum(o.completion_tokens for o in generated)
    wanted = sum(lengths[p.event.event_id] for p in prompts)
    row = {
        "run": name, "window": window, "events": len(prompts), "seconds": round(seconds, 3),
        "events_per_s": round(len(prompts) / seconds, 3), "completion_tokens": tokens,
        "completion_tokens_requested": wanted, "tokens_per_s": round(tokens / seconds, 1),
        "failed": len(failures), **probe.summary(start, end, window), **extra,
    }
    if failures:
        row["failures_sample"] = dict(list(failures.items())[:3])
    log(f"  {name:<34} window {window:>4}: {len(prompts)} events in {seconds:8.2f} s = {row['events_per_s']:7.3f} events/s, "
        f"{row['tokens_per_s']:9.1f} tokens/s; engine idle {100 * row['engine_idle_share']:5.2f} %, "
        f"slots idle {100 * row['slot_idle_share']:5.1f} %, {row['steps']} steps, {row['mean_step_ms']} ms/step"
        + (f"; {len(failures)} FAILED" if failures else ""))
    return row


def run_micro_batch(engine: Any, probe: StepProbe, prompts: list[Any], lengths: dict[str, int], window: int,
                    name: str = "micro_batch") -> dict[str, Any]:
    synchronize()
    start = time.perf_counter()
    outcomes: dict[str, Any] = {}
    for i in range(0, len(prompts), window):
        batch = prompts[i : i + window]
        outcomes.update({p.event.event_id: o for p, o in zip(batch, engine.generate(batch))})
    synchronize()
    end = time.perf_counter()
    slots = min(window, engine.settings.vllm_max_num_seqs)  # vLLM runs at most max_num_seqs of a batch at once
    return record(name, prompts, outcomes, lengths, end - start, probe, start, end, slots, mode="micro_batch",
                  batch=window)


def run_continuous(engine: Any, probe: StepProbe, prompts: list[Any], lengths: dict[str, int], budget: Any,
                   name: str = "continuous", window: int | None = None, refill_min: int = 1,
                   poll_sleep: float | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """The feed on its own thread; this (main) thread collects outcomes: woken by the feed (wait), or, with
    `poll_sleep`, sleeping that long between collections (never woken: isolates the cost of the wake-ups)."""
    from processor.continuous import ContinuousFeed

    feed = ContinuousFeed(engine, budget=budget, max_new_tokens=MAX_NEW_TOKENS, refill_min=refill_min)
    try:
        synchronize()
        start = time.perf_counter()
        with feed._cond:  # hand everything over at once; the feed admits by its budget
            for prompt in prompts:
                feed.submit(prompt.event.event_id, prompt)
        outcomes: dict[str, Any] = {}
        max_in_flight = 0
        while len(outcomes) < len(prompts):
            if feed.failure is not None:
                raise RuntimeError(f"the engine failed: {feed.failure!r}")
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"{len(outcomes)} of {len(prompts)} finished after {timeout} s")
            if poll_sleep is None:
                feed.wait(0.5)
            else:
                time.sleep(poll_sleep)
            max_in_flight = max(max_in_flight, feed.in_flight)
            outcomes.update({f.request_id: f.outcome for f in feed.take_finished()})
        synchronize()
        end = time.perf_counter()
        if poll_sleep is not None and probe.samples:  # not the sleep's granularity: when the last step ended
            end = min(end, max(end_ for _, end_, _ in probe.samples))
        busy, idle = feed.busy_seconds, feed.idle_seconds
    finally:
        feed.close()
    return record(name, prompts, outcomes, lengths, end - start, probe, start, end, window or budget.max_sequences,
                  mode="continuous", refill_min=refill_min, feed_busy_seconds=round(busy, 3), feed_idle_seconds=round(idle, 3),
                  max_in_flight_seen=max_in_flight, kv_tokens_budget=budget.kv_tokens, poll_sleep=poll_sleep)


def run_streaming_main_thread(engine: Any, probe: StepProbe, prompts: list[Any], lengths: dict[str, int],
                              window: int, name: str = "streaming_main_thread") -> dict[str, Any]:
    """The engine API with no feed and no second thread: add every request, step on this thread until done
    (vLLM queues what exceeds max_num_seqs itself, like generate())."""
    synchronize()
    start = time.perf_counter()
    for prompt in prompts:
        engine.add_request(prompt.event.event_id, prompt)
    outcomes: dict[str, Any] = {}
    while engine.has_unfinished():
        outcomes.update({f.request_id: f.outcome for f in engine.step()})
    synchronize()
    end = time.perf_counter()
    return record(name, prompts, outcomes, lengths, end - start, probe, start, end, window, mode="streaming")


# ------------------------------------------------------------------------------------------ parts
def settings_for(model_dir: Path, prefix_caching: bool, max_num_seqs: int) -> Any:
    from processor.settings import load_settings

    return load_settings(
        engine="vllm", vllm_model=str(model_dir), vllm_quantization="", sampling_max_tokens=MAX_NEW_TOKENS,
        vllm_max_model_len=PROMPT_TOKENS + MAX_NEW_TOKENS + 128, vllm_enable_prefix_caching=prefix_caching,
        vllm_max_num_seqs=max_num_seqs, vllm_gpu_memory_utilization=0.90, log_format="text",
    )


def run_part(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.fake:
        sys.path.insert(0, str(ROOT / "tests" / "fakes" / "vllm063"))
    from processor.engines.base import InFlightBudget
    from processor.engines.vllm_engine import VllmEngine

    prefix_caching = args.part == "B"
    settings = settings_for(Path(args.model_dir), prefix_caching, args.max_num_seqs)
    started = time.perf_counter()
    factory: Callable[..., Any] | None = None
    if args.fake:
        import vllm

        factory = lambda **kw: vllm.LLM(**kw, num_gpu_blocks_override=args.fake_blocks)  # noqa: E731
    engine = VllmEngine.from_settings(settings, llm_factory=factory)
    startup = time.perf_counter() - started
    import vllm

    version = getattr(vllm, "__version__", "?")
    log(f"part {args.part}: vLLM {version} started in {startup:.1f} s (prefix caching {'on' if prefix_caching else 'off'})")
    budget = engine.in_flight_budget()
    if budget is None:
        raise SystemExit("vLLM reported no KV cache size")
    cost = budget.request_tokens(PROMPT_TOKENS, MAX_NEW_TOKENS)
    budget_window = max(1, min(budget.max_sequences, budget.kv_tokens // cost))
    log(f"in-flight budget: {budget.max_sequences} sequences, {budget.kv_tokens:,} KV tokens (block {budget.block_size}); "
        f"a request reserves {cost} → window {budget_window}")

    prompts = make_prompts(engine.tokenizer, args.events, PROMPT_TOKENS)
    lengths = output_lengths(prompts)
    engine.sampling_override = lambda p: {"max_tokens": lengths[p.event.event_id], "ignore_eos": True}
    probe = StepProbe(engine.llm.llm_engine)
    values = sorted(lengths.values())
    log(f"{len(prompts)} prompts of {prompts[0].prompt_tokens} tokens; new tokens median {statistics.median(values):.0f}, "
        f"mean {statistics.mean(values):.0f}, p90 {values[int(0.9 * len(values))]}, max {values[-1]}, total {sum(values):,}")

    # Warm-up outside the timed runs: CUDA graphs, allocator, Triton kernels JIT-compiled on first use (vLLM logs
    # them), for both paths and the shapes they meet: batched prefills (generate) and single refills mixed into
    # decode steps of up to 64 sequences (continuous).
    warm = [replace(p, event=p.event.model_copy(update={"event_id": f"warm-{i}"}))
            for i, p in enumerate(make_prompts(engine.tokenizer, min(96, args.events), PROMPT_TOKENS, salt="warm-up"))]
    for i, p in enumerate(warm):
        lengths[p.event.event_id] = 16 + (i * 7) % 48
    engine.generate(warm[:22])
    run_continuous(engine, probe, warm, lengths, InFlightBudget(64, budget.kv_tokens, budget.block_size), name="warm-up")

    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        part = {
            "part": args.part, "prefix_caching": prefix_caching, "vllm": version, "fake": args.fake,
            "startup_seconds": round(startup, 1),
            "budget": {"max_sequences": budget.max_sequences, "kv_tokens": budget.kv_tokens, "block_size": budget.block_size,
                       "request_reserve_tokens": cost, "window": budget_window},
            "lengths": {"median": statistics.median(values), "mean": round(statistics.mean(values), 1),
                        "p90": values[int(0.9 * len(values))], "max": values[-1], "total": sum(values)},
            "rows": rows,
        }
        (out / f"vllm_modes_part{args.part}.json").write_text(json.dumps(part, indent=2) + "\n")

    deadline = started + args.budget_s

    def windowed(w: int) -> Any:
        return InFlightBudget(w, budget.kv_tokens, budget.block_size)

    made = [0]

    def fresh(tag: str) -> list[Any]:  # the same events and output lengths, results text of this run's own
        made[0] += 1
        return make_prompts(engine.tokenizer, args.events, PROMPT_TOKENS, salt=f"{args.part}-{tag}-{made[0]}")

    def cont(name: str, w: int, refill: int = 1) -> Callable[[], dict[str, Any]]:
        return lambda: run_continuous(engine, probe, fresh(f"{name}{w}"), lengths, windowed(w), name=name, refill_min=refill)

    def micro(name: str, w: int) -> Callable[[], dict[str, Any]]:
        return lambda: run_micro_batch(engine, probe, fresh(f"{name}{w}"), lengths, w, name=name)

    at_budget = lambda: run_continuous(  # noqa: E731
        engine, probe, fresh("budget"), lengths, budget, name="continuous_at_budget", window=budget_window)
    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if args.part == "A":
        for window in WINDOWS:  # (a), (c): the product default, refill as soon as anything finishes
            plan += [(f"continuous w{window}", cont("continuous", window)), (f"micro_batch w{window}", micro("micro_batch", window))]
        plan += [("continuous at budget", at_budget),  # (e)
                 ("one generate()", micro("one_generate_all", len(prompts)))]
        for window in WINDOWS:  # refills grouped (the feed's refill_min), to price V1's per-prefill step
            plan.append((f"continuous w{window} refill {window // 8}", cont("continuous_refill_group", window, window // 8)))
        plan += [("continuous w64 again", cont("continuous_again", 64)), ("micro_batch w64 again", micro("micro_batch_again", 64))]
    elif args.part == "E":  # (e) again, alternating, with the feed's threading taken apart
        slots = min(len(prompts), budget.max_sequences)
        variants = [
            ("one generate()", lambda: run_micro_batch(engine, probe, fresh("g"), lengths, len(prompts), name="one_generate_all")),
            ("continuous at budget", lambda: run_continuous(engine, probe, fresh("c"), lengths, budget,
                                                             name="continuous_at_budget", window=budget_window)),
            ("continuous at budget, main thread sleeping", lambda: run_continuous(
                engine, probe, fresh("s"), lengths, budget, name="continuous_at_budget_poll_sleep", window=budget_window,
                poll_sleep=0.2)),
            ("engine API on the main thread", lambda: run_streaming_main_thread(engine, probe, fresh("m"), lengths, slots)),
        ]
        plan += variants + variants[::-1]
    else:  # (d) prefix caching on: the same continuous runs as part A
        plan += [("continuous w64", cont("continuous", 64)), ("continuous at budget", at_budget),
                 ("continuous w64 refill 8", cont("continuous_refill_group", 64, 8)), ("continuous w64 again", cont("continuous_again", 64))]
    for label, run in plan:
        if time.perf_counter() > deadline:
            log(f"skipped {label}: past this part's time budget ({args.budget_s} s)")
            continue
        row = run()
        row["prefix_caching"] = prefix_caching
        rows.append(row)
        save()
    save()
    engine.close()
    log(f"part {args.part} done in {time.perf_counter() - started:.1f} s")
    return 0


# ------------------------------------------------------------------------------------------ merge, plot
def find(rows: list[dict[str, Any]], run: str, window: int | None = None) -> dict[str, Any] | None:
    return next((r for r in rows if r["run"] == run and (window is None or r["window"] == window)), None)


def merge(out: Path, host: dict[str, Any]) -> dict[str, Any]:
    parts = {p: json.loads((out / f"vllm_modes_part{p}.json").read_text()) for p in "ABE" if (out / f"vllm_modes_part{p}.json").exists()}
    a, b = parts.get("A"), parts.get("B")
    result: dict[str, Any] = {"host": host, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "parts": parts}
    summary: dict[str, Any] = {}

    def ratio(x: dict[str, Any] | None, y: dict[str, Any] | None) -> float | None:
        return round(x["events_per_s"] / y["events_per_s"], 3) if x and y else None

    if a:
        rows = a["rows"]
        for window in WINDOWS:
            c, m = find(rows, "continuous", window), find(rows, "micro_batch", window)
            if c and m:
                summary[f"a_speedup_continuous_vs_micro_batch_w{window}"] = ratio(c, m)
                summary[f"c_engine_idle_share_w{window}"] = {"continuous": c["engine_idle_share"], "micro_batch": m["engine_idle_share"]}
                summary[f"c_slot_idle_share_w{window}"] = {"continuous": c["slot_idle_share"], "micro_batch": m["slot_idle_share"]}
            g = find(rows, "continuous_refill_group", window)
            if g and m:
                summary[f"a_speedup_continuous_refill_{g['refill_min']}_vs_micro_batch_w{window}"] = ratio(g, m)
        again_c, again_m = find(rows, "continuous_again", 64), find(rows, "micro_batch_again", 64)
        if again_c and again_m:
            summary["a_speedup_continuous_vs_micro_batch_w64_again"] = ratio(again_c, again_m)
        at_budget, ideal = find(rows, "continuous_at_budget"), find(rows, "one_generate_all")
        if at_budget and ideal:
            summary["e_continuous_at_budget_share_of_one_generate"] = ratio(at_budget, ideal)
            summary["e_budget_window"] = at_budget["window"]
    if a and b:
        for run, window in (("continuous", 64), ("continuous_again", 64), ("continuous_refill_group", 64), ("continuous_at_budget", None)):
            off, on = find(a["rows"], run, window), find(b["rows"], run, window)
            if off and on:
                summary[f"d_prefix_caching_on_vs_off_{run}{'_w' + str(window) if window else ''}"] = ratio(on, off)
    if "E" in parts:  # (e) repeated, alternating: events/s of each variant, in run order
        repeated: dict[str, list[float]] = {}
        for row in parts["E"]["rows"]:
            repeated.setdefault(row["run"], []).append(row["events_per_s"])
        summary["e_repeated_events_per_s"] = repeated
        ideal = statistics.mean(repeated.get("one_generate_all", [0])) or None
        if ideal:
            summary["e_repeated_share_of_one_generate"] = {
                run: round(statistics.mean(values) / ideal, 3) for run, values in repeated.items() if run != "one_generate_all"
            }
    result["summary"] = summary
    (out / "vllm_modes.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed here: no PNG (run `merge` where it is)")
        return False
    a = result["parts"].get("A")
    b = result["parts"].get("B")
    if not a:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.4), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    # (a) events/s per window: micro-batch, continuous (refill at once), continuous (refills grouped)
    ax = axes[0]
    series = [("micro_batch", "micro-batch: generate() per batch", "#999"),
              ("continuous", "continuous: refill as each finishes", "#2a7"),
              ("continuous_refill_group", "continuous: refill window/8 at a time", "#7c5")]
    for k, (run, label, color) in enumerate(series):
        values = [(find(a["rows"], run, w) or {}).get("events_per_s", 0.0) for w in WINDOWS]
        bars = ax.bar([i + (k - 1) * 0.27 for i in range(len(WINDOWS))], values, 0.27, label=label, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(WINDOWS)), [f"window {w}" for w in WINDOWS])
    ax.set_ylabel("events/s")
    speedups = ", ".join(f"w{w} {result['summary'].get(f'a_speedup_continuous_vs_micro_batch_w{w}')}x" for w in WINDOWS)
    ax.set_title(f"(a) continuous / micro-batch: {speedups}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    # (c) idle shares
    ax = axes[1]
    names, engine_idle, slot_idle = [], [], []
    for window in WINDOWS:
        for run, short in (("micro_batch", "micro"), ("continuous", "cont."), ("continuous_refill_group", "cont. grouped")):
            row = find(a["rows"], run, window)
            if row:
                names.append(f"{short}\n{window}")
                engine_idle.append(100 * row["engine_idle_share"])
                slot_idle.append(100 * row["slot_idle_share"])
    x = range(len(names))
    bars = ax.bar([i - 0.2 for i in x], engine_idle, 0.4, label="engine idle: no request in it", color="#c55")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    bars = ax.bar([i + 0.2 for i in x], slot_idle, 0.4, label="sequence slots idle (batch tail)", color="#e9a")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("% of wall time")
    ax.set_title("(c) engine idle share", fontsize=10)
    ax.legend(fontsize=8)
    # (d) prefix caching off/on; (e) the budget window against one generate()
    ax = axes[2]
    names, values, colors = [], [], []
    for run, window, label in (("continuous", 64, "cont. 64"), ("continuous_again", 64, "cont. 64\nagain"),
                               ("continuous_at_budget", None, "cont. at\nbudget")):
        for part, tag, color in ((a, "off", "#2a7"), (b, "on", "#27a")):
            row = find(part["rows"], run, window) if part else None
            if row:
                names.append(f"{label}\nprefix {tag}")
                values.append(row["events_per_s"])
                colors.append(color)
    ideal = find(a["rows"], "one_generate_all")
    if ideal:
        names.append("one\ngenerate()\nprefix off")
        values.append(ideal["events_per_s"])
        colors.append("#555")
    repeated = result["summary"].get("e_repeated_events_per_s", {})
    for run, label, color in (("one_generate_all", "one\ngenerate()\n(E, mean)", "#555"),
                              ("continuous_at_budget", "cont. at\nbudget\n(E, mean)", "#2a7")):
        if repeated.get(run):
            names.append(label)
            values.append(statistics.mean(repeated[run]))
            colors.append(color)
    bars = ax.bar(range(len(names)), values, color=colors)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel("events/s")
    share = result["summary"].get("e_continuous_at_budget_share_of_one_generate")
    window = result["summary"].get("e_budget_window")
    shares = result["summary"].get("e_repeated_share_of_one_generate", {})
    again = f"; alternating (E): {shares['continuous_at_budget']}x" if "continuous_at_budget" in shares else ""
    ax.set_title(f"(d) prefix caching; (e) window {window}: {share}x one generate(){again}", fontsize=9)
    host = result["host"]
    lengths = a["lengths"]
    fig.suptitle(
        f"vLLM {a['vllm']} on {str(host.get('device')).split(',')[0]}: random-weight Qwen2.5-0.5B architecture, {PROMPT_TOKENS}-token "
        f"prompts, {lengths['total'] // 1000}k new tokens (median {lengths['median']:.0f}, max {lengths['max']}) over "
        f"{a['rows'][0]['events']} events", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        from importlib import metadata

        for name in ("vllm", "torch", "transformers", "tokenizers"):
            try:
                info[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                info[name] = None
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        info["device"] = out or "cpu"
    except (OSError, subprocess.SubprocessError):
        info["device"] = "cpu"
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["all", "build", "build-7b", "part", "merge"])
    parser.add_argument("--awq", action="store_true", help="build-7b: with AWQ's quantization_config (4-bit, group 128)")
    parser.add_argument("--tokenizer-from", help="build-7b: copy the tokenizer from this folder (one `build` wrote)")
    parser.add_argument("--part", choices=["A", "B", "E"], default="A")
    parser.add_argument("--parts", default="AB", help="for `all`: which parts to run")
    parser.add_argument("--model-dir", default="/tmp/qwen25-05b-random-full-vocab")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--events", type=int, default=320)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--budget-s", type=float, default=540.0, help="a part skips what would start after this")
    parser.add_argument("--fake", action="store_true", help="the vLLM 0.6.3 test double and a toy model (CPU smoke run)")
    parser.add_argument("--fake-blocks", type=int, default=4000)
    args = parser.parse_args()
    out = Path(args.out)
    if args.command == "build":
        build_model(Path(args.model_dir), tiny=args.fake)
        return 0
    if args.command == "build-7b":
        build_7b_config(Path(args.model_dir), awq=args.awq, tokenizer_from=Path(args.tokenizer_from) if args.tokenizer_from else None)
        return 0
    if args.command == "part":
        return run_part(args)
    if args.command == "all":
        me = [sys.executable, str(Path(__file__).resolve())]
        common = ["--model-dir", args.model_dir, "--out", str(out), "--events", str(args.events),
                  "--max-num-seqs", str(args.max_num_seqs), "--budget-s", str(args.budget_s)]
        fake = ["--fake", "--fake-blocks", str(args.fake_blocks)] if args.fake else []
        subprocess.run(me + ["build", *common, *fake], check=True)
        for part in args.parts:
            subprocess.run(me + ["part", "--part", part, *common, *fake], check=True)
    host = host_info()
    previous = out / "vllm_modes.json"
    if host.get("device") == "cpu" and previous.exists():  # merging here what a GPU host measured: keep its host
        host = json.loads(previous.read_text()).get("host", host)
    result = merge(out, host)
    log("summary: " + json.dumps(result["summary"], indent=1))
    if plot(result, out / "vllm_modes.png"):
        log(f"written {out / 'vllm_modes.json'} and {out / 'vllm_modes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
