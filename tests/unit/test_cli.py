import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "processor", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def test_help_lists_the_commands():
    out = run("--help").stdout
    for command in ("run", "demo", "broker", "produce", "consume", "plan"):
        assert re.search(rf"\b{command}\b", out)


def test_a_bad_setting_fails_at_start_up_naming_it():
    result = run("run", env={"VLLM_GPU_MEMORY_UTILIZATION": "3"})
    assert result.returncode == 2
    assert "VLLM_GPU_MEMORY_UTILIZATION" in result.stderr


def test_plan_prints_the_capacity_for_a_config(tmp_path):
    from tests.unit.test_capacity import QWEN25_7B

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    result = run("plan", str(tmp_path), "--gpu-memory-gib", "12")
    assert result.returncode == 0, result.stderr
    assert "KV bytes per token         57,344 B" in result.stdout
    assert "BATCH_MAX_RECORDS" in result.stdout


def test_ci_runs_the_readme_test_command():
    readme_lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()[:5] if line.strip()]
    test_command = next(line for line in readme_lines if "pytest" in line)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_documented_in_the_readme():
    from processor.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [env for env in Settings.env_names().values() if f"`{env}`" not in readme]
    assert missing == []


def test_summarize_runs_the_configured_engine_without_kafka(tiny_model_dir):
    result = run("summarize", "--samples", env={"ENGINE": "transformers", "TRANSFORMERS_MODEL": str(tiny_model_dir),
                                                 "SAMPLING_MAX_TOKENS": "8", "VLLM_MAX_MODEL_LEN": "2048"})
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 6 and all(line["engine"] == "transformers" for line in lines)
    assert "6 events in one generate() call" in result.stderr


def test_json_logs_carry_context_fields_as_fields():
    import logging

    from processor.logs import JsonFormatter

    record = logging.LogRecord("processor.loop", logging.WARNING, __file__, 1, "dead-lettered %s", ("x",), None)
    record.partition, record.offset, record.error_class = 3, 1234, "InvalidEventError"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "dead-lettered x" and line["level"] == "WARNING"
    assert (line["partition"], line["offset"], line["error_class"]) == (3, 1234, "InvalidEventError")
