"""Fault-suite fixtures: worker processes the test owns (killed at teardown), and the figures table printed at
the end of the run (`python -m pytest tests/fault`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES: dict[str, Any] = {}
FIGURES_FILE = Path(os.environ.get("FAULT_FIGURES", ROOT / "tests" / "fault" / "figures.json"))


class WorkerProcesses:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, env: dict[str, str], name: str = "worker") -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"{name}-{len(self.processes)}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fault.worker_main"],
            cwd=ROOT,
            env={**os.environ, "KAFKA_SESSION_TIMEOUT_MS": "6000", "KAFKA_HEARTBEAT_INTERVAL_MS": "500", "LOG_FORMAT": "json", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def log_of(self, index: int) -> str:
        matches = sorted(self.tmp_path.glob(f"*-{index}.log"))
        return matches[0].read_text(errors="replace") if matches else ""

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(10)


@pytest.fixture()
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    owned = WorkerProcesses(tmp_path)
    try:
        yield owned
    finally:
        owned.stop_all()


@pytest.fixture(scope="session")
def figures() -> dict[str, Any]:
    return FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    FIGURES_FILE.write_text(json.dumps(FIGURES, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    write = terminalreporter.write_line
    write("")
    write("fault-suite figures (also in %s)" % FIGURES_FILE.relative_to(ROOT) if FIGURES_FILE.is_relative_to(ROOT) else str(FIGURES_FILE))
    write(f"{'figure':<44} value")
    write("-" * 60)
    for section, values in sorted(FIGURES.items()):
        if isinstance(values, dict):
            for key, value in sorted(values.items()):
                write(f"{section + '.' + key:<44} {value}")
        else:
            write(f"{section:<44} {values}")
