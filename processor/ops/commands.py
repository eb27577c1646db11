"""The command implementations behind `python -m processor COMMAND` (processor/cli.py holds the parser and the
dispatch): each takes the parsed arguments and returns the exit code, or raises what failures.explain turns into one.
Heavy imports stay inside each command, so that `--help` and the light commands start fast."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import IO

from processor.errors import EXIT_OK
from processor.failures import CommandError
from processor.settings import Settings, load_settings

log = logging.getLogger("processor")

# Tansu, the embedded broker, joins a consumer group in ~3 s with these instead of ~23 s with librdkafka's
# defaults; for local work against it, not production defaults.
LOCAL_GROUP_SETTINGS = {"KAFKA_SESSION_TIMEOUT_MS": "6000", "KAFKA_HEARTBEAT_INTERVAL_MS": "500"}


def _tool_logging(args: argparse.Namespace) -> None:
    """Command-line tools log warnings only (librdkafka's deduplicated); --debug shows everything."""
    from processor.logs import configure_logging

    configure_logging("text", "DEBUG" if args.debug else "WARNING")


def tool_log_format(settings: Settings) -> str:
    """A command that runs the worker inside it (replay --backfill) logs as the command does, in text beside its
    progress output; JSON only when LOG_FORMAT asks for it (the worker's own default is JSON for log collectors)."""
    return settings.log_format if "log_format" in settings.model_fields_set else "text"


def _open_input(path: str) -> IO[str]:
    if path != "-":
        return open(path, encoding="utf-8")
    if sys.stdin.isatty():
        print("reading standard input: one JSON line each, Ctrl-D to end (or give a file)", file=sys.stderr)
    return sys.stdin


def run(_args: argparse.Namespace) -> int:
    from processor.engines import attach_metrics, create_engine
    from processor.logs import configure_logging
    from processor.loop import Worker, load_or_stop

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    # A stop during the model load (minutes for a large model) is a requested stop like any other: exit 0, at once.
    engine = load_or_stop(lambda: create_engine(settings), f"loading the engine (ENGINE={settings.engine.value})")
    worker = Worker(settings, engine)
    attach_metrics(engine, worker.metrics)  # ENGINE=openai: server latency, retries, /readyz on reachability
    if settings.metrics_port is not None:
        port = worker.metrics.serve(settings.metrics_port)
        log.info("metrics, /healthz and /readyz on port %d", port)
    worker.install_signal_handlers()
    try:
        return worker.run()
    finally:
        worker.metrics.close()
        engine.close()


def demo(args: argparse.Namespace) -> int:
    from processor.ops.demo import run_demo
    from processor.logs import configure_logging

    configure_logging("text", "DEBUG" if args.debug else "WARNING")
    from pathlib import Path

    cache = Path(args.model_cache) if args.model_cache else None
    return run_demo(engine=args.engine, model=args.model, repeat=args.repeat, model_cache=cache)


def broker(args: argparse.Namespace) -> int:
    from processor.ops.broker import EmbeddedBroker, ensure_topics

    settings = load_settings()
    _tool_logging(args)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        with EmbeddedBroker(port=args.port) as broker:
            topics = {settings.kafka_input_topic: args.partitions, settings.kafka_output_topic: args.partitions, settings.kafka_dlq_topic: 1}
            ensure_topics(broker.bootstrap, topics)
            print(
                f"embedded broker (Tansu, memory-only) on {broker.bootstrap} with topics "
                + ", ".join(f"{name} ({n})" for name, n in topics.items())
                + "; Ctrl-C stops it. In other terminals:",
                flush=True,
            )
            exports = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, **LOCAL_GROUP_SETTINGS}
            print("export " + " ".join(f"{k}={v}" for k, v in exports.items()), flush=True)
            while not stop["now"] and broker.running:
                time.sleep(0.5)
            if not stop["now"] and not broker.running:
                code = broker.process.returncode if broker.process is not None else None
                raise CommandError(f"the embedded broker on {broker.bootstrap} exited on its own (code {code})")
    except KeyboardInterrupt:
        pass  # Ctrl-C is how this command is meant to stop
    return EXIT_OK


