"""The pipeline: one consumed record in, its outgoing record (summary or dead letter) out — intake → scheduler →
records behind five calls, the same in both GENERATION_MODEs, so the loop never asks which mode it runs.

    submit(source)   intake decodes and prompts it, the scheduler takes it (a record that failed before the engine
                     is an item with an error: the skip marker, arroyo's FilteredPayload, that passes the engine by
                     and keeps its place in the order)
    take()           outgoing records for what finished (any order; the checkpoint restores commit order)
    wanted()         how many records the engine wants now
    drop(partitions) forget work of revoked partitions
    finish(timeout)  stop taking work, wait for what is generating, return what finished

`make_pipeline` builds it once per mode from the settings, the engine and the codec: a new stage (a cache, say) is a
new module and one line here. Infrastructure failures propagate (RegistryUnavailableError from submit,
EngineUnavailableError from take); a record's own failures become its dead letter.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from typing import Callable, Iterable, Sequence

from processor.batcher import MicroBatcher
from processor.capacity import BatchLimits, resolve_batch_limits
from processor.codec import SUMMARY_SCHEMA, Codec, SchemaStore, SerializationContext
from processor.engines.base import Engine, EngineStartupError, Prompt, StreamingEngine
from processor.errors import InfrastructureError
from processor.events import validate_event
from processor.continuous_scheduler import ContinuousScheduler
from processor.generation import BatchStats, Done, MicroBatchScheduler, Scheduler
from processor.intake import Intake
from processor.prompt import PromptBuilder
from processor.records import DEFAULT_MAX_RECORD_BYTES, OutgoingRecord, RecordBuilder
from processor.settings import GenerationMode, Settings
from processor.source import TP, SourceRecord

log = logging.getLogger(__name__)

MAX_WARM_UP_COPIES = 64
# Records prepared together: enough that one tokenizer call per chunk leaves the interpreter free for the engine's
# front end most of the time, few enough that the first of them reaches the engine soon (a 1,500-token prompt takes
# ~1-2 ms to tokenize on one core: ~50 ms for the chunk).
INTAKE_CHUNK = 32


class Pipeline:
    def __init__(self, *, intake: Intake, scheduler: Scheduler, records: RecordBuilder, window: Callable[[], int],
                 probe_prompt: Prompt, warm_up_copies: int = 1, log_batches: bool = False) -> None:
        self.intake = intake
        self.scheduler = scheduler
        self.records = records
        self.window = window  # the engine's unit of work now (records): the commit policy's bound counts in it
        self.warm_up_copies = warm_up_copies
        self.log_batches = log_batches
        self.probe_prompt = probe_prompt

    @property
    def prompt_version(self) -> str:
        """The prompt templates' version, carried by every summary (replay names it)."""
        return self.intake.prompts.version

    def warm_up(self) -> None:
        """One sample generate() on the engine's own thread, at the shape it will run (see make_pipeline)."""
        self.scheduler.warm_up(self.probe_prompt, self.warm_up_copies)

    def submit(self, source: SourceRecord) -> None:
        """Raises only InfrastructureError (the Schema Registry unreachable): the record is then not taken."""
        self.scheduler.add(self.intake.prepare(source))

    def submit_many(self, sources: Sequence[SourceRecord]) -> tuple[int, InfrastructureError | None]:
        """`submit` for each source in order, intake working on INTAKE_CHUNK of them at a time (one tokenizer call
        each, outside the interpreter): how many were taken, and the InfrastructureError that stopped at the next."""
        taken = 0
        while taken < len(sources):
            items, stopped = self.intake.prepare_many(sources[taken : taken + INTAKE_CHUNK])
            for item in items:
                self.scheduler.add(item)
            taken += len(items)
            if stopped is not None:
                return taken, stopped
        return taken, None

    def take(self) -> list[OutgoingRecord]:
        return self._records(self.scheduler.take())

    def finish(self, timeout: float) -> list[OutgoingRecord]:
        return self._records(self.scheduler.finish(timeout))

    def _records(self, done: Iterable[Done]) -> list[OutgoingRecord]:
        now = datetime.now(timezone.utc)
        return [self.records.for_item(item, outcome, now) for item, outcome in done]

    def batches(self) -> list[BatchStats]:
        """Engine calls finished since the last call (metrics, token totals)."""
        stats = list(self.scheduler.last_batches)
        self.scheduler.last_batches.clear()
        if self.log_batches:
            for s in stats:
                log.info("batch: %d event(s), %d failed, %d prompt + %d completion tokens in %.2f s",
                         s.events, s.failed, s.prompt_tokens, s.completion_tokens, s.seconds,
                         extra={"events": s.events, "failed": s.failed, "seconds": round(s.seconds, 3)})
        return stats

    def wanted(self) -> int:
        return self.scheduler.wanted()

    def drop(self, partitions: Iterable[TP]) -> int:
        gone = set(partitions)
        return self.scheduler.drop(lambda source: source.tp not in gone)

    def smaller(self, record: OutgoingRecord) -> OutgoingRecord | None:
        """A record refused as too large, made smaller (the sink's fallback)."""
        return self.records.smaller(record)

    def in_flight(self) -> int:
        return self.scheduler.in_flight()

    def pending(self) -> int:
        return self.scheduler.pending()

    def idle(self) -> bool:
        """Nothing generating and nothing waiting: no more finishes are coming until more is submitted."""
        return not self.scheduler.in_flight() and not self.scheduler.pending()

    def seconds_until_due(self) -> float | None:
        return self.scheduler.seconds_until_due()

    def stalled_for(self) -> float:
        return self.scheduler.stalled_for()

    def wait(self, timeout: float) -> None:
        self.scheduler.wait(timeout)

    @property
    def busy_seconds(self) -> float:
        return self.scheduler.busy_seconds

    @property
    def idle_seconds(self) -> float:
        return self.scheduler.idle_seconds

    def close(self) -> None:
        self.scheduler.close()


