"""ENGINE=openai on a real server: the processor pointed at `vllm serve` on 127.0.0.1, events/s against the same
engine driven alone, and (run gpu_bench.py on the same model) against the offline in-process engine.

On the GPU host, with the gpu-kit's vLLM (the server needs its extra wheels: fastapi, uvicorn, openai, …):

    python bench/vllm_modes.py build --model-dir /tmp/m          # random weights, full vocabulary
    vllm serve /tmp/m --host 127.0.0.1 --port 8000 --served-model-name bench --max-model-len 6144 \\
        --max-num-seqs 64 --seed 0 &                               # wait for "Application startup complete"
    python bench/openai_bench.py --model bench --mode micro_batch --events 1000 --batch 64
    python bench/openai_bench.py --model bench --mode continuous --events 1000 --batch 64
    # the offline engine, same model, prompts and lengths (README Performance):
    python bench/gpu_bench.py --engine vllm --model /tmp/m --mode continuous --skip-sweep --batch 64 --processor-events 1000

Each run writes bench/results/openai-<mode>.json: the processor on the embedded broker (ENGINE=openai,
OPENAI_MAX_IN_FLIGHT=--batch) and the engine alone on the very same prompts (gpu_bench.processor_vs_engine), both
through HTTP. Output lengths are fixed (vLLM's ignore_eos + min_tokens = max_tokens = --new-tokens) so the runs do
the same work as gpu_bench.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="the served model name (vllm serve --served-model-name)")
    parser.add_argument("--tokenizer", help="OPENAI_TOKENIZER (the model directory); default: the server's /tokenize")
    parser.add_argument("--mode", choices=["micro_batch", "continuous"], default="micro_batch")
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64, help="BATCH_MAX_RECORDS and OPENAI_MAX_IN_FLIGHT")
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=6144)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    import gpu_bench

    from processor.engines import create_engine
    from processor.settings import load_settings

    overrides = {
        "engine": "openai", "openai_base_url": args.base_url, "openai_model": args.model, "openai_tokenizer": args.tokenizer,
        "openai_max_in_flight": args.batch, "max_model_len": args.max_model_len, "sampling_max_tokens": args.new_tokens,
        "generation_mode": args.mode,
    }
    engine = create_engine(load_settings(**overrides))
    engine.extra_body = {"ignore_eos": True, "min_tokens": args.new_tokens}  # type: ignore[attr-defined]
    try:
        events = gpu_bench.make_events(args.events, args.prompt_tokens, engine.tokenizer)
        result = gpu_bench.processor_vs_engine(engine, overrides, events, args.batch)
    finally:
        engine.close()
    result.update({"engine": "openai", "mode": args.mode, "model": args.model, "base_url": args.base_url,
                   "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens})
    out = Path(args.out) / f"openai-{args.mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("processor_events_per_s", "engine_only_events_per_s", "ratio") if k in result}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
