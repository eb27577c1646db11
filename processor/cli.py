"""Command line: `python -m processor {run,demo,broker,produce,consume,plan}`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Sequence

from processor import __version__
from processor.settings import ConfigurationError, load_settings

EXIT_CONFIG = 2
log = logging.getLogger("processor")


def _run(_args: argparse.Namespace) -> int:
    from processor.engines import create_engine
    from processor.engines.base import EngineStartupError
    from processor.logs import configure_logging
    from processor.loop import Worker

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        engine = create_engine(settings)
    except EngineStartupError as exc:
        log.error("engine failed to start: %s", exc)
        return EXIT_CONFIG
    worker = Worker(settings, engine)
    if settings.metrics_port is not None:
        port = worker.metrics.serve(settings.metrics_port)
        log.info("metrics, /healthz and /readyz on port %d", port)
    worker.install_signal_handlers()
    try:
        return worker.run()
    except EngineStartupError as exc:
        log.error("engine failed to start: %s", exc)
        return EXIT_CONFIG
    finally:
        worker.metrics.close()
        engine.close()


def _demo(args: argparse.Namespace) -> int:
    from processor.demo import run_demo
    from processor.logs import configure_logging

    configure_logging("text", "WARNING")
    return run_demo(engine=args.engine, model=args.model, repeat=args.repeat)


def _broker(args: argparse.Namespace) -> int:
    from processor.broker import EmbeddedBroker, ensure_topics

    settings = load_settings()
    with EmbeddedBroker(port=args.port) as broker:
        ensure_topics(
            broker.bootstrap,
            {settings.kafka_input_topic: args.partitions, settings.kafka_output_topic: args.partitions, settings.kafka_dlq_topic: 1},
        )
        print(f"embedded broker (Tansu, memory-only) on {broker.bootstrap}; Ctrl-C stops it", flush=True)
        print(f"export KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}", flush=True)
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"] and broker.process is not None and broker.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def _produce(args: argparse.Namespace) -> int:
    from processor.codec import make_codec
    from processor.tools import produce_events, read_json_lines

    settings = load_settings()
    stream = open(args.file, encoding="utf-8") if args.file != "-" else sys.stdin
    with stream:
        placed = produce_events(
            settings.kafka_common(), args.topic or settings.kafka_input_topic, read_json_lines(stream), make_codec(settings.schema_registry_url)
        )
    print(f"produced {len(placed)} event(s) to {args.topic or settings.kafka_input_topic}", file=sys.stderr)
    return 0


def _consume(args: argparse.Namespace) -> int:
    from processor.codec import make_codec
    from processor.tools import read_topic

    settings = load_settings()
    topic = args.topic or (settings.kafka_dlq_topic if args.dlq else settings.kafka_output_topic)
    codec = make_codec(settings.schema_registry_url)
    for record in read_topic(
        settings.kafka_common(), topic, dead_letters=args.dlq, max_records=args.max, idle_timeout_s=args.idle_timeout, codec=codec
    ):
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from processor.capacity import GIB, load_model_config, plan_for

    settings = load_settings()
    quantization = settings.vllm_quantization if args.quantization is None else (args.quantization or None)
    plan = plan_for(load_model_config(args.model_config), int(args.gpu_memory_gib * GIB), settings, quantization)
    print(f"model config {args.model_config}, quantization {quantization or 'none'}, "
          f"VLLM_MAX_MODEL_LEN={settings.max_model_len}, SAMPLING_MAX_TOKENS={settings.sampling_max_tokens}")
    print(plan.report())
    return 0 if plan.kv_tokens >= settings.max_model_len else 1


def _summarize(args: argparse.Namespace) -> int:
    """The configured engine over events from a file or the samples, without Kafka: the check of an engine on a box."""
    from processor.engines import create_engine
    from processor.engines.base import Generation
    from processor.engines.isolation import generate_isolated
    from processor.events import validate_event
    from processor.prompt import PromptBuilder
    from processor.samples import sample_events
    from processor.tools import read_json_lines

    settings = load_settings()
    engine = create_engine(settings)
    if args.samples:
        raw = sample_events()
    else:
        with open(args.file, encoding="utf-8") if args.file != "-" else sys.stdin as stream:
            raw = list(read_json_lines(stream))
    builder = PromptBuilder(engine.tokenizer, settings.max_model_len, settings.sampling_max_tokens, settings.summary_language)
    prompts = [builder.build(validate_event(event)) for event in raw]
    started = time.monotonic()
    outputs = generate_isolated(engine, prompts)
    seconds = time.monotonic() - started
    failures = 0
    for prompt, output in zip(prompts, outputs):
        line = {"event_id": prompt.event.event_id, "engine": engine.kind, "model": engine.model, "prompt_tokens": prompt.prompt_tokens}
        if isinstance(output, Generation):
            line.update(summary=output.text, finish_reason=output.finish_reason, completion_tokens=output.completion_tokens)
        else:
            failures += 1
            line.update(error=f"{type(output).__name__}: {output}")
        print(json.dumps(line, ensure_ascii=False), flush=True)
    tokens = sum(o.completion_tokens for o in outputs if isinstance(o, Generation))
    print(f"{len(prompts)} events in one generate() call: {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} completion tokens/s, "
          f"{failures} failed", file=sys.stderr)
    engine.close()
    return 0 if failures == 0 else 1


def _lag(args: argparse.Namespace) -> int:
    from processor.offsets import format_lag, group_lag

    settings = load_settings()
    group = args.group or settings.kafka_group_id
    print(format_lag(group_lag(settings.kafka_common(), group, settings.kafka_input_topic), group, settings.kafka_input_topic))
    return 0


def _parse_start(text: str) -> "str | int | object":
    from datetime import datetime, timezone

    if text in ("earliest", "latest"):
        return text
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--to takes earliest, latest, an offset or an ISO time, not {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _replay(args: argparse.Namespace) -> int:
    from processor.offsets import GroupActiveError, Progress, backfill_done, reset_offsets, target_offsets

    settings = load_settings()
    common = settings.kafka_common()
    group = args.group or settings.kafka_group_id
    try:
        start = reset_offsets(common, group, settings.kafka_input_topic, args.to)
    except GroupActiveError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    print(f"group {group} on {settings.kafka_input_topic} reset to {args.to}: " + ", ".join(f"[{p}]={o}" for p, o in sorted(start.items())), file=sys.stderr)
    if not args.backfill:
        return 0

    from processor.engines import create_engine
    from processor.logs import configure_logging
    from processor.loop import Worker

    configure_logging(settings.log_format, "WARNING")
    end = target_offsets(common, group, settings.kafka_input_topic, "latest")  # captured now: the backfill's bound
    total = sum(max(0, end[p] - start[p]) for p in end)
    engine = create_engine(settings)
    worker = Worker(settings, engine, consumer_overrides=args.consumer_overrides)
    worker.install_signal_handlers()
    progress = Progress(total)

    def finished() -> bool:
        done, complete = backfill_done(start, end, lambda: {p: o for (_t, p), o in worker.committed.items()})
        progress.update(done)
        return complete

    code = worker.run(until=finished)
    done, complete = backfill_done(start, end, lambda: {p: o for (_t, p), o in worker.committed.items()})
    progress.update(done, force=True)
    print(f"\nbackfill {'complete' if complete else 'stopped'}: {done} of {total} records reprocessed "
          f"(prompt_version {worker.prompts.version}, model {engine.model})", file=sys.stderr)
    engine.close()
    return code if complete or code else 1


def _tiny_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from processor.engines.tiny_model import build_tiny_chat_model, sample_corpus

    path = build_tiny_chat_model(Path(args.directory), sample_corpus())
    print(f"tiny random-weight Qwen2 chat model in {path} (gibberish output; for wiring checks, not summaries)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m processor",
        description="The AI worker: consume search-result events, summarise them with an LLM, publish summaries. "
        "Configuration comes from the environment (see README).",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("run", help="run the stream processor (configured by environment variables)").set_defaults(func=_run)

    demo = commands.add_parser("demo", help="embedded broker + sample Korean/English events + the processor; prints summaries")
    demo.add_argument("--engine", default="extractive", choices=["extractive", "transformers"])
    demo.add_argument("--model", help="model directory for --engine transformers")
    demo.add_argument("--repeat", type=int, default=1, help="send the sample events this many times (throughput)")
    demo.set_defaults(func=_demo)

    broker = commands.add_parser("broker", help="run the embedded broker (Tansu) in the foreground for local work")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument("--partitions", type=int, default=3)
    broker.set_defaults(func=_broker)

    produce = commands.add_parser("produce", help="JSON lines (one event per line) → Avro events on the input topic")
    produce.add_argument("file", nargs="?", default="-", help="a .jsonl file, or - for standard input")
    produce.add_argument("--topic", help="default: KAFKA_INPUT_TOPIC")
    produce.set_defaults(func=_produce)

    consume = commands.add_parser("consume", help="decode summaries (or dead letters) to JSON lines")
    consume.add_argument("--dlq", action="store_true", help="read KAFKA_DLQ_TOPIC and print dead letters")
    consume.add_argument("--topic", help="default: KAFKA_OUTPUT_TOPIC, or KAFKA_DLQ_TOPIC with --dlq")
    consume.add_argument("--max", type=int, help="stop after this many records")
    consume.add_argument("--idle-timeout", type=float, default=3.0, help="stop after this many seconds without a record")
    consume.set_defaults(func=_consume)

    plan = commands.add_parser("plan", help="print the KV-cache capacity plan for a model config (no weights loaded)")
    plan.add_argument("model_config", help="a model's config.json, or its directory")
    plan.add_argument("--gpu-memory-gib", type=float, default=12.0, help="GPU memory (RTX 4070: 12)")
    plan.add_argument("--quantization", help="override VLLM_QUANTIZATION ('' for none)")
    plan.set_defaults(func=_plan)

    lag = commands.add_parser("lag", help="per-partition committed offset, end offset and lag of the consumer group")
    lag.add_argument("--group", help="default: KAFKA_GROUP_ID")
    lag.set_defaults(func=_lag)

    replay = commands.add_parser("replay", help="reset the group's offsets (refused while workers are alive); --backfill reprocesses to the current end")
    replay.add_argument("--to", type=_parse_start, default="earliest", help="earliest (default), latest, an offset, or an ISO time")
    replay.add_argument("--group", help="default: KAFKA_GROUP_ID")
    replay.add_argument("--backfill", action="store_true", help="then process up to the end offsets seen now, with a progress bar, and exit")
    replay.set_defaults(func=_replay, consumer_overrides=None)

    summarize = commands.add_parser("summarize", help="run the configured ENGINE over events (no Kafka): checks an engine on this box")
    summarize.add_argument("file", nargs="?", default="-", help="JSON lines of events, or - for standard input")
    summarize.add_argument("--samples", action="store_true", help="use the built-in Korean and English sample events")
    summarize.set_defaults(func=_summarize)

    tiny = commands.add_parser("tiny-model", help="build a tiny random-weight Qwen2 chat model (no hub) for ENGINE=transformers checks")
    tiny.add_argument("directory")
    tiny.set_defaults(func=_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