def produce(args: argparse.Namespace) -> int:
    from processor.codec import make_codec
    from processor.ops.tools import parse_event_lines, produce_events, produce_values

    settings = load_settings()
    _tool_logging(args)
    topic = args.topic or settings.kafka_input_topic
    with _open_input(args.file) as stream:
        lines = stream.readlines()
    if args.raw:
        # Exactly the bytes given, no validation, no Avro: how a malformed record reaches the dead-letter path.
        values = [line.rstrip("\r\n").encode() for line in lines if line.strip()]
        if not values:
            raise CommandError("nothing to produce: the input has no non-blank line")
        placed = produce_values(settings.kafka_common(), topic, [(None, value) for value in values])
        print(f"produced {len(placed)} raw record(s) to {topic} as given (the worker dead-letters what is not an event)", file=sys.stderr)
        return EXIT_OK
    parsed = parse_event_lines(lines)
    invalid = [line for line in parsed if line.error is not None]
    valid = [line.event for line in parsed if line.event is not None]
    name = "<stdin>" if args.file == "-" else args.file
    for line in invalid:
        print(f"{name}:{line.number}: {line.error}", file=sys.stderr)
    if not parsed:
        raise CommandError("nothing to produce: the input has no non-blank line")
    if not valid:  # --skip-invalid would send nothing either: not a way out worth naming
        raise CommandError(f"none of the {len(parsed)} line(s) is a valid event: nothing was sent")
    if invalid and not args.skip_invalid:
        raise CommandError(
            f"{len(invalid)} of {len(parsed)} line(s) are not valid events, so nothing was sent: fix them, "
            f"or add --skip-invalid to send the {len(valid)} valid one(s)"
        )
    placed = produce_events(settings.kafka_common(), topic, valid, make_codec(settings.schema_registry_url))
    skipped = f"; skipped {len(invalid)} invalid line(s)" if invalid else ""
    print(f"produced {len(placed)} event(s) to {topic}{skipped}", file=sys.stderr)
    return EXIT_OK


def consume(args: argparse.Namespace) -> int:
    from processor.codec import make_codec
    from processor.ops.reachability import require_broker
    from processor.ops.tools import read_topic

    settings = load_settings()
    _tool_logging(args)
    topic = args.topic or (settings.kafka_dlq_topic if args.dlq else settings.kafka_output_topic)
    require_broker(settings.kafka_common())
    codec = make_codec(settings.schema_registry_url)
    for record in read_topic(
        settings.kafka_common(), topic, dead_letters=args.dlq, max_records=args.max, idle_timeout_s=args.idle_timeout, codec=codec
    ):
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return EXIT_OK


def quality(args: argparse.Namespace) -> int:
    from processor.codec import make_codec
    from processor.quality import report
    from processor.ops.reachability import require_broker
    from processor.ops.tools import read_topic

    settings = load_settings()
    _tool_logging(args)
    topic = args.topic or settings.kafka_output_topic
    require_broker(settings.kafka_common())
    summaries = list(read_topic(settings.kafka_common(), topic, max_records=args.max, idle_timeout_s=args.idle_timeout,
                                codec=make_codec(settings.schema_registry_url)))
    print(f"{topic}: " + report(summaries, worst=args.worst), flush=True)
    return EXIT_OK


def plan(args: argparse.Namespace) -> int:
    from processor.capacity import GIB, load_model_config, plan_for

    settings = load_settings()
    quantization = settings.vllm_quantization if args.quantization is None else (args.quantization or None)
    try:
        config = load_model_config(args.model_config)
        plan = plan_for(config, int(args.gpu_memory_gib * GIB), settings, quantization)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{args.model_config} is not JSON ({exc.msg}, line {exc.lineno}): give a model's config.json") from None
    except KeyError as exc:
        raise CommandError(f"{args.model_config} is not a transformer model config (no {exc.args[0]}): give a model's config.json") from None
    print(f"model config {args.model_config}, VLLM_QUANTIZATION={quantization or ''}, "
          f"VLLM_MAX_MODEL_LEN={settings.max_model_len}, SAMPLING_MAX_TOKENS={settings.sampling_max_tokens}")
    print(plan.report())
    if not plan.fits:
        raise CommandError(
            f"the model does not fit {args.gpu_memory_gib:g} GiB with VLLM_MAX_MODEL_LEN={settings.max_model_len}: use a bigger GPU "
            "(--gpu-memory-gib), a quantized model (VLLM_QUANTIZATION), a shorter VLLM_MAX_MODEL_LEN, "
            "or VLLM_TENSOR_PARALLEL_SIZE > 1"
        )
    return EXIT_OK


