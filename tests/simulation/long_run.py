"""A long simulation run over many processes: `python -m tests.simulation.long_run --schedules 20000 --processes 16`.

The pytest entry (`SIM_EXAMPLES=N python -m pytest tests/simulation`) runs the combinations one after another in
one process. A schedule spends most of its wall time waiting (the fault phase, timeouts, the engine's thread), so a
long run is spread over more processes than cores. The schedules are split evenly over the four generation-mode ×
processing-guarantee combinations, each process taking every `processes`-th seed of one combination. Every failing
schedule is printed with its replay command; the last line is one JSON object with the totals. Bounded by
`--time-limit`: what has not started by then is counted as not run, never as passed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from typing import Any

from tests.simulation.harness import GUARANTEES, MODES, enabled_kinds, quiet_logs, report, run_schedule


def _work(args: tuple[str, str, list[int], float, str | None, str | None]) -> dict[str, Any]:
    mode, guarantee, seeds, deadline, off, only = args
    quiet_logs()
    enabled = enabled_kinds(off, only)
    ran, failing = 0, []
    for seed in seeds:
        if time.time() >= deadline:
            break
        result = run_schedule(seed, mode, guarantee, enabled)
        ran += 1
        if result.violations:
            failing.append(report([result]))
    return {"mode": mode, "guarantee": guarantee, "ran": ran, "failing": failing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=20_000, help="schedules in all (split over the 4 combinations)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--first-seed", type=int, default=int(os.environ.get("SIM_FIRST_SEED", "0")))
    parser.add_argument("--time-limit", type=float, default=3600.0, help="seconds; schedules not started by then are not run")
    args = parser.parse_args(argv)

    combinations = [(mode, guarantee) for mode in MODES for guarantee in GUARANTEES]
    per_combination = args.schedules // len(combinations)
    per_process = max(1, args.processes // len(combinations))
    deadline = time.time() + args.time_limit
    off, only = os.environ.get("SIM_FAULTS_OFF"), os.environ.get("SIM_FAULTS_ONLY")
    jobs = []
    for mode, guarantee in combinations:
        seeds = list(range(args.first_seed, args.first_seed + per_combination))
        jobs += [(mode, guarantee, seeds[i::per_process], deadline, off, only) for i in range(per_process)]
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.map(_work, jobs, chunksize=1)
    totals: dict[str, dict[str, int]] = {}
    for result in results:
        key = f"{result['mode']}/{result['guarantee']}"
        entry = totals.setdefault(key, {"ran": 0, "failing": 0})
        entry["ran"] += result["ran"]
        entry["failing"] += len(result["failing"])
        for text in result["failing"]:
            print(text, flush=True)
    ran = sum(t["ran"] for t in totals.values())
    failing = sum(t["failing"] for t in totals.values())
    print(json.dumps({"schedules_run": ran, "schedules_asked": per_combination * len(combinations), "failing": failing,
                      "seconds": round(time.monotonic() - started, 1), "processes": len(jobs), "first_seed": args.first_seed,
                      "per_combination": totals}))
    return 1 if failing else 0


if __name__ == "__main__":
    raise SystemExit(main())
