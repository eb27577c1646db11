"""What a pair's two runs cost outside this process's interpreter: where a slower run's time went.

vLLM ≥ 0.7 (V1) runs its engine core in a process of its own; this process (the front end) takes each batch of the
core's outputs (`engine_core.get_output()`), detokenizes and assembles them. A run of the processor that is slower than
the engine alone on the same steps is either the core stepping slower (the host's CPUs shared with something: the
core of a small model is bound by its own Python and kernel launches) or the front end taking the core's outputs late
(this process's interpreter busy with something else). CoreProbe tells which; cpu_by_process() and cpu_by_thread()
say who used the CPUs meanwhile (the engine core, the embedded broker, librdkafka's threads, Python's).

Linux only (/proc); elsewhere both return {} and CoreProbe records nothing the test double does not give it.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(path: Path) -> tuple[str, int, float] | None:
    """(comm, parent pid, CPU seconds) of /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat."""
    try:
        text = path.read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / _HZ


def cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of every descendant of this process, summed by name (`VLLM::EngineCor`, `tansu`, ...)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    table: dict[int, tuple[str, int, float]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit() and (row := _stat(entry / "stat")) is not None:
            table[int(entry.name)] = row
    children: dict[int, list[int]] = {}
    for pid, (_, parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    totals: dict[str, float] = {}
    todo = list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        comm, _, cpu = table[pid]
        totals[comm] = totals.get(comm, 0.0) + cpu
        todo.extend(children.get(pid, []))
    return totals


def cpu_by_thread() -> dict[str, float]:
    """CPU seconds so far of this process's threads, summed by the kernel's thread name (librdkafka names its own:
    `rdk:main`, `rdk:broker1`, ...; Python's threads carry the interpreter's name)."""
    tasks = Path(f"/proc/{os.getpid()}/task")
    totals: dict[str, float] = {}
    if tasks.is_dir():
        for task in tasks.iterdir():
            if (row := _stat(task / "stat")) is not None:
                totals[row[0]] = totals.get(row[0], 0.0) + row[2]
    return totals


def cpu_delta(before: dict[str, float], after: dict[str, float], floor: float = 0.01) -> dict[str, float]:
    """Seconds used between two snapshots, by name; names under `floor` left out. A name gone by `after` (a process
    that ended) counts nothing."""
    delta = {name: round(after[name] - before.get(name, 0.0), 2) for name in after}
    return {name: seconds for name, seconds in sorted(delta.items(), key=lambda kv: -kv[1]) if seconds >= floor}


class CpuWindow:
    """One run's CPU outside this process's interpreter: other processes (descendants) and this process's threads."""

    def __enter__(self) -> "CpuWindow":
        self._processes, self._threads = cpu_by_process(), cpu_by_thread()
        self.processes: dict[str, float] = {}
        self.threads: dict[str, float] = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        self.processes = cpu_delta(self._processes, cpu_by_process())
        self.threads = cpu_delta(self._threads, cpu_by_thread())

    def report(self) -> dict[str, dict[str, float]]:
        return {"processes": self.processes, "threads": self.threads}


class CoreProbe:
    """Each batch of outputs vLLM's engine core sent, as this process took it: the core's own monotonic timestamp
    (set when the core made the batch; CLOCK_MONOTONIC is one clock for every process of a Linux host) and how late
    this process took it. Wraps the instance's `engine_core.get_output`, as StepCounter wraps `step`; records nothing
    for an engine without one (Transformers, the 0.6.3 double)."""

    def __init__(self, engine: Any) -> None:
        self.seen: list[tuple[float, float, float]] = []  # (taken at, perf_counter; lag s; core timestamp)
        core = getattr(getattr(getattr(engine, "llm", None), "llm_engine", None), "engine_core", None)
        get_output = getattr(core, "get_output", None)
        if get_output is None:
            return

        def timed() -> Any:
            outputs = get_output()
            stamp = getattr(outputs, "timestamp", 0.0) or 0.0
            if stamp and getattr(outputs, "outputs", None):
                self.seen.append((time.perf_counter(), time.monotonic() - stamp, stamp))
            return outputs

        core.get_output = timed

    def between(self, start: float, end: float) -> dict[str, float] | None:
        """The core's pace and the front end's lag over the batches taken in [start, end] (perf_counter)."""
        rows = [r for r in self.seen if start <= r[0] <= end]
        if len(rows) < 3:
            return None
        stamps = [r[2] for r in rows]
        gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
        lags = sorted(r[1] for r in rows)
        return {
            "core_batches": len(rows),
            "core_span_s": round(stamps[-1] - stamps[0], 3),
            "core_step_ms_median": round(1000 * statistics.median(gaps), 3),
            "core_step_ms_p90": round(1000 * gaps[int(0.9 * (len(gaps) - 1))], 3),
            "lag_ms_median": round(1000 * statistics.median(lags), 3),
            "lag_ms_p90": round(1000 * lags[int(0.9 * (len(lags) - 1))], 3),
            "lag_ms_last": round(1000 * rows[-1][1], 3),
        }
