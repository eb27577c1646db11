"""The AI worker: a Kafka stream processor that turns collected web-search results into LLM summaries.

Runtime path, one module per stage, and which to open for which change:
    settings     every knob (environment variables) — a new setting
    source       SourceRecord / BatchItem, the types every stage carries (the item's error is the skip marker)
    intake       bytes → event → prompt, or the record's own error (codec + wire, events, prompt + prompt_text) —
                 input handling
    pipeline     intake → generation → records behind submit/take/wanted/drop/finish; make_pipeline wires the
                 stages per GENERATION_MODE — a new stage (a cache, say)
    generation   the engine's side: the interface and micro-batch scheduler (batcher); continuous_scheduler with
                 continuous (the feed), feed_loop (its thread) and admission (its KV budget); the failure policy
                 (engines/isolation)
    engines/     one file per engine behind engines/base's protocol (vllm_version, openai_tokenizers beside
                 theirs) — a new engine
    records      summaries and dead letters — output format
    checkpoint   at-least-once or transactional over checkpoint_base (CommitPolicy, the offset lifecycle; tracking,
                 sink) — commits
    loop         the Worker: the consumer loop only (step, start and stop); assignment holds the consumer side
                 (inbox, fetch, pause, rebalance, rewind), reporting its totals, lag and progress lines
Around them: errors (failure families and exit codes), clients, metrics, capacity, logs, cli (parser and dispatch);
ops/ holds the operator tools (the commands themselves, produce/consume, offsets and replay, reachability, embedded
broker, samples, display, demo, tiny model).
"""

__version__ = "0.1.0"
