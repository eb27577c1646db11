"""SmolLM2-135M-Instruct on the CPU with the Transformers engine: what repetition control changes (issue 18, part 4).

python bench/realmodel_cpu.py MODEL_DIR [--max-tokens 192] [--seeds 3] — the English sample events, each config
over a few seeds; prints loops found by the guard, cut-offs, and the quality shares, one JSON line per config.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

from processor.engines.transformers_engine import TransformersEngine
from processor.events import validate_event
from processor.guards import guard_summary
from processor.prompt import PromptBuilder
from processor.quality import assess
from processor.ops.samples import sample_events
from processor.settings import load_settings

# The prompt echoed back: its instructions restated, or its result block copied (issue 18's two failure shapes).
RESTATED = re.compile(r"3 to 6 sentences|search results say|<query>|<result|title:|url:|snippet:", re.IGNORECASE)

CONFIGS = {
    "adr": {},
    "rep1.1": {"sampling_repetition_penalty": 1.1},
    "rep1.2": {"sampling_repetition_penalty": 1.2},
    "ngram4": {"sampling_no_repeat_ngram_size": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--dump", help="write every summary as a JSON line here")
    args = parser.parse_args()
    events = [validate_event(e) for e in sample_events() if e.get("language") == "en"]
    for name in args.configs.split(","):
        rows = []
        started = time.monotonic()
        for seed in range(args.seeds):
            settings = load_settings(engine="transformers", transformers_model=args.model, sampling_max_tokens=args.max_tokens,
                                     seed=seed, **CONFIGS[name])
            engine = TransformersEngine.from_settings(settings)
            builder = PromptBuilder(engine.tokenizer, settings.max_model_len, settings.sampling_max_tokens)
            prompts = [builder.build(event) for event in events]
            for prompt, generation in zip(prompts, engine.generate(prompts)):
                guarded = guard_summary(generation.text, generation.finish_reason)
                rows.append((generation, assess(prompt, guarded.text, generation.finish_reason, guarded)))
                if args.dump:
                    with open(args.dump, "a", encoding="utf-8") as dump:
                        dump.write(json.dumps({"config": name, "seed": seed, "event_id": prompt.event.event_id,
                                               "finish_reason": generation.finish_reason, "text": generation.text}) + "\n")
        print(json.dumps({
            "config": name, "summaries": len(rows), "seconds": round(time.monotonic() - started, 1),
            "cut_off": sum(q.cut_off for _, q in rows), "loop_trimmed": sum(q.loop_trimmed for _, q in rows),
            "cites_none": sum(q.citations == 0 for _, q in rows),
            "restates_prompt": sum(bool(RESTATED.search(g.text)) for g, _ in rows),
            "grounded_median": round(statistics.median(q.grounded_share for _, q in rows), 2),
            "completion_tokens_median": statistics.median(g.completion_tokens for g, _ in rows),
        }), flush=True)


if __name__ == "__main__":
    main()
