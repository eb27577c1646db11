"""The README's local session, run as written: its three terminals' blocks, line for line, through bash, with only
the port 9092 replaced by a free one (this machine may be running a broker there)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from processor.ops.broker import free_port

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]


def terminals() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### A local session"): readme.index("## Engines")]
    blocks = re.findall(r"(?m)(?:^    \S.*\n)+", section)
    return ["\n".join(line[4:] for line in block.splitlines()) for block in blocks]


def wait_for(path: Path, pattern: str, process: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout_s:.0f} s (exit {process.poll()}):\n{path.read_text(errors='replace')[-3000:]}")


def stop(process: subprocess.Popen) -> int:
    """Ctrl-C in that terminal: SIGINT to its foreground process group."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        raise


def test_the_readme_local_session_works_as_written(tmp_path):
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("the session starts from the README's first command, which makes .venv at the repository root")
    port = str(free_port())
    broker_block, worker_block, client_block = (block.replace("9092", port) for block in terminals())
    assert "python -m processor broker" in broker_block and "python -m processor run" in worker_block
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "LOG_", "ENGINE", "BATCH_"))}
    env["PYTHONUNBUFFERED"] = "1"
    logs = {name: tmp_path / f"{name}.log" for name in ("broker", "worker")}
    started = []

    def terminal(name: str, script: str) -> subprocess.Popen:
        log = open(logs[name], "wb")
        process = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        return process

    try:
        broker = terminal("broker", broker_block)
        wait_for(logs["broker"], r"export KAFKA_BOOTSTRAP_SERVERS=127\.0\.0\.1:" + port, broker, 60)
        worker = terminal("worker", worker_block)
        joined = time.monotonic()
        wait_for(logs["worker"], r"assigned \S", worker, 60)
        assert time.monotonic() - joined < 30, "the join takes seconds with the README's settings"

        client = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", client_block], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=240)
        assert client.returncode == 0, client.stderr
        assert "Traceback" not in client.stderr and "error:" not in client.stderr
        lines = client.stdout.splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        summaries, dead = records[:6], records[6:]
        expected = [json.loads(line)["event_id"] for line in (ROOT / "examples" / "events.jsonl").read_text(encoding="utf-8").splitlines()]
        assert sorted(s["event_id"] for s in summaries) == sorted(expected)
        assert all(s["summary"] and s["source_topic"] == "search-results" for s in summaries)
        assert len(dead) == 1 and dead[0]["error_class"] == "BadMagicError"
        assert base64.b64decode(dead[0]["original_value"]) == b"not an event"
        total = next(line for line in lines if line.strip().startswith("total"))
        assert total.split()[-1] == "0", client.stdout

        assert stop(worker) == 0, logs["worker"].read_text()
        assert "Traceback" not in logs["worker"].read_text()
        assert stop(broker) == 0, logs["broker"].read_text()
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
