"""One error taxonomy: every failure the worker meets says what happens next.

    ProcessorError
    ├── RecordError            this input is bad: its dead letter is published and its offset committed;
    │                          the stream goes on. Carries the source record, like confluent-kafka's
    │                          deserialization errors carry the message.
    ├── InfrastructureError    the engine/GPU, the Schema Registry, the broker or the output is broken: never a
    │                          dead letter, never a commit past the failure. The worker retries with bounded
    │                          exponential backoff while it keeps polling, then exits with `exit_code`.
    └── StartupError           the configuration cannot work (exit 2); raised before any partition is owned.

`reason` is the bounded label a dead letter's `dlq.error_class` header and the dead-letter metric carry: it comes
from the error's class, never from input data.
"""

from __future__ import annotations

from typing import ClassVar, Protocol


class RecordOrigin(Protocol):
    """Where a bad record came from (processor.source.SourceRecord is one): this module imports nothing of the
    processor, so every other module can import it without closing a cycle."""

    topic: str
    partition: int
    offset: int

# Process exit codes (README "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1  # a CLI command could not do what was asked (bad input file, refused replay, ...)
EXIT_CONFIG = 2  # configuration or engine start-up
EXIT_BROKER_UNAVAILABLE = 3
EXIT_OUTPUT_FAILED = 4
EXIT_ENGINE_FAILED = 5
EXIT_REGISTRY_UNAVAILABLE = 6
EXIT_TRANSACTION_FATAL = 7
EXIT_INTERRUPTED = 130  # Ctrl-C in a CLI command that is not the worker (the worker stops cleanly with 0)


class ProcessorError(Exception):
    """Root of every error the processor raises on purpose."""


class RecordError(ProcessorError):
    """This input record is bad: dead-letter it and commit past it."""

    source: RecordOrigin | None = None

    @property
    def reason(self) -> str:
        return type(self).__name__

    def with_source(self, source: RecordOrigin) -> "RecordError":
        self.source = source
        return self


class InfrastructureError(ProcessorError):
    """Something outside the record is broken: hold the pipeline, retry with backoff, then exit `exit_code`."""

    exit_code: ClassVar[int] = EXIT_FAILED
    what: ClassVar[str] = "infrastructure"


class StartupError(ProcessorError):
    """The configuration cannot work; the message names the setting to change (exit 2)."""

    exit_code: ClassVar[int] = EXIT_CONFIG


# ---------------------------------------------------------------------------------------------- infrastructure
class BrokerUnavailableError(InfrastructureError):
    """No broker answered for longer than BROKER_UNAVAILABLE_TIMEOUT_S, or commits kept failing."""

    exit_code = EXIT_BROKER_UNAVAILABLE
    what = "broker"


class CommitFailedError(BrokerUnavailableError):
    """An offset commit failed; the pipeline holds (nothing more is published) until a retry succeeds."""

    def __init__(self, message: str, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class OutputUnavailableError(InfrastructureError):
    """Output or DLQ records could not be delivered after every attempt; nothing of them was committed."""

    exit_code = EXIT_OUTPUT_FAILED
    what = "output"


class EngineUnavailableError(InfrastructureError):
    """The engine fails even on the known-good warm-up prompt: the GPU or the engine is broken, not the records."""

    exit_code = EXIT_ENGINE_FAILED
    what = "engine"


class RegistryUnavailableError(InfrastructureError):
    """The Schema Registry did not answer (refused, timed out, 5xx): not the record's fault."""

    exit_code = EXIT_REGISTRY_UNAVAILABLE
    what = "schema registry"


class TransactionFatalError(InfrastructureError):
    """The transactional producer is fenced or in a fatal state: another worker took this transactional.id."""

    exit_code = EXIT_TRANSACTION_FATAL
    what = "transaction"


# ------------------------------------------------------------------------------------------------- records
class RecordTooLargeError(RecordError):
    """The record's value is larger than MAX_EVENT_BYTES."""


class UnreadableHeadersError(RecordError):
    """The record's headers cannot be read (a header name that is not UTF-8, written by a Java, Go or kcat client):
    its dead letter carries the key and value, without those headers."""


class OutputTooLargeError(RecordError):
    """No output of this record fits the producer's message.max.bytes, even shrunk (an input key over the limit, say),
    or the output topic refused it as too large: the event is dead-lettered instead of the worker crash-looping."""
