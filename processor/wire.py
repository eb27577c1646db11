"""Avro binary scanning without decoding: how many items an event's results array holds, read from the array's block
counts (Avro spec, "Arrays"), so that an event past MAX_EVENT_RESULTS is dead-lettered before a single result object
is decoded (codec.py decodes everything else)."""

from __future__ import annotations

from typing import Any

from processor.errors import RecordTooLargeError


class TooManyResultsError(RecordTooLargeError):
    """The event carries more search results than MAX_EVENT_RESULTS; decided before any result is decoded."""


class _Unscannable(Exception):
    """The body's prefix cannot be walked (truncated, or a schema shape the scan does not know): the full decode
    decides what is wrong with it."""


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """An Avro long (zigzag varint) at `pos` → (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Unscannable("varint runs past the body")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos


def _skip(schema: Any, data: bytes, pos: int) -> int:
    """The position after one value of `schema` (a fastavro-parsed schema), without building it."""
    if isinstance(schema, list):  # union: branch index, then that branch
        index, pos = _read_long(data, pos)
        if not 0 <= index < len(schema):
            raise _Unscannable("union index out of range")
        return _skip(schema[index], data, pos)
    kind = schema["type"] if isinstance(schema, dict) else schema
    if kind == "null":
        return pos
    if kind == "boolean":
        return pos + 1
    if kind in ("int", "long", "enum"):
        return _read_long(data, pos)[1]
    if kind == "float":
        return pos + 4
    if kind == "double":
        return pos + 8
    if kind in ("string", "bytes"):
        length, pos = _read_long(data, pos)
        if length < 0 or pos + length > len(data):
            raise _Unscannable("length runs past the body")
        return pos + length
    if kind == "fixed":
        return pos + int(schema["size"])
    if kind == "record" or kind == "error":
        for field in schema["fields"]:
            pos = _skip(field["type"], data, pos)
        return pos
    if kind in ("array", "map"):
        while True:
            count, pos = _read_long(data, pos)
            if count == 0:
                return pos
            if count < 0:  # a block with its byte size: jump over it
                size, pos = _read_long(data, pos)
                pos += size
                continue
            for _ in range(count):
                if kind == "map":
                    pos = _skip("string", data, pos)
                pos = _skip(schema["items"] if kind == "array" else schema["values"], data, pos)
    if isinstance(kind, dict):  # a nested type written as {"type": {...}}
        return _skip(kind, data, pos)
    raise _Unscannable(f"no scan for {kind!r}")


def count_capped(writer: dict[str, Any], data: bytes, pos: int, field_name: str, cap: int) -> int | None:
    """How many items the top-level array field `field_name` holds, read from its block counts without decoding an
    item past `cap`; raises TooManyResultsError past `cap`. None when the writer schema has no such field or the
    body cannot be walked (the full decode then reports it)."""
    try:
        for field in writer["fields"]:
            if field["name"] != field_name:
                pos = _skip(field["type"], data, pos)
                continue
            array = field["type"]
            if not (isinstance(array, dict) and array.get("type") == "array"):
                return None
            total = 0
            while True:
                count, pos = _read_long(data, pos)
                if count == 0:
                    return total
                size = None
                if count < 0:
                    count = -count
                    size, pos = _read_long(data, pos)
                total += count
                if total > cap:
                    raise TooManyResultsError(f"{field_name} holds more than {cap} items (MAX_EVENT_RESULTS): a block of {count} "
                                              f"after {total - count}")
                if size is not None:
                    pos += size
                else:
                    for _ in range(count):  # at most `cap` items are walked in all
                        pos = _skip(array["items"], data, pos)
        return None
    except _Unscannable:
        return None
