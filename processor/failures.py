"""How a command ends when it fails: one line that says what to fix, and an exit code (README, "Exit codes").

Errors the processor raises on purpose (`processor.errors`) already say what to fix and carry their exit code;
this module adds the command-line ones and turns the few foreign exceptions a command can meet (a missing file,
a client error nobody translated) into the same one-line shape. Anything else is a bug: one line too, and
`--debug` shows its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

from processor.errors import (
    EXIT_BROKER_UNAVAILABLE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    InfrastructureError,
    ProcessorError,
    RecordError,
    StartupError,
)


class CommandError(ProcessorError):
    """The command could not do what was asked (a bad input line, a missing topic, a refused replay)."""

    exit_code = EXIT_FAILED


@dataclass(frozen=True)
class Failure:
    message: str
    exit_code: int
    expected: bool  # False: a bug, worth a traceback with --debug


def explain(exc: BaseException) -> Failure:
    """The one line and exit code a command ends with for `exc`."""
    if isinstance(exc, KeyboardInterrupt):
        return Failure("interrupted", EXIT_INTERRUPTED, True)
    if isinstance(exc, (CommandError, StartupError, InfrastructureError)):
        return Failure(str(exc) or type(exc).__name__, exc.exit_code, True)
    if isinstance(exc, RecordError):
        return Failure(f"{type(exc).__name__}: {exc}", EXIT_FAILED, True)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError)):
        name = exc.filename if exc.filename is not None else "the file"
        return Failure(f"cannot read {name}: {exc.strerror or exc}", EXIT_FAILED, True)
    if isinstance(exc, UnicodeDecodeError):
        return Failure(f"the input is not UTF-8 text ({exc.reason} at byte {exc.start})", EXIT_FAILED, True)
    try:
        from confluent_kafka import KafkaError, KafkaException
    except ImportError:  # pragma: no cover - confluent-kafka is a hard dependency
        KafkaException = ()  # type: ignore[assignment,misc]
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        error: KafkaError = exc.args[0]
        down = error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE, KafkaError._TIMED_OUT)
        hint = ": is it running? (KAFKA_BOOTSTRAP_SERVERS)" if down else ""
        return Failure(f"Kafka: {error.str()}{hint}", EXIT_BROKER_UNAVAILABLE if down else EXIT_FAILED, True)
    return Failure(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_FAILED, False)
