"""The AI worker: a Kafka stream processor that turns collected web-search results into LLM summaries.

Runtime path, one module per stage, and which to open for which change:
    settings     every knob (environment variables) — a new setting
    source       SourceRecord / BatchItem, the types every stage carries (the item's error is the skip marker)
    intake       bytes → event → prompt, or the record's own error (codec, events, prompt) — input handling
    pipeline     intake → generation → records behind submit/take/wanted/drop/finish; make_pipeline wires the
                 stages per GENERATION_MODE — a new stage (a cache, say)
    generation   the engine's thread in either mode (batcher, continuous) and the failure policy (engines/isolation)
    engines/     one file per engine behind engines/base's protocol — a new engine
    records      summaries and dead letters — output format
    checkpoint   CommitPolicy and the offset lifecycle, at-least-once or transactional (tracking, sink) — commits
    loop         the Worker: the consumer loop only (poll, pause, rebalance, health, start and stop)
Around them: errors (failure families and exit codes), clients, metrics, capacity, logs, cli; ops/ holds the operator
tools (produce/consume, offsets and replay, reachability, embedded broker, samples, display, demo, tiny model).
"""

__version__ = "0.1.0"
