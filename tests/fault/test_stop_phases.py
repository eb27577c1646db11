"""Stop means stop, in real processes: SIGINT/SIGTERM during the model load, the engine warm-up and the group join
ends the worker within seconds with exit 0, and a second signal ends it at once (tests/unit/test_stop.py has the
details with fakes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from processor.ops.broker import free_port
from tests.helpers import create_topics

pytestmark = [pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]


class Process:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")
        self.process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, "LOG_FORMAT": "text", "LOG_LEVEL": "INFO", **env},
                                        stdout=self._out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, line: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.text():
            assert self.process.poll() is None, f"exited {self.process.returncode} before {line!r}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {line!r} within {timeout} s:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def stop(self, *signums: int, gap_s: float = 0.5) -> tuple[int, float]:
        """Send the signals; the exit code and the seconds from the last signal to the exit."""
        for n, signum in enumerate(signums):
            if n:
                time.sleep(gap_s)
            self.process.send_signal(signum)
        sent = time.monotonic()
        code = self.process.wait(30)
        return code, time.monotonic() - sent

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._out.close()


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[list[Process]]:
    started: list[Process] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()


def start(processes: list[Process], tmp_path: Path, args: list[str], env: dict[str, str]) -> Process:
    process = Process(args, env, tmp_path / f"p{len(processes)}.log")
    processes.append(process)
    return process


def test_a_signal_during_the_model_load_exits_0_within_seconds(processes, tmp_path, tiny_model_dir):
    worker = start(processes, tmp_path, ["-m", "processor", "run"], {
        "ENGINE": "transformers", "TRANSFORMERS_MODEL": str(tiny_model_dir), "VLLM_MAX_MODEL_LEN": "2048",
        # The Transformers engine runs micro-batches only; the continuous CI pass must not make this a config error.
        "GENERATION_MODE": "micro_batch", "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    worker.wait_for("loading the engine")
    time.sleep(0.2)  # inside the load (importing torch alone takes seconds)
    code, seconds = worker.stop(signal.SIGINT)
    assert code == 0 and seconds < 2, worker.text()[-2000:]
    assert "SIGINT while loading the engine (ENGINE=transformers): nothing is owned yet, exiting 0 now" in worker.text()


def test_a_signal_during_a_slow_warm_up_exits_0_at_once(processes, tmp_path):
    # FaultEngine has no short generation: its warm-up sleeps FAULT_DELAY_S, like a model at full length on a CPU.
    worker = start(processes, tmp_path, ["-m", "tests.fault.worker_main"], {
        "FAULT_DELAY_S": "60", "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    worker.wait_for("warming up the engine")
    code, seconds = worker.stop(signal.SIGTERM)
    assert code == 0 and seconds < 3, worker.text()[-2000:]
    assert "stopped during the engine warm-up" in worker.text() and "joining group" not in worker.text()


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_during_the_group_join_exits_0_within_seconds_and_a_second_at_once(processes, tmp_path, broker, topics, signals):
    create_topics(broker, topics, partitions=2)
    # librdkafka's default session timeout: a join takes ~23 s on the embedded broker, ~3 s on Apache Kafka.
    worker = start(processes, tmp_path, ["-m", "processor", "run"], {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_INPUT_TOPIC": topics["input"], "KAFKA_OUTPUT_TOPIC": topics["output"],
        "KAFKA_DLQ_TOPIC": topics["dlq"], "KAFKA_GROUP_ID": topics["group"], "KAFKA_SESSION_TIMEOUT_MS": "45000"})
    worker.wait_for("joining group")
    time.sleep(1.0)
    code, seconds = worker.stop(*[signal.SIGINT] * signals)
    assert code == 0, worker.text()[-2000:]
    # One signal: up to FINISH_JOIN_MAX_S for the join, then up to 5 s for librdkafka's LeaveGroup, which the broker
    # holds behind the pending JoinGroup (measured: it times out). Two: at once.
    assert seconds < (1.0 if signals == 2 else 11.0), worker.text()[-2000:]
