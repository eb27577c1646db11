"""Avro wire format: single-object encoding (Avro spec, "Single object encoding"), written and read with fastavro.

A message is `C3 01`, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical
Form, then the Avro binary body. The reader finds the writer schema by fingerprint among every version kept in
`schemas/` and resolves it to the newest version of the same record (schema evolution).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from processor.errors import RecordError, RegistryUnavailableError
from processor.wire import TooManyResultsError, count_capped  # noqa: F401 - TooManyResultsError: callers import it from here

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
HEADER_LENGTH = len(SINGLE_OBJECT_MAGIC) + 8
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

EVENT_SCHEMA = "ai_worker.SearchResultEvent"
SUMMARY_SCHEMA = "ai_worker.SearchSummary"
DEAD_LETTER_SCHEMA = "ai_worker.DeadLetter"

# Search results an event may carry (MAX_EVENT_RESULTS). The prompt uses at most the top 100 ranks
# (prompt.MAX_RESULTS_PER_EVENT) and a search page holds 10 to 100, so no real event comes near it; an event past it
# is dead-lettered from the array's block counts, before a single result object is decoded or validated (decoding
# 4 MB of empty results builds ~700,000 dicts, then as many pydantic models: seconds and hundreds of MB each).
DEFAULT_MAX_RESULTS = 1_000
_CAPPED_ARRAYS = {EVENT_SCHEMA: "results"}


class DecodeError(RecordError):
    """A record's bytes cannot be read as any schema this worker knows; it belongs in the dead-letter topic."""


class BadMagicError(DecodeError):
    """The value does not start with Avro single-object encoding's C3 01 marker."""


class UnknownSchemaError(DecodeError):
    """The fingerprint matches no schema version in schemas/: deploy the schema the producer writes with."""


class CorruptBodyError(DecodeError):
    """The header is fine but the Avro body is truncated or does not match its schema."""


def spec_fingerprint(parsed_schema: dict[str, Any]) -> bytes:
    """The 8 header bytes: CRC-64-AVRO of the Parsing Canonical Form, little-endian.

    fastavro's hex digest is already in the spec's byte order (little-endian), unlike Java's long.
    """
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed_schema), "CRC-64-AVRO"))


@dataclass(frozen=True)
class SchemaVersion:
    name: str  # full name, e.g. ai_worker.SearchResultEvent
    version: int
    path: Path
    parsed: dict[str, Any]
    fingerprint: bytes

    @property
    def header(self) -> bytes:
        return SINGLE_OBJECT_MAGIC + self.fingerprint


class SchemaStore:
    """Every `<name>.v<N>.avsc` under a folder, parsed once, indexed by fingerprint and by record name."""

    def __init__(self, folder: Path = SCHEMA_DIR) -> None:
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        self._versions: dict[str, list[SchemaVersion]] = {}
        for path in sorted(folder.glob("*.v*.avsc")):
            version = int(path.name.rsplit(".v", 1)[1].split(".")[0])
            parsed = parse_schema(json.loads(path.read_text(encoding="utf-8")), named_schemas={})
            entry = SchemaVersion(parsed["name"], version, path, parsed, spec_fingerprint(parsed))
            self._by_fingerprint[entry.fingerprint] = entry
            self._versions.setdefault(entry.name, []).append(entry)
        for versions in self._versions.values():
            versions.sort(key=lambda v: v.version)
        if not self._versions:
            raise FileNotFoundError(f"no *.v<N>.avsc schema in {folder}")

    def latest(self, name: str) -> SchemaVersion:
        return self._versions[name][-1]

    def versions(self, name: str) -> list[SchemaVersion]:
        return list(self._versions[name])

    def by_fingerprint(self, fp: bytes) -> SchemaVersion | None:
        return self._by_fingerprint.get(fp)


@dataclass(frozen=True)
class SerializationContext:
    """What a payload is and where it travels (confluent-kafka's SerializationContext, with the record's schema
    named instead of the message field: every payload here is a value)."""

    topic: str
    schema: str


class Codec(Protocol):
    """What the runtime needs of a wire format (both codecs satisfy it): callable-serializer style, after
    confluent-kafka's Serializer(obj, ctx) / Deserializer(data, ctx)."""

    store: "SchemaStore"

    def serialize(self, record: dict[str, Any], ctx: SerializationContext) -> bytes:
        """The record's bytes. Raises RegistryUnavailableError where a registry does not answer."""
        ...

    def deserialize(self, payload: bytes | None, ctx: SerializationContext) -> dict[str, Any]:
        """The record, resolved to the newest local schema. Raises a RecordError for bytes that are not a record of
        ctx.schema, RegistryUnavailableError where a registry does not answer."""
        ...


