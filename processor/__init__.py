"""The AI worker: a Kafka stream processor that turns collected web-search results into LLM summaries.

Data path, one module per stage: settings → codec (+ events) → batcher (+ prompt) → engines → loop → sink.
"""

__version__ = "0.1.0"
