"""The real Worker, seeded fault schedules, every generation mode × processing guarantee.

Each combination runs its schedules (SIM_EXAMPLES, default 25; SIM_SEED=S for one) and fails with every invariant
violation grouped by class, each with a seed and the command that replays it. See harness.py for the model and the
invariants; SIM_FAULTS_OFF=crash,engine_hang (or a prefix: hostile_) leaves fault classes out, SIM_FAULTS_ONLY=...
uses only those.
"""

from __future__ import annotations

import time

import pytest

from tests.simulation.harness import GUARANTEES, MODES, report, run_schedule

COMBINATIONS = [(mode, guarantee) for mode in MODES for guarantee in GUARANTEES]


@pytest.mark.parametrize(("mode", "guarantee"), COMBINATIONS, ids=[f"{m}-{g}" for m, g in COMBINATIONS])
def test_no_invariant_breaks_under_seeded_faults(mode: str, guarantee: str, sim_seeds: list[int], sim_enabled: frozenset[str]) -> None:
    started = time.monotonic()
    results = [run_schedule(seed, mode, guarantee, sim_enabled) for seed in sim_seeds]
    failing = [r for r in results if r.violations]
    if failing:
        pytest.fail(f"{len(failing)} of {len(results)} schedule(s) broke an invariant ({mode}, {guarantee}, "
                    f"{time.monotonic() - started:.0f} s):\n{report(failing)}", pytrace=False)


def test_a_seed_replays_the_same_fault_schedule() -> None:
    """Determinism of the schedule itself: the same seed draws the same classes, rate, log and group protocol."""
    from tests.simulation.harness import FAULT_KINDS, Simulation

    a, b = Simulation(7, "micro_batch", "exactly_once"), Simulation(7, "micro_batch", "exactly_once")
    assert a.plan.kinds == b.plan.kinds and a.plan.rate == b.plan.rate and a.cooperative == b.cooperative
    assert [[r.value for r in a.cluster.log[p]] for p in a.cluster.log] == [[r.value for r in b.cluster.log[p]] for p in b.cluster.log]
    c = Simulation(7, "micro_batch", "exactly_once", FAULT_KINDS - {"crash"})
    assert c.plan.kinds == a.plan.kinds - {"crash"}, "turning a class off leaves the rest of the schedule as it was"
