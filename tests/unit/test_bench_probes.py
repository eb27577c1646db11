"""bench/probes.py: where a pair's run spent its time outside this process's interpreter."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.probes import CoreProbe, CpuWindow, cpu_delta


class _Core:
    """An engine core's client: each batch of outputs stamped `made_ago` seconds before it is taken."""

    def __init__(self, made_ago: list[float]) -> None:
        self.made_ago = list(made_ago)

    def get_output(self) -> SimpleNamespace:
        return SimpleNamespace(timestamp=time.monotonic() - self.made_ago.pop(0), outputs=[object()])


def _engine(core: _Core) -> SimpleNamespace:
    return SimpleNamespace(llm=SimpleNamespace(llm_engine=SimpleNamespace(engine_core=core)))


def test_the_core_probe_reports_how_late_the_front_end_took_the_cores_outputs() -> None:
    core = _Core([0.001, 0.001, 0.001, 0.050])
    engine = _engine(core)
    probe = CoreProbe(engine)
    started = time.perf_counter()
    for _ in range(4):
        engine.llm.llm_engine.engine_core.get_output()
    figures = probe.between(started, time.perf_counter())
    assert figures is not None
    assert figures["core_batches"] == 4
    assert figures["lag_ms_last"] >= 49.0  # the last batch waited 50 ms for the front end
    assert figures["lag_ms_median"] < 20.0


def test_the_core_probe_counts_only_batches_taken_in_the_window_and_records_nothing_without_a_core() -> None:
    engine = _engine(_Core([0.0] * 6))
    probe = CoreProbe(engine)
    for _ in range(3):
        engine.llm.llm_engine.engine_core.get_output()
    middle = time.perf_counter()
    for _ in range(3):
        engine.llm.llm_engine.engine_core.get_output()
    assert probe.between(middle, time.perf_counter())["core_batches"] == 3
    assert probe.between(0.0, 0.0) is None
    assert CoreProbe(SimpleNamespace(llm=object())).seen == []


def test_cpu_delta_keeps_what_grew_by_at_least_the_floor_largest_first() -> None:
    assert cpu_delta({"a": 1.0, "b": 2.0}, {"a": 1.5, "b": 2.001, "c": 0.9}) == {"c": 0.9, "a": 0.5}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_a_cpu_window_counts_a_busy_child_process_by_its_name() -> None:
    # Other children of the test process (a broker started by a fixture) may use CPU meanwhile: the assertion is
    # about this one, by its name, and the window closes once it has said it is done.
    busy = ("import sys, time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
            "print('done', flush=True)\nsys.stdin.read()\n")
    name = Path(sys.executable).name[:15]  # the kernel's process name: the executable's, cut at 15 characters
    with CpuWindow() as window:
        child = subprocess.Popen([sys.executable, "-c", busy], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready and child.stdout.readline().strip() == b"done"
    child.communicate(b"", timeout=10)
    assert window.processes.get(name, 0.0) >= 0.25, window.report()