class _ContextCalls:
    """serialize/deserialize in terms of a codec's encode/decode (a subclass overriding those is honoured)."""

    def encode(self, record: dict[str, Any], schema_name: str, topic: str = "") -> bytes:
        raise NotImplementedError

    def decode(self, payload: bytes | None, schema_name: str, topic: str = "") -> dict[str, Any]:
        raise NotImplementedError

    def serialize(self, record: dict[str, Any], ctx: SerializationContext) -> bytes:
        return self.encode(record, ctx.schema, ctx.topic)

    def deserialize(self, payload: bytes | None, ctx: SerializationContext) -> dict[str, Any]:
        return self.decode(payload, ctx.schema, ctx.topic)


class AvroCodec(_ContextCalls):
    """Encode with the newest version of a record; decode any known version into the newest one. An event with more
    than `max_results` search results is refused from its block counts, before its results are decoded."""

    def __init__(self, store: SchemaStore | None = None, *, max_results: int = DEFAULT_MAX_RESULTS) -> None:
        self.store = store or SchemaStore()
        self.max_results = max_results

    def encode(self, record: dict[str, Any], schema_name: str, topic: str = "", version: int | None = None) -> bytes:
        schema = self.store.latest(schema_name) if version is None else self._version(schema_name, version)
        buffer = io.BytesIO()
        buffer.write(schema.header)
        schemaless_writer(buffer, schema.parsed, record)
        return buffer.getvalue()

    def decode(self, payload: bytes | None, schema_name: str, topic: str = "") -> dict[str, Any]:
        if not payload or len(payload) < HEADER_LENGTH or payload[:2] != SINGLE_OBJECT_MAGIC:
            shown = (payload or b"")[:2].hex() or "empty"
            raise BadMagicError(f"value is not Avro single-object encoded: starts with {shown}, expected c301")
        writer = self.store.by_fingerprint(payload[2:HEADER_LENGTH])
        if writer is None:
            raise UnknownSchemaError(
                f"schema fingerprint {payload[2:HEADER_LENGTH].hex()} is not among the versions in schemas/"
            )
        if writer.name != schema_name:
            raise UnknownSchemaError(f"record was written as {writer.name}, expected {schema_name}")
        if schema_name in _CAPPED_ARRAYS:
            count_capped(writer.parsed, payload, HEADER_LENGTH, _CAPPED_ARRAYS[schema_name], self.max_results)
        reader = self.store.latest(schema_name)
        body = io.BytesIO(payload)
        body.seek(HEADER_LENGTH)
        try:
            # Resolution is only needed (and only paid for) when an older version wrote the record.
            record = schemaless_reader(body, writer.parsed, None if reader is writer else reader.parsed)
        except UnicodeDecodeError as exc:
            raise CorruptBodyError(f"a string field is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
        except (EOFError, ValueError, IndexError, TypeError, OverflowError) as exc:
            raise CorruptBodyError(f"Avro body does not match {writer.path.name}: {type(exc).__name__}: {exc}") from None
        if body.tell() != len(payload):
            raise CorruptBodyError(f"{len(payload) - body.tell()} bytes left over after the Avro body")
        return record

    def _version(self, schema_name: str, version: int) -> SchemaVersion:
        for candidate in self.store.versions(schema_name):
            if candidate.version == version:
                return candidate
        raise KeyError(f"{schema_name} has no version {version}")


class RegistryCodec(_ContextCalls):
    """Confluent Schema Registry framing (`00`, 4-byte big-endian schema id, Avro body) through the library's own
    AvroSerializer/AvroDeserializer; used when SCHEMA_REGISTRY_URL is set. Subjects follow the default
    TopicNameStrategy (`<topic>-value`); the newest local version of each record is the one registered and read."""

    def __init__(self, url: str, store: SchemaStore | None = None, client: Any = None, *, max_results: int = DEFAULT_MAX_RESULTS) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.store = store or SchemaStore()
        self.max_results = max_results
        self._writers: dict[int, dict[str, Any]] = {}  # schema id → parsed writer schema, for the result cap's scan
        self.url = url
        self.client = client or SchemaRegistryClient.new_client({"url": url})  # mock:// URLs give the mock registry
        self._serializers: dict[str, Any] = {}
        self._deserializers: dict[str, Any] = {}

    def _schema_text(self, schema_name: str) -> str:
        return self.store.latest(schema_name).path.read_text(encoding="utf-8")

    def encode(self, record: dict[str, Any], schema_name: str, topic: str = "") -> bytes:
        from confluent_kafka.schema_registry.avro import AvroSerializer
        from confluent_kafka.schema_registry.error import SchemaRegistryError
        from confluent_kafka.serialization import MessageField, SerializationContext

        if schema_name not in self._serializers:
            self._serializers[schema_name] = AvroSerializer(self.client, self._schema_text(schema_name))
        try:
            return bytes(self._serializers[schema_name](record, SerializationContext(topic, MessageField.VALUE)))
        except SchemaRegistryError as exc:
            raise RegistryUnavailableError(
                f"the Schema Registry at {_safe_url(self.url)} refused {schema_name}: {exc} (SCHEMA_REGISTRY_URL)"
            ) from None
        except _transport_errors() as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: BaseException) -> RegistryUnavailableError:
        return RegistryUnavailableError(
            f"the Schema Registry at {_safe_url(self.url)} did not answer ({exc}): is it running? (SCHEMA_REGISTRY_URL)"
        )

    def decode(self, payload: bytes | None, schema_name: str, topic: str = "") -> dict[str, Any]:
        from confluent_kafka.schema_registry.avro import AvroDeserializer
        from confluent_kafka.schema_registry.error import SchemaRegistryError
        from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError

        if not payload or len(payload) < 5 or payload[0] != 0:
            shown = (payload or b"")[:1].hex() or "empty"
            raise BadMagicError(f"value is not Schema Registry framed: starts with {shown}, expected 00 + schema id")
        if schema_name not in self._deserializers:
            # Reader schema = newest local version: the registry's writer schema is resolved to it.
            self._deserializers[schema_name] = AvroDeserializer(self.client, self._schema_text(schema_name))
        try:
            if schema_name in _CAPPED_ARRAYS:
                count_capped(self._writer(int.from_bytes(payload[1:5], "big")), payload, 5, _CAPPED_ARRAYS[schema_name], self.max_results)
            return dict(self._deserializers[schema_name](payload, SerializationContext(topic, MessageField.VALUE)))
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise UnknownSchemaError(f"schema id {int.from_bytes(payload[1:5], 'big')} is unknown to the registry") from None
            raise RegistryUnavailableError(f"Schema Registry error: {exc}") from None
        except _transport_errors() as exc:
            raise self._unreachable(exc) from None
        except SerializationError as exc:
            text = str(exc)
            if "not found" in text.lower() or "40403" in text:
                raise UnknownSchemaError(f"schema id {int.from_bytes(payload[1:5], 'big')} is unknown to the registry: {text}") from None
            raise CorruptBodyError(f"Avro body does not match its registered schema: {text}") from None
        except UnicodeDecodeError as exc:
            raise CorruptBodyError(f"a string field is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
        except (EOFError, ValueError, IndexError, TypeError, OverflowError) as exc:
            raise CorruptBodyError(f"Avro body does not match its registered schema: {type(exc).__name__}: {exc}") from None


    def _writer(self, schema_id: int) -> dict[str, Any]:
        """The registered writer schema (the client caches it: the deserializer asks for the same one next); an empty
        record, which the scan passes over, when it is not one this worker can parse (the deserializer says why)."""
        if schema_id not in self._writers:
            text = self.client.get_schema(schema_id).schema_str
            try:
                self._writers[schema_id] = parse_schema(json.loads(text), named_schemas={})
            except Exception:  # noqa: BLE001 - the deserializer reports an unusable schema in its own words
                self._writers[schema_id] = {"fields": []}
        return self._writers[schema_id]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's "no answer" errors (connection refused, timeout, DNS): the registry is down, not the record."""
    try:
        # confluent-kafka picks its HTTP client (httpx or its fork) here; its transport errors are what it raises.
        from confluent_kafka.schema_registry.common._httpx_compat import httpx

        return (httpx.TransportError, OSError)
    except ImportError:  # pragma: no cover - another confluent-kafka layout
        return (OSError,)


def _safe_url(url: str) -> str:
    """The URL without user:password@ (credentials may be written into it)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))) if parts.hostname else url


def make_codec(schema_registry_url: str | None, *, max_results: int = DEFAULT_MAX_RESULTS) -> Codec:
    if schema_registry_url:
        return RegistryCodec(schema_registry_url, max_results=max_results)
    return AvroCodec(max_results=max_results)
