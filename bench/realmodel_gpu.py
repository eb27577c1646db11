"""A real model's summaries on the GPU: the quality shares with and without the guards (issue 18, part 7).

The full processor (a Worker on the embedded broker, ENGINE=vllm) summarises the real-text corpus (bench/corpus.py,
600 events) with SmolLM2-135M-Instruct at the ADR's sampling (temperature 0.7, top_p 0.9, max_tokens 1,536), in
both generation modes and these configurations:
  adr     the ADR's sampling; the guards trim a loop and tidy a cut-off end after the fact, and flag them (always on);
  abort   + CONTINUOUS_LOOP_CHECK_TOKENS (default 32): every that many new tokens a request's text is checked, and a
          looping request is aborted there (finish_reason loop), its GPU time returned to the others. Continuous mode
          only: micro-batch mode runs one generate() per batch and cannot stop one request of it, so it is not run;
  rep1.1  + SAMPLING_REPETITION_PENALTY=1.1 (vLLM's repetition_penalty, which also penalises the prompt's tokens).
Each run's summaries are read back from its output topic and scored as `python -m processor quality` scores them
(processor/quality.py's report, whose text is kept in the results): cut off by the cap, loop trimmed, citing no
result, citing an absent result, language mismatch, prompt echoed, grounded share median; the completion-token
distribution, events/s and completion tokens/s of the processor (first record consumed → last one committed).
vLLM starts ONCE: every (mode, config) runs a VllmEngine made on the same LLM object with that config's settings.
Writes bench/results/realmodel-gpu.json and .png; the last printed line is one JSON object.

    bash bench/device_run.sh bench/realmodel_gpu.py --model DIR        # the H200 (vLLM 0.24): ≈ 4–6 minutes
    .venv/bin/python bench/realmodel_gpu.py --fake --events 12         # CPU smoke run: vLLM 0.6.3's test double
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.io_bench import TimingMetrics  # noqa: E402
from processor.quality import report  # noqa: E402

DEFAULT_MODEL = "/root/.cache/ai-worker/models/SmolLM2-135M-Instruct"
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
LOOP_CHECK_TOKENS = 32
CONFIGS: dict[str, dict[str, Any]] = {
    "adr": {},
    "rep1.1": {"sampling_repetition_penalty": 1.1},
    "abort": {"continuous_loop_check_tokens": LOOP_CHECK_TOKENS},  # last: the first GPU run of DELTA streaming
}
CONTINUOUS_ONLY = {"abort"}
SHARES = ("cut_off", "loop_trimmed", "cite_none", "citations_out_of_range", "language_mismatch", "prompt_echo")
_WORD = re.compile(r"\w+")


# ------------------------------------------------------------------------------------------ scoring
def percentile(values: list[float], share: float) -> float:
    """Nearest rank, as `python -m processor quality` reports its p50/p90 (processor/quality.py)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def repeats_a_4gram(text: str, times: int = 3) -> bool:
    """Some 4-word sequence occurs `times` times or more: issue 18's measure of a looping summary (69 % before)."""
    words = [w.lower() for w in _WORD.findall(text)]
    counts = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    return bool(counts) and max(counts.values()) >= times


