"""Prometheus metrics and the /healthz, /readyz endpoints, on METRICS_PORT.

Health is asked when the probe comes, not reported by the loop: /healthz fails when the loop stopped turning or an
engine call has not returned for longer than ENGINE_CALL_TIMEOUT_S (a hung engine), /readyz also while partitions
are held without the engine making progress on them.

Each Worker owns its registry, so several workers (tests, benchmarks) never clash over global collectors.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


if TYPE_CHECKING:
    from processor.generation import BatchStats
    from processor.quality import Quality
    from processor.records import OutgoingRecord

HEALTHY_WITHIN_S = 60.0


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_in = Counter("ai_worker_events_consumed", "Records consumed from the input topic", ["partition"], registry=r)
        self.summaries_out = Counter("ai_worker_summaries_published", "Summaries acknowledged on the output topic", registry=r)
        self.dead_letters = Counter("ai_worker_dead_letters", "Records acknowledged on the DLQ, by error class", ["reason"], registry=r)
        self.batch_size = Histogram(
            "ai_worker_batch_events", "Events per engine call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.batch_latency = Histogram(
            "ai_worker_batch_generate_seconds",
            "Wall time of one generate() call",
            buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.prompt_tokens = Counter("ai_worker_prompt_tokens", "Prompt tokens sent to the engine", registry=r)
        self.completion_tokens = Counter("ai_worker_completion_tokens", "Tokens generated", registry=r)
        self.tokens_per_second = Gauge("ai_worker_generation_tokens_per_second", "Completion tokens/s of the last batch", registry=r)
        self.engine_busy = Counter("ai_worker_engine_busy_seconds", "Time the engine spent in generate()", registry=r)
        self.engine_idle = Counter("ai_worker_engine_idle_seconds", "Time the engine waited for a batch", registry=r)
        self.committed_offset = Gauge("ai_worker_committed_offset", "Last committed offset", ["topic", "partition"], registry=r)
        self.lag = Gauge("ai_worker_consumer_lag", "High watermark − committed offset", ["topic", "partition"], registry=r)
        # ENGINE=openai: the server's side of generation.
        self.server_request_latency = Histogram(
            "ai_worker_server_request_seconds",
            "Wall time of one request to the OpenAI-compatible server (ENGINE=openai), sent to answered",
            buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.server_in_flight = Gauge("ai_worker_server_requests_in_flight", "Requests the OpenAI-compatible server holds now", registry=r)
        self.server_retries = Counter(
            "ai_worker_server_retries", "Requests to the OpenAI-compatible server that failed as infrastructure and are "
            "retried, by cause (connection, timeout, rate_limited, server_error, http_401/403/404, http_other)", ["cause"], registry=r,
        )
        self._server_reachable: Callable[[], bool] = lambda: True
        # Quality signals of acknowledged summaries (processor/quality.py): shares follow from these over summaries_out.
        self.summaries_cut_off = Counter("ai_worker_summaries_cut_off", "Summaries the engine stopped at SAMPLING_MAX_TOKENS", registry=r)
        self.summaries_loop_trimmed = Counter("ai_worker_summaries_loop_trimmed", "Summaries cut before a repetition loop", registry=r)
        self.summaries_uncited = Counter("ai_worker_summaries_uncited", "Summaries citing no result of their event", registry=r)
        self.citations_out_of_range = Counter(
            "ai_worker_summary_citations_out_of_range", "[n] markers naming no result of the event", registry=r
        )
        self.summaries_language_mismatch = Counter(
            "ai_worker_summaries_language_mismatch", "Summaries not in the script of the language asked for", registry=r
        )
        self.summaries_prompt_echo = Counter(
            "ai_worker_summaries_prompt_echo", "Summaries that copy the prompt's own markup back", registry=r
        )
        self.grounded_share = Histogram(
            "ai_worker_summary_grounded_share", "Share of a summary's content words found in its query and results",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r,
        )
        self._consumed_children: dict[int, Any] = {}
        self._heartbeat = time.monotonic()
        self._engine_loaded = False
        self._assigned = False
        self._engine_stalled_for: Callable[[], float] = lambda: 0.0
        self._engine_deadline_s = float("inf")
        self._server: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------------------------- loop callbacks
    def heartbeat(self) -> None:
        self._heartbeat = time.monotonic()

    def ready(self, engine_loaded: bool, assigned: bool) -> None:
        self._engine_loaded, self._assigned = engine_loaded, assigned

    def watch_engine(self, stalled_for: Callable[[], float], deadline_s: float) -> None:
        """How long the engine call running now has not returned (asked at each /healthz, /readyz), and how long is
        too long (ENGINE_CALL_TIMEOUT_S)."""
        self._engine_stalled_for, self._engine_deadline_s = stalled_for, deadline_s

    def watch_server(self, reachable: Callable[[], bool]) -> None:
        """ENGINE=openai: whether the server answered last time (asked at each /readyz)."""
        self._server_reachable = reachable

    def consumed(self, tp: tuple[str, int]) -> None:
        child = self._consumed_children.get(tp[1])
        if child is None:  # labels() costs more than the increment: once per partition, not per record
            child = self._consumed_children[tp[1]] = self.events_in.labels(str(tp[1]))
        child.inc()

    def batch_done(self, stats: "BatchStats") -> None:
        """One engine call (micro-batch) or one finished request (continuous)."""
        self.batch_size.observe(stats.events)
        self.batch_latency.observe(stats.seconds)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(stats.completion_tokens)
        if stats.seconds > 0:
            self.tokens_per_second.set(stats.completion_tokens / stats.seconds)

    def engine_idle_for(self, seconds: float) -> None:
        self.engine_idle.inc(seconds)

    def engine_busy_for(self, seconds: float) -> None:
        self.engine_busy.inc(seconds)

    def acknowledged(self, record: "OutgoingRecord") -> None:
        if record.is_dead_letter:
            # The label is the error's class (records.reason_of), never input data: bounded.
            self.dead_letters.labels(record.reason).inc()
        else:
            self.summaries_out.inc()
            if record.quality is not None:
                self._quality(record.quality)

    def _quality(self, quality: "Quality") -> None:
        self.summaries_cut_off.inc(quality.cut_off)
        self.summaries_loop_trimmed.inc(quality.loop_trimmed)
        self.summaries_uncited.inc(quality.citations == 0)
        self.citations_out_of_range.inc(quality.citations_out_of_range)
        self.summaries_language_mismatch.inc(quality.language_mismatch)
        self.summaries_prompt_echo.inc(quality.prompt_echo)
        self.grounded_share.observe(quality.grounded_share)

    def committed(self, tp: tuple[str, int], offset: int) -> None:
        self.committed_offset.labels(tp[0], str(tp[1])).set(offset)

    def lag_observed(self, tp: tuple[str, int], high_watermark: int, committed: int) -> None:
        self.lag.labels(tp[0], str(tp[1])).set(max(0, high_watermark - committed))

    def forget(self, tp: tuple[str, int]) -> None:
        for gauge in (self.committed_offset, self.lag):
            try:
                gauge.remove(tp[0], str(tp[1]))
            except KeyError:
                pass

    # ------------------------------------------------------------------------------------------ HTTP
    @property
    def engine_stalled(self) -> bool:
        """An engine call has not returned for longer than its deadline: the engine is hung."""
        return self._engine_stalled_for() > self._engine_deadline_s

    @property
    def healthy(self) -> bool:
        return time.monotonic() - self._heartbeat < HEALTHY_WITHIN_S and not self.engine_stalled

    @property
    def is_ready(self) -> bool:
        return self._engine_loaded and self._assigned and not self.engine_stalled and self.server_reachable

    @property
    def server_reachable(self) -> bool:
        return self._server_reachable()

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.startswith("/metrics"):
                    self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif self.path.startswith("/healthz"):
                    healthy, stalled = metrics.healthy, metrics.engine_stalled
                    self._reply(200 if healthy else 503, b"ok\n" if healthy else b"engine stalled\n" if stalled else b"loop stalled\n")
                elif self.path.startswith("/readyz"):
                    ready, stalled = metrics.is_ready, metrics.engine_stalled
                    why = b"engine stalled\n" if stalled else b"engine loading or no partitions\n"
                    if not ready and not stalled and not metrics.server_reachable:
                        why = b"server unreachable\n"
                    self._reply(200 if ready else 503, b"ready\n" if ready else why)
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
