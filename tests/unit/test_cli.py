import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from processor.ops.broker import free_port

ROOT = Path(__file__).resolve().parents[2]


def run(*args, env=None, input=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "processor", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, input=input,
    )


def assert_one_line_error(result, code, *fragments):
    """A failure ends with exactly one `error:` line, says what to fix, no traceback, the documented exit code."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines


def test_help_lists_the_commands_and_the_exit_codes():
    out = run("--help").stdout
    for command in ("run", "demo", "broker", "produce", "consume", "lag", "replay", "summarize", "plan", "tiny-model"):
        assert re.search(rf"\b{command}\b", out)
    assert "exit codes:" in out and "130" in out


def test_every_option_has_help():
    import argparse

    from processor.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_run_help_lists_every_setting_with_its_default():
    from processor.settings import Settings

    out = run("run", "--help").stdout
    for env in Settings.env_names().values():
        assert re.search(rf"^  {env}=", out, re.M), env
    assert "KAFKA_SESSION_TIMEOUT_MS=6000" in out, "the embedded broker's fast-join settings are named"


def test_a_bad_setting_fails_at_start_up_naming_it():
    result = run("run", env={"VLLM_GPU_MEMORY_UTILIZATION": "3"})
    assert_one_line_error(result, 2, "VLLM_GPU_MEMORY_UTILIZATION")


def test_plan_prints_the_capacity_for_a_config(tmp_path):
    from tests.unit.test_capacity import QWEN25_7B

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    result = run("plan", str(tmp_path), "--gpu-memory-gib", "12")
    assert result.returncode == 0, result.stderr
    assert "KV bytes per token         57,344 B" in result.stdout
    assert "BATCH_MAX_RECORDS" in result.stdout


def test_plan_for_a_model_that_does_not_fit_suggests_no_batch_limits(tmp_path):
    from tests.unit.test_capacity import QWEN25_7B

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    result = run("plan", str(tmp_path), "--gpu-memory-gib", "4", "--quantization", "")
    assert_one_line_error(result, 1, "does not fit", "--gpu-memory-gib")
    assert "BATCH_MAX_RECORDS" not in result.stdout and "does not fit" in result.stdout
    assert "KV cache                   -" in result.stdout, "the deficit is shown, not 0.00 GiB"


def test_missing_and_malformed_files_are_one_line_errors(tmp_path):
    assert_one_line_error(run("produce", str(tmp_path / "nope.jsonl")), 1, "cannot read", "nope.jsonl")
    assert_one_line_error(run("summarize", str(tmp_path / "nope.jsonl")), 1, "cannot read")
    assert_one_line_error(run("plan", str(tmp_path / "nope")), 1, "cannot read")
    (tmp_path / "config.json").write_text("{not json")
    assert_one_line_error(run("plan", str(tmp_path / "config.json")), 1, "not JSON")


EVENT = {"event_id": "e-1", "query": "q", "collected_at": "2026-11-20T09:30:00Z",
         "results": [{"rank": 1, "title": "t", "url": "https://example.com", "snippet": "s"}]}


def test_produce_reports_every_invalid_line_by_number_and_sends_nothing(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join([json.dumps(EVENT), "not json", "", json.dumps({**EVENT, "results": []}), json.dumps(EVENT)]) + "\n")
    # No broker on this port: validation comes first, and with invalid lines nothing is sent, so none is needed.
    result = run("produce", str(path), env={"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    lines = assert_one_line_error(result, 1, "2 of 4 line(s)", "nothing was sent", "--skip-invalid")
    assert f"{path}:2: not JSON" in lines[0]
    assert f"{path}:4: not an event (results:" in lines[1]


def test_a_malformed_line_is_named_by_its_line_and_column(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(EVENT) + "\n\n" + '{"event_id": "e-2", oops}' + "\n")
    result = run("produce", str(path), env={"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    lines = assert_one_line_error(result, 1, "1 of 2 line(s)")
    assert lines[0] == f"{path}:3: not JSON (Expecting property name enclosed in double quotes at line 3, column 21)"


def test_when_no_line_is_valid_skip_invalid_is_not_offered(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("not json\n" + json.dumps({"event_id": "x"}) + "\n")
    result = run("produce", str(path), env={"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    lines = assert_one_line_error(result, 1, "none of the 2 line(s) is a valid event", "nothing was sent")
    assert "--skip-invalid" not in lines[-1]


def test_tiny_model_says_one_line_and_nothing_before_it(tmp_path):
    result = run("tiny-model", str(tmp_path / "tiny"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"tiny random-weight Qwen2 chat model in {tmp_path / 'tiny'} (gibberish output; for wiring checks, not summaries)"]
    assert result.stderr.strip() == ""


def test_summarize_reports_invalid_lines_and_runs_no_engine(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(EVENT) + "\n" + json.dumps({"event_id": "x"}) + "\n")
    lines = assert_one_line_error(run("summarize", str(path)), 1, "1 of 2 line(s)")
    assert lines[0].startswith(f"{path}:2: not an event")


def test_summarize_of_the_model_free_engine_reports_no_token_rate():
    result = run("summarize", "--samples", env={"ENGINE": "extractive"})
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 6
    assert "no token rate (model-free engine)" in result.stderr and "tokens/s" not in result.stderr


def test_commands_fail_fast_with_one_line_when_no_broker_answers(tmp_path):
    """No broker: each command ends within ~10 s (not after a minute of librdkafka retries) with one line naming
    the address and the setting, and nothing before it: no librdkafka `FAIL … Connection refused` line."""
    (tmp_path / "e.jsonl").write_text(json.dumps(EVENT) + "\n")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    commands = [["consume"], ["consume", "--dlq"], ["lag"], ["replay", "--to", "earliest"], ["produce", str(tmp_path / "e.jsonl")],
                ["produce", "--raw", str(tmp_path / "e.jsonl")]]
    started = time.monotonic()
    processes = [subprocess.Popen([sys.executable, "-m", "processor", *c], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for c in commands]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    assert time.monotonic() - started < 30
    for result in results:
        lines = assert_one_line_error(result, 3, f"no Kafka broker answered at {env['KAFKA_BOOTSTRAP_SERVERS']}", "KAFKA_BOOTSTRAP_SERVERS")
        assert len(lines) == 1, result.stderr


def test_a_dead_schema_registry_is_one_line_with_its_exit_code(tmp_path):
    (tmp_path / "e.jsonl").write_text(json.dumps(EVENT) + "\n")
    url = f"http://127.0.0.1:{free_port()}"
    result = run("produce", str(tmp_path / "e.jsonl"), env={"SCHEMA_REGISTRY_URL": url}, timeout=90)
    assert_one_line_error(result, 6, url, "SCHEMA_REGISTRY_URL")


def test_debug_shows_the_traceback(tmp_path):
    result = run("--debug", "produce", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot read")
    assert "Traceback" in run("produce", str(tmp_path / "nope.jsonl"), "--debug").stderr, "accepted after the command too"


def test_an_unexpected_error_is_one_line_that_points_at_debug(monkeypatch, capsys):
    from processor import cli

    def boom(_args):
        raise RuntimeError("something nobody planned for")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["lag"].set_defaults(func=boom)
    assert cli.main(["lag"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: unexpected RuntimeError: something nobody planned for (run with --debug for the traceback)"


def test_ctrl_c_in_a_command_exits_130(monkeypatch, capsys):
    from processor import cli

    def interrupted(_args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["consume"].set_defaults(func=interrupted)
    assert cli.main(["consume"]) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"


def test_produce_and_summarize_need_a_file_or_a_dash():
    assert run("produce").returncode == 2
    assert run("summarize").returncode == 2
    first = (ROOT / "examples" / "events.jsonl").read_text(encoding="utf-8").splitlines()[0]
    result = run("summarize", "-", input=first + "\n", env={"ENGINE": "extractive"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["event_id"] == json.loads(first)["event_id"]


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
    assert "6 events in one generate() call" in result.stderr and "completion tokens/s" in result.stderr


def test_json_logs_carry_context_fields_as_fields():
    import logging

    from processor.logs import JsonFormatter

    record = logging.LogRecord("processor.loop", logging.WARNING, __file__, 1, "dead-lettered %s", ("x",), None)
    record.partition, record.offset, record.error_class = 3, 1234, "InvalidEventError"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "dead-lettered x" and line["level"] == "WARNING"
    assert (line["partition"], line["offset"], line["error_class"]) == (3, 1234, "InvalidEventError")


def test_broker_fails_when_its_port_is_taken():
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run("broker", "--port", str(port), timeout=30)
    assert_one_line_error(result, 2, f"port {port}", "already in use")
    assert "export KAFKA_BOOTSTRAP_SERVERS" not in result.stdout, "no success printed"


def test_a_backfill_logs_in_text_unless_log_format_asks_for_json(monkeypatch):
    """`replay --backfill` runs the worker beside a progress bar: a JSON line there is noise unless asked for."""
    from processor.ops.commands import tool_log_format
    from processor.settings import load_settings

    monkeypatch.delenv("LOG_FORMAT", raising=False)
    assert load_settings().log_format == "json", "the worker's own default stays JSON"
    assert tool_log_format(load_settings()) == "text"
    monkeypatch.setenv("LOG_FORMAT", "json")
    assert tool_log_format(load_settings()) == "json"
    monkeypatch.setenv("LOG_FORMAT", "text")
    assert tool_log_format(load_settings()) == "text"


def test_demo_honours_engine_from_the_environment(tmp_path):
    """ENGINE=transformers is not silently replaced by the extractive engine; a model that cannot load ends the demo
    in one line, before any broker is started."""
    missing = tmp_path / "no-model"
    result = run("demo", env={"ENGINE": "transformers", "TRANSFORMERS_MODEL": str(missing)}, timeout=120)
    assert_one_line_error(result, 2, str(missing), "TRANSFORMERS_MODEL")
    assert "embedded broker on" not in result.stdout
