"""The README against the code: every `python -m processor …` it shows is a command the CLI's parser accepts, every
command is in its table, its exit-code table is the one the code uses, and its example event is an event."""

import json
import re
import shlex
from pathlib import Path

import pytest

from processor import errors
from processor.cli import EXIT_CODES, build_parser
from processor.events import validate_event
from processor.ops.samples import sample_events

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
_COMMAND = re.compile(r"(?:\.venv/bin/)?python3? -m processor((?: [^`\n]*)?)")
_SYNOPSIS = re.compile(r"[\[\]()|]|\\\||^[A-Z][A-Z0-9_.]*$")


def section(heading: str, end: str) -> str:
    """From `heading` to the next `end` after it (headings move as the README is reorganised; what they hold is checked)."""
    start = README.index(heading)
    return README[start: README.index(end, start + len(heading))]


def readme_commands() -> list[str]:
    """The argument part of every `python -m processor …` in the README, cut at shell operators."""
    found = []
    for match in _COMMAND.finditer(README):
        args = re.split(r" (?:&&|;) | (?<!\\)\| ", match.group(1))[0].strip()
        if args:  # a bare `python -m processor` names the program (the image's entry point), not a command
            found.append(args)
    return found


def subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_the_readme_shows_commands_at_all():
    assert len(readme_commands()) > 20


@pytest.mark.parametrize("args", sorted(set(readme_commands())))
def test_every_readme_command_parses(args, capsys):
    tokens = shlex.split(args.replace("\\|", "|"))
    synopsis = any(_SYNOPSIS.search(t) for t in tokens)
    if not synopsis:
        try:
            build_parser().parse_args(tokens)
        except SystemExit as exc:  # --help and --version exit 0 after printing; anything else is a usage error
            assert exc.code == 0, f"`python -m processor {args}` is not a valid command: {capsys.readouterr().err}"
        return
    # A synopsis (`produce FILE [--raw]`): the command exists and takes every option shown.
    commands = subparsers()
    positional = [t for t in tokens if not t.startswith("-")]
    if positional and re.fullmatch(r"[A-Z]+", positional[0]):
        return  # `python -m processor COMMAND --help`
    command = commands[tokens[0]]
    options = {o for action in command._actions for o in action.option_strings}
    shown = {t.strip("[]()") for t in tokens if t.strip("[]()").startswith("--")}
    assert shown <= options, f"{tokens[0]} has no {shown - options}"


def test_every_command_is_in_the_readme_table():
    table = section("## Command line", "### Events")
    for name in subparsers():
        assert f"`python -m processor {name}" in table, name


def test_the_exit_code_table_is_the_code_s():
    table = section("### Exit codes", "\n## ")
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    used = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert documented == used == {code for code, _meaning in EXIT_CODES}


def test_the_readme_example_event_is_an_event():
    events = section("### Events", "\n## ")
    line = next(line.strip() for line in events.splitlines() if line.strip().startswith("{"))
    event = validate_event(json.loads(line))
    assert event.results[0].url.startswith("https://")


def test_the_example_file_holds_the_sample_events():
    lines = [json.loads(line) for line in (ROOT / "examples" / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [validate_event(e) for e in lines] == [validate_event(e) for e in sample_events()]


def test_first_lines_are_the_two_newcomer_commands():
    first = [line.strip() for line in README.splitlines()[:5] if line.strip().startswith("python3 -m venv")]
    assert len(first) == 2
    assert first[0].endswith(".venv/bin/python -m processor demo") and first[1].endswith(".venv/bin/python -m pytest")