def summarize(args: argparse.Namespace) -> int:
    """The configured engine over events from a file or the samples, without Kafka: the check of an engine on a box."""
    from processor.engines import create_engine
    from processor.engines.base import Generation
    from processor.engines.isolation import generate_isolated
    from processor.events import validate_event
    from processor.guards import guard_summary
    from processor.prompt import PromptBuilder
    from processor.ops.samples import sample_events
    from processor.ops.tools import parse_event_lines
    from processor.quality import assess

    settings = load_settings()
    _tool_logging(args)
    if args.samples:
        events = [validate_event(event) for event in sample_events()]
    else:
        with _open_input(args.file) as stream:
            parsed = parse_event_lines(stream)
        name = "<stdin>" if args.file == "-" else args.file
        invalid = [line for line in parsed if line.error is not None]
        for line in invalid:
            print(f"{name}:{line.number}: {line.error}", file=sys.stderr)
        if invalid or not parsed:
            raise CommandError(f"{len(invalid)} of {len(parsed)} line(s) are not valid events: fix them (nothing was summarised)")
        events = [line.event for line in parsed if line.event is not None]
    engine = create_engine(settings)
    try:
        builder = PromptBuilder(engine.tokenizer, settings.max_model_len, settings.sampling_max_tokens, settings.summary_language)
        prompts = [builder.build(event) for event in events]
        started = time.monotonic()
        outputs = generate_isolated(engine, prompts)
        seconds = time.monotonic() - started
    finally:
        engine.close()
    failures = 0
    for prompt, output in zip(prompts, outputs):
        line = {"event_id": prompt.event.event_id, "engine": engine.kind, "model": engine.model, "prompt_tokens": prompt.prompt_tokens}
        if isinstance(output, Generation):
            # The summary as `run` would publish it (loop trimmed, whole ending) and its quality signals (schema v3).
            guarded = guard_summary(output.text, output.finish_reason)
            line.update(summary=guarded.text, finish_reason=output.finish_reason, completion_tokens=output.completion_tokens,
                        quality=assess(prompt, guarded.text, output.finish_reason, guarded).as_record())
        else:
            failures += 1
            line.update(error=f"{type(output).__name__}: {output}")
        print(json.dumps(line, ensure_ascii=False), flush=True)
    tokens = sum(o.completion_tokens for o in outputs if isinstance(o, Generation))
    # The model-free engine has no tokens to speak of: a rate for it would be a meaningless big number.
    rate = "no token rate (model-free engine)" if engine.kind == "extractive" else f"{tokens / max(seconds, 1e-9):.1f} completion tokens/s"
    print(f"{len(prompts)} events in one generate() call: {seconds:.2f} s, {rate}, {failures} failed", file=sys.stderr)
    if failures:
        raise CommandError(f"{failures} of {len(prompts)} event(s) got no summary (see their error fields)")
    return EXIT_OK


def lag(args: argparse.Namespace) -> int:
    from processor.ops.offsets import format_lag, group_lag
    from processor.ops.reachability import require_broker

    settings = load_settings()
    _tool_logging(args)
    group = args.group or settings.kafka_group_id
    require_broker(settings.kafka_common())
    print(format_lag(group_lag(settings.kafka_common(), group, settings.kafka_input_topic), group, settings.kafka_input_topic))
    return EXIT_OK


def parse_start(text: str) -> "str | int | object":
    from datetime import datetime, timezone

    if text in ("earliest", "latest"):
        return text
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--to takes earliest, latest, an offset or an ISO time, not {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def replay(args: argparse.Namespace) -> int:
    from processor.ops.offsets import Progress, backfill_done, backfill_ends, reset_offsets
    from processor.ops.reachability import require_broker

    settings = load_settings()
    _tool_logging(args)
    common = settings.kafka_common()
    group = args.group or settings.kafka_group_id
    require_broker(common)
    start = reset_offsets(common, group, settings.kafka_input_topic, args.to)
    print(f"group {group} on {settings.kafka_input_topic} reset to {args.to}: " + ", ".join(f"[{p}]={o}" for p, o in sorted(start.items())), file=sys.stderr)
    if not args.backfill:
        return EXIT_OK

    from processor.engines import create_engine
    from processor.logs import configure_logging
    from processor.loop import Worker

    configure_logging(tool_log_format(settings), "DEBUG" if args.debug else "WARNING")
    end = backfill_ends(common, settings.kafka_input_topic, start)  # captured now: the backfill's bound
    total = sum(end[p] - start[p] for p in end)
    engine = create_engine(settings)
    worker = Worker(settings, engine, consumer_overrides=args.consumer_overrides)
    worker.install_signal_handlers()
    progress = Progress(total)

    def committed() -> dict[int, int]:
        return {p: o for (_t, p), o in worker.committed.items()}

    def finished() -> bool:
        done, complete = backfill_done(start, end, committed)
        progress.update(done)
        return complete

    try:
        code = worker.run(until=finished)
    finally:
        done, complete = backfill_done(start, end, committed)
        progress.update(done, force=True)
        progress.close()
        engine.close()
    print(f"backfill {'complete' if complete else 'stopped'}: {done} of {total} records reprocessed "
          f"(prompt_version {worker.pipeline.prompt_version}, model {engine.model})", file=sys.stderr)
    if code:
        return code
    if not complete:
        raise CommandError(
            f"the backfill stopped before the end ({done} of {total}): the group's committed offsets keep its place; "
            "`python -m processor run` continues from there"
        )
    return EXIT_OK


def fetch_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from processor.model_fetch import fetch_model

    _tool_logging(args)
    path = fetch_model(args.name, Path(args.directory), progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(path)
    return EXIT_OK


def tiny_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from processor.ops.tiny_model import build_tiny_chat_model, sample_corpus

    path = build_tiny_chat_model(Path(args.directory), sample_corpus())
    print(f"tiny random-weight Qwen2 chat model in {path} (gibberish output; for wiring checks, not summaries)")
    return EXIT_OK