def probe_prompt_of(prompts: PromptBuilder) -> Prompt:
    """The known-good prompt: the warm-up, and the probe that tells a broken engine from a poison record."""
    from processor.ops.samples import sample_events

    return prompts.build(validate_event(sample_events()[1]))


def make_pipeline(settings: Settings, engine: Engine, codec: Codec, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                  limits: BatchLimits | None = None) -> Pipeline:
    """The pipeline for GENERATION_MODE."""
    limits = limits or resolve_batch_limits(settings, engine.capacity())
    # An engine that learns its context from elsewhere (ENGINE=openai: the server's max_model_len) says so.
    context = getattr(engine, "context_length", None) or settings.max_model_len
    prompts = PromptBuilder(engine.tokenizer, context, settings.sampling_max_tokens, settings.summary_language)
    intake = Intake(codec=codec, prompts=prompts, max_event_bytes=settings.max_event_bytes)
    records = RecordBuilder(
        encode_summary=lambda record: codec.serialize(record, SerializationContext(settings.kafka_output_topic, SUMMARY_SCHEMA)),
        output_topic=settings.kafka_output_topic, dlq_topic=settings.kafka_dlq_topic, engine_kind=engine.kind,
        model=engine.model, prompt_version=prompts.version, max_record_bytes=max_record_bytes, citations=_citations(codec.store),
    )
    probe = probe_prompt_of(prompts)
    # A GPU engine warms up at the batch shape it will run: the first batch of a new shape pays one-time kernel JIT and
    # compilation (measured on an H100: the first 64-event batch took 11.6 s, later ones ~4 s). Engines without a KV
    # cache (model-free, Transformers on a CPU) warm up with one prompt.
    has_kv_cache = isinstance(engine, StreamingEngine) and engine.in_flight_budget() is not None
    if settings.generation_mode is GenerationMode.CONTINUOUS:
        scheduler = _continuous(settings, engine, limits, probe)
        copies = max(1, min(scheduler.window, MAX_WARM_UP_COPIES)) if has_kv_cache else 1
        return Pipeline(intake=intake, scheduler=scheduler, records=records, window=lambda: scheduler.capacity,
                        probe_prompt=probe, warm_up_copies=copies)
    continuous_only = [name for name, value in (("CONTINUOUS_MAX_UNCOMMITTED", settings.continuous_max_uncommitted),
                                                 ("CONTINUOUS_REFILL_MIN", settings.continuous_refill_min),
                                                 ("CONTINUOUS_RESERVE_NEW_TOKENS", settings.continuous_reserve_new_tokens))
                       if value is not None]
    if continuous_only:
        log.warning("ignored in micro_batch mode (GENERATION_MODE=continuous settings): %s", ", ".join(continuous_only))
    batcher = MicroBatcher(limits.max_records, settings.batch_max_wait_ms / 1000, limits.max_prompt_tokens)
    micro = MicroBatchScheduler(engine=engine, batcher=batcher, probe_prompt=probe,
                                retry_timeout_s=settings.infrastructure_retry_timeout_s, call_timeout_s=settings.engine_call_timeout_s)
    copies = max(1, min(limits.max_records, MAX_WARM_UP_COPIES)) if has_kv_cache else 1
    return Pipeline(intake=intake, scheduler=micro, records=records, window=lambda: limits.max_records,
                    probe_prompt=probe, warm_up_copies=copies, log_batches=True)


