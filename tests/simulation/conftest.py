"""Simulation settings from the environment: SIM_SEED (one seed), SIM_EXAMPLES (schedules per combination),
SIM_FAULTS_OFF (fault classes to leave out, comma-separated), SIM_FAULTS_ONLY (the only classes to use)."""

from __future__ import annotations

import logging
import os
from typing import Iterator

import pytest

from tests.simulation.harness import enabled_kinds, quiet_logs

DEFAULT_EXAMPLES = 25


@pytest.fixture(scope="session")
def sim_seeds() -> list[int]:
    if os.environ.get("SIM_SEED"):
        return [int(os.environ["SIM_SEED"])]
    start = int(os.environ.get("SIM_FIRST_SEED", "0"))
    return list(range(start, start + int(os.environ.get("SIM_EXAMPLES", DEFAULT_EXAMPLES))))


@pytest.fixture(scope="package")
def sim_enabled() -> Iterator[frozenset[str]]:
    previous = quiet_logs()
    yield enabled_kinds(os.environ.get("SIM_FAULTS_OFF"), os.environ.get("SIM_FAULTS_ONLY"))
    logging.getLogger("processor").setLevel(previous)  # the suites after this one assert on the worker's log
