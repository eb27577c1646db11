"""The vLLM engine against a double of 0.6.3's API (vLLM itself needs CUDA; the GPU check is in the README)."""

import subprocess
import sys

import pytest

from processor.engines.base import EngineStartupError, Generation
from processor.engines.isolation import generate_isolated
from processor.engines.vllm_engine import PromptIgnoredError, VllmEngine, llm_kwargs
from processor.events import validate_event
from processor.prompt import PromptBuilder
from processor.samples import sample_events
from processor.settings import load_settings


def vllm_settings(model_dir, **overrides):
    return load_settings(engine="vllm", vllm_model=str(model_dir), **overrides)


def test_vllm_use_v1_is_set_before_vllm_is_first_imported(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    import vllm

    assert vllm.IMPORTED_WITH_USE_V1 == "0"
    assert engine.llm is vllm.CREATED[-1]


def test_importing_the_processor_does_not_import_vllm_or_torch():
    code = "import processor.loop, processor.engines, processor.cli, sys; print('vllm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_llm_is_built_exactly_as_the_adr_says(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    assert engine.llm.init_args == {
        "model": str(tiny_model_dir),
        "quantization": "awq",
        "gpu_memory_utilization": 0.92,
        "max_model_len": 6144,
        "tensor_parallel_size": 1,
        "max_num_seqs": 256,
        "enable_prefix_caching": False,
        "seed": 0,
    }
    assert llm_kwargs(load_settings(vllm_quantization=""))["quantization"] is None  # lets vLLM pick awq_marlin


def prompts(engine, events, max_model_len=6144, max_tokens=1536):
    builder = PromptBuilder(engine.tokenizer, max_model_len, max_tokens)
    return [builder.build(validate_event(e)) for e in events]


def test_generate_sends_token_prompts_with_the_adr_sampling_and_maps_outputs_by_position(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    batch = prompts(engine, sample_events())
    outputs = engine.generate(batch)
    sent, params = engine.llm.calls[-1]
    assert [p["prompt_token_ids"] for p in sent] == [list(p.token_ids) for p in batch]
    assert (params.temperature, params.top_p, params.max_tokens) == (0.7, 0.9, 1536)
    for prompt, output in zip(batch, outputs):
        assert isinstance(output, Generation)
        assert output.prompt_tokens == prompt.prompt_tokens
        assert output.text == "summary: " + engine.tokenizer.decode(list(prompt.token_ids)[-8:])
    # generate() mutates what it gets: each call must build its own SamplingParams
    engine.generate(batch[:1])
    assert engine.llm.calls[-1][1] is not params


def test_the_token_count_the_batcher_used_is_what_vllm_sees(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    prompt = prompts(engine, sample_events()[:1])[0]
    rendered = engine.llm.get_tokenizer().apply_chat_template(
        [{"role": m.role, "content": m.content} for m in prompt.messages], tokenize=True, add_generation_prompt=True
    )
    ids = rendered["input_ids"] if isinstance(rendered, dict) else rendered
    assert list(prompt.token_ids) == list(ids)


def test_vllms_empty_length_answer_to_an_overlong_prompt_is_a_failure(fake_vllm, tiny_model_dir):
    # The builder packs for 6144; a vLLM started with a shorter max_model_len ignores the long prompt.
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir, vllm_max_model_len=6144))
    batch = prompts(engine, sample_events()[:2])
    engine.llm.max_model_len = batch[0].prompt_tokens - 1
    outputs = engine.generate(batch)
    assert isinstance(outputs[0], PromptIgnoredError) and "VLLM_MAX_MODEL_LEN" in str(outputs[0])


def test_one_event_that_crashes_generate_is_isolated(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    batch = prompts(engine, sample_events())
    others = set().union(*(p.token_ids for i, p in enumerate(batch) if i != 3))
    engine.llm.fail_for_token = next(t for t in batch[3].token_ids if t not in others)  # only that prompt has it
    outputs = generate_isolated(engine, batch)
    assert [type(o).__name__ for o in outputs].count("Generation") == 5
    assert "illegal memory access" in str(outputs[3])


@pytest.mark.parametrize(
    "error",
    [
        ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the engine."),
        ValueError("The model's max seq len (6144) is larger than the maximum number of tokens that can be stored in KV cache (2048)."),
    ],
)
def test_a_gpu_that_cannot_hold_the_model_fails_at_start_up_naming_the_settings(fake_vllm, tiny_model_dir, error):
    import vllm

    vllm.FAIL_START_WITH = error
    with pytest.raises(EngineStartupError) as info:
        VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    assert "VLLM_GPU_MEMORY_UTILIZATION" in str(info.value) and "VLLM_MAX_MODEL_LEN" in str(info.value)


def test_without_vllm_installed_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(EngineStartupError, match="vllm==0.6.3"):
        VllmEngine.from_settings(load_settings(engine="vllm"))
