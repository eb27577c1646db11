"""The validated shape of an input event (pydantic), between the codec and the batcher."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from processor.errors import RecordError


class InvalidEventError(RecordError):
    """The record decoded but breaks the event contract (empty query, no results, ...); it goes to the DLQ."""


class SearchResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    rank: int = Field(ge=1)
    title: str
    url: str
    snippet: str
    content: str | None = None


class SearchEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    event_id: str = Field(min_length=1, max_length=512)
    query: str = Field(min_length=1)
    results: tuple[SearchResult, ...] = Field(min_length=1)
    collected_at: datetime
    language: str | None = None
    search_engine: str | None = None

    @field_validator("event_id", "query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("results")
    @classmethod
    def _by_rank(cls, results: tuple[SearchResult, ...]) -> tuple[SearchResult, ...]:
        # Producers do not always send results in rank order; the prompt packer relies on it.
        return tuple(sorted(results, key=lambda r: r.rank))


def validate_event(record: dict[str, Any]) -> SearchEvent:
    """Turn a decoded Avro record into a SearchEvent or raise InvalidEventError saying which field is wrong."""
    try:
        return SearchEvent.model_validate(record)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'event'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise InvalidEventError(details) from None
