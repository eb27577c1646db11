"""Logging: text lines keep the structured fields, client lines are deduplicated and rate-limited, and a status line
(the backfill's progress bar) never tears a log line."""

import io
import logging

from processor.logs import RepeatFilter, StatusAwareHandler, TextFormatter, client_log_filter, configure_logging, open_status_line

LIBRDKAFKA_LINE = "FAIL [rdkafka#consumer-{n}] [thrd:127.0.0.1:9092/bootstrap]: 127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after {ms}ms in state CONNECT)"


def record(msg, name="librdkafka", level=logging.ERROR, **extra):
    rec = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_text_lines_keep_the_structured_fields():
    rec = record("dead-lettered in[2]@7: BadMagicError", name="processor.loop", level=logging.WARNING,
                 partition=2, offset=7, event_id=None, error_message="value is not Avro", limits={"records": 22})
    line = TextFormatter().format(rec)
    assert line.endswith('dead-lettered in[2]@7: BadMagicError partition=2 offset=7 event_id=None '
                         'error_message="value is not Avro" limits="{\\"records\\": 22}"')


def test_text_fields_go_on_the_message_line_before_a_traceback():
    try:
        raise ValueError("x")
    except ValueError:
        import sys

        rec = logging.LogRecord("p", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    rec.partition = 1
    first, *rest = TextFormatter().format(rec).splitlines()
    assert first.endswith("failed partition=1") and rest[0].startswith("Traceback")


def test_the_same_client_line_passes_once_per_window_with_a_count_of_its_repeats():
    clock = Clock()
    repeats = RepeatFilter(window_s=60, clock=clock)
    assert repeats.filter(record(LIBRDKAFKA_LINE.format(n=1, ms=0)))
    passed = 0
    for i in range(500):  # a down broker: many lines a second, numbers varying, from several clients
        clock.now += 0.05
        passed += repeats.filter(record(LIBRDKAFKA_LINE.format(n=i % 3, ms=i)))
    assert passed == 0
    clock.now += 60
    again = record(LIBRDKAFKA_LINE.format(n=1, ms=0))
    assert repeats.filter(again)
    assert "repeated 500 more time(s)" in again.getMessage()


def test_the_error_callback_and_librdkafka_saying_the_same_thing_print_once():
    repeats = RepeatFilter(window_s=60, clock=Clock())
    assert repeats.filter(record(LIBRDKAFKA_LINE.format(n=1, ms=0)))
    ours = record("kafka client: 127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused "
                  "(after 3ms in state CONNECT)", name="processor.loop", level=logging.WARNING,
                  client_error="127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 3ms in state CONNECT)")
    assert not repeats.filter(ours)


def test_the_filter_leaves_other_lines_of_a_logger_alone():
    """The worker's logger carries dead-letter lines too: only its client-error lines are deduplicated."""
    repeats = RepeatFilter(window_s=60, burst=2, clock=Clock())
    others = [record("dead-lettered in[0]@7: BadMagicError", name="processor.loop", level=logging.WARNING) for _ in range(10)]
    assert all(repeats.filter(r) for r in others)
    client = [record("kafka client: x", name="processor.loop", client_error="1/1 brokers are down") for _ in range(3)]
    assert [repeats.filter(r) for r in client] == [True, False, False]


def test_distinct_client_lines_are_rate_limited_and_the_drop_is_counted():
    clock = Clock()
    repeats = RepeatFilter(window_s=60, burst=5, clock=clock)
    passed = [repeats.filter(record(f"line {chr(65 + i)}")) for i in range(20)]
    assert sum(passed) == 5
    clock.now += 61
    later = record("another line")
    assert repeats.filter(later) and "15 other client line(s) suppressed" in later.getMessage()


def test_configure_logging_filters_librdkafka(capsys):
    configure_logging("text", "INFO")
    client_log_filter().reset()  # other tests' client lines (a closed port's "Connection refused") were seen already
    try:
        for i in range(50):
            logging.getLogger("librdkafka").error(LIBRDKAFKA_LINE.format(n=i, ms=i))
        assert capsys.readouterr().err.count("Connection refused") == 1
        assert client_log_filter() in logging.getLogger("librdkafka").filters
    finally:
        logging.getLogger().handlers[:] = []
        client_log_filter().reset()


def test_a_log_line_never_lands_inside_the_progress_bar():
    stream = io.StringIO()
    handler = StatusAwareHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.status")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        status = open_status_line(stream)
        status.show("[#####.....] 5/10")
        logger.warning("consumer error: broker down")
        status.show("[######....] 6/10")
        status.close()
    finally:
        logger.removeHandler(handler)
    screen = render(stream.getvalue())
    assert screen == ["consumer error: broker down", "[######....] 6/10"]


def render(output: str) -> list[str]:
    """What a terminal shows: `\\r` returns to the line's start and overwrites; `\\n` ends the line."""
    lines, current = [], []
    column = 0
    for char in output:
        if char == "\n":
            lines.append("".join(current).rstrip())
            current, column = [], 0
        elif char == "\r":
            column = 0
        else:
            if column < len(current):
                current[column] = char
            else:
                current.append(char)
            column += 1
    if current:
        lines.append("".join(current).rstrip())
    return lines


def test_progress_off_a_terminal_prints_plain_lines():
    from processor.ops.offsets import Progress

    out = io.StringIO()
    progress = Progress(10, out=out)
    progress.update(3, force=True)
    progress.update(10, force=True)
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "3/10" in lines[0] and "10/10" in lines[1] and "\r" not in out.getvalue()