def quality_shares(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures `python -m processor quality` prints, as numbers: the same definitions and denominators (a share
    of all summaries for what the record itself says, of those with schema v3's signals for the signals)."""
    total = len(summaries)
    quality = [s["quality"] for s in summaries if s.get("quality")]
    measured = len(quality)

    def share(count: int, of: int) -> float | None:
        return round(count / of, 4) if of else None

    tokens = [float(s.get("completion_tokens", 0)) for s in summaries]
    grounded = [float(q["grounded_share"]) for q in quality]
    reasons = Counter(str(s.get("finish_reason")) for s in summaries)
    return {
        "summaries": total,
        "with_signals": measured,
        "cut_off": share(sum(s.get("finish_reason") == "length" for s in summaries), total),
        "loop_trimmed": share(sum(bool(q["loop_trimmed"]) for q in quality), measured),
        "cite_none": share(sum(not s.get("citations") for s in summaries), total),
        "citations_out_of_range": share(sum(q["citations_out_of_range"] > 0 for q in quality), measured),
        "language_mismatch": share(sum(bool(q["language_mismatch"]) for q in quality), measured),
        "prompt_echo": share(sum(bool(q.get("prompt_echo")) for q in quality), measured),
        "grounded_share_median": percentile(grounded, 0.5) if grounded else None,
        "grounded_share_p10": percentile(grounded, 0.1) if grounded else None,
        # Not in the quality command: issue 18's loop measure, on the text as published (after the guard's trim).
        "repeats_a_4gram_3x_published": share(sum(repeats_a_4gram(str(s.get("summary", ""))) for s in summaries), total),
        "finish_reasons": dict(sorted(reasons.items())),
        "completion_tokens": {"p50": percentile(tokens, 0.5), "p90": percentile(tokens, 0.9), "max": max(tokens, default=0.0),
                              "total": sum(tokens)},
    }


# ------------------------------------------------------------------------------------------ one run
def run_processor(engine: Any, settings_overrides: dict[str, Any], events: list[dict[str, Any]],
                  limit_s: float) -> dict[str, Any]:
    """The full processor on `events` (embedded broker, fresh topics), then its summaries read back and scored."""
    from processor.loop import Worker
    from processor.ops.broker import EmbeddedBroker, ensure_topics
    from processor.ops.tools import produce_events, read_topic
    from processor.settings import load_settings

    tag = uuid.uuid4().hex[:6]
    topics = {"in": f"rm-in-{tag}", "out": f"rm-out-{tag}", "dlq": f"rm-dlq-{tag}"}
    with EmbeddedBroker() as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        ensure_topics(broker.bootstrap, {topics["in"]: 4, topics["out"]: 4, topics["dlq"]: 1})
        produce_events(conf, topics["in"], events)
        settings = load_settings(
            kafka_bootstrap_servers=broker.bootstrap, kafka_input_topic=topics["in"], kafka_output_topic=topics["out"],
            kafka_dlq_topic=topics["dlq"], kafka_group_id=f"rm-{tag}", log_format="text", log_level="WARNING",
            **settings_overrides,
        )
        metrics = TimingMetrics()  # its first_consumed starts the processor's clock
        worker = Worker(settings, engine, consumer_overrides=FAST_GROUP, metrics=metrics)
        started = time.perf_counter()
        exit_code = worker.run(until=lambda: worker.records_committed >= len(events) or time.perf_counter() - started > limit_s)
        ended = time.perf_counter()
        committed = worker.records_committed
        dead = {s.labels["reason"]: int(s.value) for s in metrics.dead_letters.collect()[0].samples if s.name.endswith("_total")}
        # Every committed event is a summary or a dead letter: stop reading at the last summary, not after idling.
        expected = max(1, len(events) - sum(dead.values()))
        summaries = list(read_topic(conf, topics["out"], max_records=expected, idle_timeout_s=5.0))
    seconds = ended - (metrics.first_consumed or started)
    shares = quality_shares(summaries)
    return {
        "events": len(events), "committed": committed, "timed_out": committed < len(events), "worker_exit_code": exit_code,
        "summaries_read": len(summaries), "dead_letters": dead,
        "processor_seconds": round(seconds, 3),
        "events_per_s": round(len(summaries) / seconds, 3) if seconds > 0 else None,
        "completion_tokens_per_s": round(shares["completion_tokens"]["total"] / seconds, 1) if seconds > 0 else None,
        "quality": shares,
        "report": report(summaries, worst=3),
    }


# ------------------------------------------------------------------------------------------ engine
def load_engine(args: argparse.Namespace) -> tuple[Any, Callable[[dict[str, Any]], Any], str]:
    """vLLM started once; returns it, a maker of a VllmEngine on the same LLM for a config's settings, and the device."""
    if args.fake:
        sys.path.insert(0, str(ROOT / "tests" / "fakes" / "vllm063"))
    from processor.engines.vllm_engine import VllmEngine
    from processor.settings import load_settings

    factory = None
    if args.fake:
        import vllm

        factory = lambda **kw: vllm.LLM(**kw, num_gpu_blocks_override=args.fake_blocks)  # noqa: E731
    base = VllmEngine.from_settings(load_settings(**engine_overrides(args, {})), llm_factory=factory)
    device = "cpu (vLLM test double)" if args.fake else "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass

    if args.fake_loop:
        # The double's requests added one by one repeat these ids (a model in a loop) until max_tokens.
        base.llm.loop_ids = base.llm.get_tokenizer().encode(" No.", add_special_tokens=False)

    def make(config: dict[str, Any]) -> Any:
        # The config's sampling and loop check are read from its settings by the engine; the model stays loaded.
        engine = VllmEngine(base.llm, base.vllm, load_settings(**engine_overrides(args, config)))
        if args.fake_loop:
            engine.sampling_override = lambda prompt: {"ignore_eos": True}
        return engine

    return base, make, device


def engine_overrides(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    return {"engine": "vllm", "vllm_model": args.model, "vllm_quantization": "", "sampling_temperature": 0.7,
            "sampling_top_p": 0.9, "sampling_max_tokens": args.max_tokens, "seed": args.seed, **config}


# ------------------------------------------------------------------------------------------ output
def plot(result: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no PNG"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = [f"{r['mode']}\n{r['config']}" for r in runs]
    names = [*SHARES, "grounded_share_median"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [r["quality"][name] or 0.0 for r in runs]
        left.bar([x + i * width for x in range(len(runs))], values, width, label=name.replace("_", " "))
    left.set_xticks([x + 0.4 - width / 2 for x in range(len(runs))], labels, fontsize=8)
    left.set_ylim(0, 1.2)  # room for the legend above a share of 1
    left.set_ylabel("share of summaries (grounded: median share)")
    left.legend(fontsize=7, ncol=4, loc="upper center")
    left.set_title(f"quality shares, {result['events']} real-text events, temperature 0.7, top_p 0.9, "
                   f"max_tokens {result['max_tokens']}")
    p50 = [r["quality"]["completion_tokens"]["p50"] for r in runs]
    p90 = [r["quality"]["completion_tokens"]["p90"] for r in runs]
    right.bar([x - 0.2 for x in range(len(runs))], p50, 0.4, label="p50")
    right.bar([x + 0.2 for x in range(len(runs))], p90, 0.4, label="p90")
    for x, r in enumerate(runs):
        right.annotate(f"{r['events_per_s'] or 0:.1f}/s", (x, max(p90[x], p50[x])), ha="center", va="bottom", fontsize=7)
    right.set_xticks(range(len(runs)), labels, fontsize=7)
    right.set_ylabel("completion tokens (label: events/s)")
    right.legend(fontsize=7)
    fig.suptitle(f"{result['model_name']} with vLLM {result['vllm']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"written: {path}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the SmolLM2-135M-Instruct folder (fetch-model smollm2)")
    parser.add_argument("--events", type=int, default=600)
    parser.add_argument("--events-file", help="events as JSON lines (bench/corpus.py --out); default: built here, seed 0")
    parser.add_argument("--modes", default="micro_batch,continuous")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--max-tokens", type=int, default=1536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-limit-s", type=float, default=150.0, help="one run's processor time, at most")
    parser.add_argument("--budget-s", type=float, default=340.0, help="skip a run that would end after this (an estimate)")
    parser.add_argument("--fake", action="store_true", help="vLLM 0.6.3's test double on the CPU (a smoke run)")
    parser.add_argument("--fake-blocks", type=int, default=4000)
    parser.add_argument("--fake-loop", action="store_true",
                        help="with --fake: continuous-mode requests loop (\"No. No. …\") to max_tokens, so the guard and "
                             "the abort act")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--plot", metavar="JSON",
                        help="only draw the PNG of a results file (next to it), e.g. on a box with matplotlib")
    args = parser.parse_args()
    if args.plot:
        print(plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png")))
        return 0
    began = time.perf_counter()

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {text}", flush=True)

    from bench.corpus import corpus_digest, corpus_events

    if args.events_file:
        with open(args.events_file, encoding="utf-8") as stream:
            events = [json.loads(line) for line in stream if line.strip()][: args.events]
    else:
        events = corpus_events(args.events)
    progress(f"{len(events)} events (corpus digest {corpus_digest(events)}, Python {platform.python_version()})")
    base, make, device = load_engine(args)
    import vllm

    progress(f"vLLM {getattr(vllm, '__version__', '?')} loaded {args.model} on {device}")
    plan = [(mode, config) for mode in args.modes.split(",") for config in args.configs.split(",")]
    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    longest = 0.0
    for mode, config in plan:
        if config in CONTINUOUS_ONLY and mode != "continuous":
            notes.append(f"{mode}/{config} not run: micro-batch mode runs one generate() per batch and cannot stop one "
                         f"request of it; its loops are trimmed after the fact (= {mode}/adr)")
            continue
        if time.perf_counter() - began + longest > args.budget_s:
            notes.append(f"{mode}/{config} skipped: it would end after --budget-s {args.budget_s:g}")
            progress(notes[-1])
            continue
        progress(f"{mode} / {config}: {len(events)} events through the processor")
        started = time.perf_counter()
        overrides = {"generation_mode": mode, **engine_overrides(args, CONFIGS[config])}
        try:
            row = {"mode": mode, "config": config, "settings": CONFIGS[config],
                   **run_processor(make(CONFIGS[config]), overrides, events, args.run_limit_s)}
        except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others' figures
            notes.append(f"{mode}/{config} failed: {type(exc).__name__}: {exc}")
            progress(notes[-1])
            continue
        finally:
            longest = max(longest, time.perf_counter() - started)
        runs.append(row)
        q = row["quality"]
        progress(f"{mode} / {config}: {row['summaries_read']} summaries, {row['events_per_s']} events/s, "
                 f"{row['completion_tokens_per_s']} tokens/s; cut off {q['cut_off']}, loop trimmed {q['loop_trimmed']}, "
                 f"cite none {q['cite_none']}, grounded median {q['grounded_share_median']}, tokens p50/p90/max "
                 f"{q['completion_tokens']['p50']:.0f}/{q['completion_tokens']['p90']:.0f}/{q['completion_tokens']['max']:.0f}"
                 + (" — TIMED OUT" if row["timed_out"] else ""))
        print(row["report"], flush=True)

    result = {
        "model": args.model, "model_name": Path(args.model).name, "engine": "vllm", "vllm": getattr(vllm, "__version__", "?"),
        "fake": args.fake, "device": device, "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "events": len(events), "corpus_digest": corpus_digest(events), "events_file": args.events_file,
        "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": args.max_tokens, "seed": args.seed},
        "max_tokens": args.max_tokens, "loop_check_tokens": LOOP_CHECK_TOKENS, "configs": CONFIGS, "notes": notes,
        "runs": runs, "seconds_total": round(time.perf_counter() - began, 1),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "realmodel-gpu" + ("-fake-smoke" if args.fake or device == "cpu" else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    progress(f"written: {out / (name + '.json')}; {plot(result, out / (name + '.png'))}")
    for note in notes:
        print(f"note: {note}", flush=True)
    base.close()
    print(json.dumps({"runs": [{"mode": r["mode"], "config": r["config"], "events_per_s": r["events_per_s"],
                                "completion_tokens_per_s": r["completion_tokens_per_s"],
                                **{k: r["quality"][k] for k in (*SHARES, "grounded_share_median")},
                                "completion_tokens_p50": r["quality"]["completion_tokens"]["p50"],
                                "completion_tokens_p90": r["quality"]["completion_tokens"]["p90"]} for r in runs],
                      "seconds_total": result["seconds_total"], "fake": args.fake}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
