"""A failing event does not sink its batch, and a failing engine is not blamed on the events.

When generate() raises for a batch (or answers with the wrong number of outputs), a known-good probe (the warm-up
prompt) is asked first: if the probe fails too, the engine (the GPU) is broken — EngineUnavailableError,
infrastructure, nothing dead-lettered. Otherwise the batch is bisected: each half is retried on its own, down to
single prompts. Before any event's failure stands — raised alone, an error or an empty summary — each failed event
gets one more try on its own, with the probe asked right before and right after it: an engine that was sick for a
few calls (failing every request, say) is caught by a probe or recovers on the retry, and only what fails again
alone between two passing probes is the event's own (→ DLQ). A lone poison event in a batch of one is dead-lettered that way, so it never
stalls its partition. k bad events out of n cost about 2·k·log2(n) + 2k + 2 extra engine calls, paid only when
something fails.

FailurePolicy is the one place both generation modes ask before a failed outcome becomes a dead letter: micro-
batches through generate_isolated(), the continuous feed (whose failures arrive request by request) by resubmitting
a failed request once, then holding what failed twice and settling it through the same generate_isolated().
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from processor.engines.base import EmptySummaryError, Engine, EventGenerationError, Generation, Prompt
from processor.errors import EngineUnavailableError

log = logging.getLogger(__name__)

Probe = Callable[[], None]  # raises when the engine cannot generate a known-good prompt
Outcome = Generation | EventGenerationError

# Continuous mode: failed outcomes in a row (no summary finished between them) after which the probe is asked. A
# healthy engine on real data almost never fails this many requests in a row, and an engine that answers every
# request with nothing gets there within its first window; a shorter run (a lone poison event) waits for a summary
# to clear it, or is probed once nothing else is left in flight.
PROBE_AFTER_FAILED_IN_A_ROW = 8


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
    """One outcome per prompt; raises EngineUnavailableError when the probe says the engine itself is broken.

    A call that raises or answers with the wrong number of outputs is bisected. Before any event's failure stands,
    the probe is asked (an engine that fails a known-good prompt now is broken, and nothing is the events' fault) and
    each failed event gets one more try on its own: a transient engine error, or one that hit every request of a few
    calls, never costs a good event; only what fails again alone, with the probe passing, is the event's own."""
    if not prompts:
        return []
    try:
        outcomes = _attempt(engine, prompts)
    except Exception as exc:  # noqa: BLE001 - any engine exception is what bisection must contain
        if probe is not None:
            probe()  # the engine, not the batch? then stop here: bisecting a dead GPU would dead-letter everything
        log.warning("generate() failed for a batch of %d; bisecting to isolate the failing event(s): %s", len(prompts), exc)
        outcomes = _bisect(engine, prompts)
    if not any(isinstance(o, EventGenerationError) for o in outcomes):
        return outcomes
    if probe is not None:
        probe()
    return _second_try_alone(engine, prompts, outcomes, probe)


def _second_try_alone(engine: Engine, prompts: Sequence[Prompt], outcomes: list[Outcome], probe: Probe | None = None) -> list[Outcome]:
    """Each failed outcome of a batch call, once more on its own. A failure on its own stands only with the probe
    passing right before it (the caller's, or the previous event's) and right after it: an engine fault lasting two
    calls or more is then always caught by a probe, whichever retries it strikes."""
    retried = list(outcomes)
    for index, outcome in enumerate(outcomes):
        if not isinstance(outcome, EventGenerationError):
            continue
        try:
            retried[index] = _attempt(engine, [prompts[index]])[0]
        except Exception as exc:  # noqa: BLE001 - raising on its own, after failing in the batch: the event's
            retried[index] = EngineCallError(f"{type(exc).__name__}: {exc}")
        if probe is not None and isinstance(retried[index], EventGenerationError):
            probe()
    return retried


def confirm_failures(outcomes: list[Outcome], probe: Probe | None) -> list[Outcome]:
    """When every outcome failed, the probe decides: it raises EngineUnavailableError (the engine, not the records:
    nothing becomes a dead letter) or the failures stand as the records' own."""
    if probe is not None and outcomes and all(isinstance(o, EventGenerationError) for o in outcomes):
        probe()
    return outcomes


class FailurePolicy:
    """Engine broken or records bad: decided here, by the known-good probe, for both generation modes.

    * a batch (micro_batch, or continuous work retried after an engine failure): generate(), which bisects a
      raising batch and probes when it raised or when every event failed;
    * outcomes reported one by one (continuous): the scheduler holds failed outcomes while `wants_probe()` says
      nothing has cleared them yet, then confirm() probes; a failing probe raises EngineUnavailableError and the
      held work is retried like any engine failure, never dead-lettered.
    Both run on the engine's own thread (the probe is an engine call)."""

    def __init__(self, probe_prompt: Prompt, *, probe_after: int = PROBE_AFTER_FAILED_IN_A_ROW) -> None:
        self.probe_prompt = probe_prompt
        self.probe_after = max(1, probe_after)

    def probe(self, engine: Engine) -> Probe:
        return probe_with(engine, self.probe_prompt)

    def generate(self, engine: Engine, prompts: Sequence[Prompt]) -> list[Outcome]:
        return generate_isolated(engine, prompts, self.probe(engine))

    def confirm(self, engine: Engine, outcomes: list[Outcome]) -> list[Outcome]:
        return confirm_failures(outcomes, self.probe(engine))

    def wants_probe(self, failed_in_a_row: int, more_coming: bool) -> bool:
        """Whether failures reported one by one must be probed now: a run long enough to suspect the engine, or
        failures that no summary can clear any more (nothing else in flight)."""
        return failed_in_a_row >= self.probe_after or (failed_in_a_row > 0 and not more_coming)


def _bisect(engine: Engine, prompts: Sequence[Prompt]) -> list[Generation | EventGenerationError]:
    if len(prompts) == 1:
        try:
            return _attempt(engine, prompts)
        except Exception as exc:  # noqa: BLE001 - failed alone: it gets one more try alone once the batch is settled
            log.warning("generate() failed for one event on its own: %s", exc)
            return [EngineCallError(f"{type(exc).__name__}: {exc}")]
    middle = len(prompts) // 2
    return _isolate(engine, prompts[:middle]) + _isolate(engine, prompts[middle:])


def _isolate(engine: Engine, prompts: Sequence[Prompt]) -> list[Generation | EventGenerationError]:
    try:
        outcomes = _attempt(engine, prompts)
    except Exception as exc:  # noqa: BLE001
        log.debug("generate() failed for %d prompt(s): %s", len(prompts), exc)
        if len(prompts) == 1:  # failed alone: it gets one more try alone once the batch is settled
            return [EngineCallError(f"{type(exc).__name__}: {exc}")]
        return _bisect(engine, prompts)
    return outcomes  # failed outcomes get their try alone once the whole batch is settled (generate_isolated)


class OutputCountError(RuntimeError):
    """generate() answered with another number of outputs than prompts: the call failed, whichever event caused it."""


def _attempt(engine: Engine, prompts: Sequence[Prompt]) -> list[Outcome]:
    """One generate() call: one accepted outcome per prompt, or it raises (a wrong output count counts as raising)."""
    outputs = engine.generate(prompts)
    if len(outputs) != len(prompts):
        raise OutputCountError(f"engine {engine.kind} returned {len(outputs)} outputs for {len(prompts)} prompts")
    return [accepted(o) for o in outputs]


def accepted(outcome: Generation | EventGenerationError) -> Generation | EventGenerationError:
    """An empty summary is a failure, never a summary — whichever path (generate() or step()) produced it."""
    if isinstance(outcome, Generation) and not outcome.text.strip():
        return EmptySummaryError(f"engine returned an empty summary (finish_reason={outcome.finish_reason})")
    return outcome
