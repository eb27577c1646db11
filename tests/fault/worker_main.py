"""A worker process for fault tests: the real Worker, configured from the environment like `processor run`,
with an engine that can be slowed down or poisoned, and a trace of every assignment and commit (JSON lines) so
tests can check ownership from outside. Run: python -m tests.fault.worker_main"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any, Sequence

# A SIGTERM during start-up (imports, warm-up) is an orderly stop too, as in `processor run`.
early_stop: list[int] = []
if __name__ == "__main__":
    for _signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signum, lambda *_: early_stop.append(1))

from processor.engines.base import Generation
from processor.engines.extractive import ExtractiveEngine
from processor.logs import configure_logging
from processor.loop import Worker
from processor.settings import load_settings


class FaultEngine(ExtractiveEngine):
    """Extractive, plus: FAULT_DELAY_S per generate(); raises for event ids containing 'engine-raise';
    returns an empty summary for ids containing 'engine-empty'."""

    def __init__(self, delay_s: float, die_after_calls: int | None = None) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.die_after_calls = die_after_calls  # then every call raises, like a GPU lost to an illegal memory access
        self.calls = 0

    def generate(self, prompts: Sequence[Any]) -> list[Any]:
        self.calls += 1
        if self.die_after_calls is not None and self.calls > self.die_after_calls:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        if self.delay_s:
            time.sleep(self.delay_s)
        if any("engine-raise" in p.event.event_id for p in prompts):
            raise RuntimeError("CUDA error: device-side assert triggered (injected)")
        return [
            Generation("   ", "stop", p.prompt_tokens, 0) if "engine-empty" in p.event.event_id else out
            for p, out in zip(prompts, super().generate(prompts))
        ]


class TracingConsumer:
    """Wraps the real consumer: every commit is written with librdkafka's own view of the assignment at that moment."""

    def __init__(self, consumer: Any, trace: Any) -> None:
        self._consumer = consumer
        self._trace = trace

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        assignment = sorted(tp.partition for tp in self._consumer.assignment())
        result = self._consumer.commit(*args, **kwargs)
        offsets = {tp.partition: tp.offset for tp in kwargs.get("offsets", [])}
        self._write({"commit": offsets, "assigned": assignment})
        return result

    def _write(self, record: dict[str, Any]) -> None:
        self._trace.write(json.dumps({"t": time.time(), "pid": os.getpid(), **record}) + "\n")
        self._trace.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def main() -> int:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test can ask a stuck worker where it is
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    consumer = None
    trace_path = os.environ.get("FAULT_TRACE")
    if trace_path:
        from processor.clients import consumer_config, make_consumer

        consumer = TracingConsumer(make_consumer(consumer_config(settings)), open(trace_path, "a", encoding="utf-8"))
    die_after = os.environ.get("FAULT_DIE_AFTER_CALLS")
    engine = FaultEngine(float(os.environ.get("FAULT_DELAY_S", "0")), int(die_after) if die_after else None)
    worker = Worker(settings, engine, consumer=consumer)
    worker.install_signal_handlers()
    if early_stop:
        worker.request_stop()
    started = time.monotonic()
    code = worker.run()
    print(json.dumps({"exit": code, "seconds": time.monotonic() - started, "committed": worker.records_committed}), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
