"""A failing event does not sink its batch: when generate() raises for a batch, bisect to find the culprit(s).

Each half is retried on its own; a single prompt that still raises is that event's failure (→ DLQ) and every
other event of the batch is published. An empty summary is a failure too, never a summary. A batch with k bad
events out of n costs about 2·k·log2(n) extra engine calls, paid only when something fails.
"""

from __future__ import annotations

import logging
from typing import Sequence

from processor.engines.base import EmptySummaryError, Engine, EventGenerationError, Generation, Prompt

log = logging.getLogger(__name__)


class EngineCallError(EventGenerationError):
    """generate() raised for a batch holding only this event; the message is the engine's exception."""


def generate_isolated(engine: Engine, prompts: Sequence[Prompt]) -> list[Generation | EventGenerationError]:
    if not prompts:
        return []
    try:
        outputs = engine.generate(prompts)
    except Exception as exc:  # noqa: BLE001 - any engine exception is what bisection must contain
        if len(prompts) == 1:
            return [EngineCallError(f"{type(exc).__name__}: {exc}")]
        log.warning("generate() raised for a batch of %d; bisecting to isolate the failing event(s): %s", len(prompts), exc)
        middle = len(prompts) // 2
        return generate_isolated(engine, prompts[:middle]) + generate_isolated(engine, prompts[middle:])
    if len(outputs) != len(prompts):
        raise RuntimeError(f"engine {engine.kind} returned {len(outputs)} outputs for {len(prompts)} prompts")
    return [_reject_empty(output) for output in outputs]


def _reject_empty(output: Generation | EventGenerationError) -> Generation | EventGenerationError:
    if isinstance(output, Generation) and not output.text.strip():
        return EmptySummaryError(f"engine returned an empty summary (finish_reason={output.finish_reason})")
    return output
