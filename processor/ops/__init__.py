"""Operator tools, apart from the runtime path: produce/consume (tools), offsets, lag and replay (offsets),
reachability of the broker, the embedded broker, sample events, terminal display, the demo and the tiny-model
builder, and the command-line commands themselves (commands; cli.py parses and dispatches). The worker never
imports them at run time except the sample events (its warm-up and probe prompt)."""