def reserved_new_tokens(settings: Settings) -> int:
    """New tokens the continuous feed counts against the KV budget per request in flight: the whole SAMPLING_MAX_TOKENS
    (never preempted) unless CONTINUOUS_RESERVE_NEW_TOKENS asks for less."""
    if settings.continuous_reserve_new_tokens is None:
        return settings.sampling_max_tokens
    return min(settings.continuous_reserve_new_tokens, settings.sampling_max_tokens)


def _continuous(settings: Settings, engine: Engine, limits: BatchLimits, probe: Prompt) -> ContinuousScheduler:
    from processor.continuous import ContinuousFeed

    if not isinstance(engine, StreamingEngine):
        raise EngineStartupError(f"GENERATION_MODE=continuous needs an engine with add_request/step; ENGINE={engine.kind} has none")
    budget = engine.in_flight_budget()
    if budget is not None and settings.batch_max_records:  # an explicit BATCH_MAX_RECORDS caps the window
        budget = dataclasses.replace(budget, max_sequences=min(budget.max_sequences, settings.batch_max_records))
    window = budget.max_sequences if budget is not None else limits.max_records
    # Refill in groups (an eighth of the window by default): prompts that enter together share one prefill step, and
    # on vLLM V1 a step holding a prefill runs outside the decode CUDA graphs (bench/vllm_modes.py: window 64,
    # refilling 8 at a time: 1.63x micro-batches instead of 1.35x).
    refill = settings.continuous_refill_min or max(1, window // 8)
    feed = ContinuousFeed(engine, budget=budget, max_new_tokens=reserved_new_tokens(settings),
                          max_sequences_default=limits.max_records, refill_min=refill)
    # Out-of-order completion: the commit policy bounds what is read but not yet committed (and so what a crash can
    # duplicate); a bound below what the engine holds starves the engine, so it is named.
    if settings.continuous_max_uncommitted is not None and settings.continuous_max_uncommitted < feed.capacity:
        log.warning("CONTINUOUS_MAX_UNCOMMITTED=%d is below the %d requests the engine can hold: it will hold at most %d at a "
                    "time", settings.continuous_max_uncommitted, feed.capacity, settings.continuous_max_uncommitted)
    return ContinuousScheduler(feed=feed, engine=engine, probe_prompt=probe, retry_timeout_s=settings.infrastructure_retry_timeout_s,
                               call_timeout_s=settings.engine_call_timeout_s)


def _citations(store: SchemaStore) -> Callable[[object, str], list[dict[str, object]]] | None:
    """The summary schema's `citations` field, where the deployed schema has it (v2 on)."""
    from processor.citations import cited_results

    fields = {f["name"] for f in store.latest(SUMMARY_SCHEMA).parsed["fields"]}
    return cited_results if "citations" in fields else None
