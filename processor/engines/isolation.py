"""A failing event does not sink its batch, and a failing engine is not blamed on the events.

When generate() raises for a batch, a known-good probe (the warm-up prompt) is asked first: if the probe fails
too, the engine (the GPU) is broken — EngineUnavailableError, infrastructure, nothing dead-lettered. Otherwise
the batch is bisected: each half is retried on its own; a single prompt that still raises is that event's failure
(→ DLQ) and every other event of the batch is published. When every event of a batch ends up failed, the probe
decides again, so a GPU that dies mid-bisection is never mistaken for a batch of poison. A lone poison event in a
batch of one is dead-lettered (the probe succeeds), so it never stalls its partition. An empty summary is a
failure too, never a summary. k bad events out of n cost about 2·k·log2(n) extra engine calls, paid only when
something fails.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from processor.engines.base import EmptySummaryError, Engine, EventGenerationError, Generation, Prompt
from processor.errors import EngineUnavailableError

log = logging.getLogger(__name__)

Probe = Callable[[], None]  # raises when the engine cannot generate a known-good prompt


class EngineCallError(EventGenerationError):
    """generate() raised for a batch holding only this event, while the engine still works for a known-good prompt."""


def probe_with(engine: Engine, prompt: Prompt) -> Probe:
    """A probe: generate the known-good prompt; raise EngineUnavailableError unless a summary comes back."""

    def probe() -> None:
        try:
            outputs = engine.generate([prompt])
        except Exception as exc:  # noqa: BLE001 - any failure here is the engine's
            raise EngineUnavailableError(f"the engine fails even on the known-good warm-up prompt: {type(exc).__name__}: {exc}") from exc
        if len(outputs) != 1 or not isinstance(outputs[0], Generation) or not outputs[0].text.strip():
            raise EngineUnavailableError(f"the engine produced no summary for the known-good warm-up prompt: {outputs!r:.300}")

    return probe


def generate_isolated(engine: Engine, prompts: Sequence[Prompt], probe: Probe | None = None) -> list[Generation | EventGenerationError]:
    """One outcome per prompt; raises EngineUnavailableError when the probe says the engine itself is broken."""
    if not prompts:
        return []
    try:
        outputs = engine.generate(prompts)
    except Exception as exc:  # noqa: BLE001 - any engine exception is what bisection must contain
        if probe is not None:
            probe()  # the engine, not the batch? then stop here: bisecting a dead GPU would dead-letter everything
        log.warning("generate() raised for a batch of %d; bisecting to isolate the failing event(s): %s", len(prompts), exc)
        outcomes = _bisect(engine, prompts, exc)
    else:
        outcomes = _one_outcome_per_prompt(engine, prompts, outputs)
    if probe is not None and all(isinstance(o, EventGenerationError) for o in outcomes):
        probe()
    return outcomes


def _bisect(engine: Engine, prompts: Sequence[Prompt], failure: BaseException) -> list[Generation | EventGenerationError]:
    if len(prompts) == 1:
        return [EngineCallError(f"{type(failure).__name__}: {failure}")]
    middle = len(prompts) // 2
    return _isolate(engine, prompts[:middle]) + _isolate(engine, prompts[middle:])


def _isolate(engine: Engine, prompts: Sequence[Prompt]) -> list[Generation | EventGenerationError]:
    try:
        outputs = engine.generate(prompts)
    except Exception as exc:  # noqa: BLE001
        return _bisect(engine, prompts, exc)
    return _one_outcome_per_prompt(engine, prompts, outputs)


def _one_outcome_per_prompt(engine: Engine, prompts: Sequence[Prompt], outputs: Sequence[Generation | EventGenerationError]) -> list[Generation | EventGenerationError]:
    """One outcome per prompt; an empty summary is a failure, never a summary."""
    if len(outputs) != len(prompts):
        raise RuntimeError(f"engine {engine.kind} returned {len(outputs)} outputs for {len(prompts)} prompts")
    return [accepted(o) for o in outputs]


def accepted(outcome: Generation | EventGenerationError) -> Generation | EventGenerationError:
    """An empty summary is a failure, never a summary — whichever path (generate() or step()) produced it."""
    if isinstance(outcome, Generation) and not outcome.text.strip():
        return EmptySummaryError(f"engine returned an empty summary (finish_reason={outcome.finish_reason})")
    return outcome
