"""The demo's progress line: a model on a CPU takes minutes, so the demo says how far it got while it waits."""

import io
import time

from processor.ops.demo import Progress


def test_progress_prints_a_line_per_interval_and_stops_with_the_worker():
    out, done = io.StringIO(), iter(range(100))
    with Progress(out, 6, lambda: next(done), every_s=0.02):
        time.sleep(0.15)
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 10 and lines[0].startswith("  … 0 of 6 summaries after")
    settled = len(out.getvalue())
    time.sleep(0.05)
    assert len(out.getvalue()) == settled  # nothing after the worker stopped
