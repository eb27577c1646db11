"""The vLLM engine against a double of 0.6.3's API (vLLM itself needs CUDA; the GPU check is in the README)."""

import subprocess
import sys

import pytest

from processor.engines.base import EngineStartupError, Generation
from processor.engines.isolation import generate_isolated
from processor.engines.vllm_engine import PromptIgnoredError, VllmEngine, llm_kwargs
from processor.events import validate_event
from processor.prompt import PromptBuilder
from processor.ops.samples import sample_events
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
        "load_format": "auto",
        "seed": 0,
    }
    assert llm_kwargs(load_settings(vllm_quantization=""))["quantization"] is None  # lets vLLM pick awq_marlin


def test_vllm_load_format_reaches_the_llm_constructor(fake_vllm, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_LOAD_FORMAT", "dummy")
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    assert engine.llm.init_args["load_format"] == "dummy"


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


# ------------------------------------------------------------------------------ continuous (engine API)
import logging  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from processor.continuous import ContinuousFeed  # noqa: E402
from processor.engines.base import EventGenerationError, InFlightBudget, StreamingEngine  # noqa: E402
from processor.engines import vllm_version  # noqa: E402


def many_prompts(engine, count):
    events = [e | {"event_id": f"v{i}"} for i, e in enumerate(sample_events() * (count // len(sample_events()) + 1))][:count]
    return prompts(engine, events)


def run_engine(engine, limit=10_000):
    finished = []
    for _ in range(limit):
        if not engine.has_unfinished():
            return finished
        finished.extend(engine.step())
    raise AssertionError("the engine never finished")


def test_vllm_engine_is_a_streaming_engine(fake_vllm, tiny_model_dir):
    assert isinstance(VllmEngine.from_settings(vllm_settings(tiny_model_dir)), StreamingEngine)


def test_add_request_feeds_llm_engine_token_prompts_with_the_adr_sampling_final_only(fake_vllm, tiny_model_dir):
    import vllm

    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    prompt = prompts(engine, sample_events()[:1])[0]
    engine.add_request("evt-1", prompt)
    request = engine.llm.llm_engine.waiting[0]
    assert request.request_id == "evt-1" and request.ids == list(prompt.token_ids)
    params = request.params
    assert (params.temperature, params.top_p, params.max_tokens) == (0.7, 0.9, 1536)
    assert params.output_kind == vllm.RequestOutputKind.FINAL_ONLY, "step() reports a request once, when it finishes"
    assert engine.has_unfinished()


def test_requests_finish_out_of_order_each_once_with_the_generate_mapping(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    batch = many_prompts(engine, 12)
    for i, prompt in enumerate(batch):
        engine.add_request(f"id-{i}", prompt)
    finished = run_engine(engine)
    order = [f.request_id for f in finished]
    assert sorted(order) == sorted(f"id-{i}" for i in range(12)) and len(set(order)) == 12
    assert order != [f"id-{i}" for i in range(12)], "finished out of order"
    by_id = {f.request_id: f.outcome for f in finished}
    for i, prompt in enumerate(batch):
        outcome = by_id[f"id-{i}"]
        assert isinstance(outcome, Generation) and outcome.text.startswith("summary: ")
        assert outcome.prompt_tokens == prompt.prompt_tokens and outcome.completion_tokens == 1 + sum(prompt.token_ids) % 8
    assert not engine.has_unfinished()


def test_abort_passes_a_list_and_aborted_requests_never_finish(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    batch = many_prompts(engine, 4)
    engine.sampling_override = lambda p: {"max_tokens": 20, "ignore_eos": True}  # none finishes in one step
    for i, prompt in enumerate(batch):
        engine.add_request(f"a{i}", prompt)
    engine.step()
    engine.abort(["a1", "unknown"])
    engine.abort(iter(["a2"]))
    engine.abort([])
    # V1's abort_request iterates its argument: a bare str would abort one id per character.
    assert engine.llm.llm_engine.aborted == [["a1"], ["a2"]]
    finished = run_engine(engine)
    assert {f.request_id for f in finished} <= {"a0", "a3"}


def test_an_overlong_prompt_is_ignored_by_0_6_3_and_reported_as_that_events_failure(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    batch = many_prompts(engine, 3)
    engine.llm.llm_engine.scheduler_config.max_model_len = batch[1].prompt_tokens - 1
    for i, prompt in enumerate(batch):
        engine.add_request(f"o{i}", prompt)
    by_id = {f.request_id: f.outcome for f in run_engine(engine)}
    assert isinstance(by_id["o1"], PromptIgnoredError) and "VLLM_MAX_MODEL_LEN" in str(by_id["o1"])
    assert isinstance(by_id["o0"], Generation) or isinstance(by_id["o2"], Generation)


def test_current_vllm_refuses_an_overlong_prompt_in_add_request_and_that_is_the_events_failure(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    prompt = prompts(engine, sample_events()[:1])[0]

    def v1_add_request(request_id, prompt, params, *args, **kwargs):  # vllm/v1/engine/input_processor.py
        raise ValueError(
            f"The decoder prompt (length {len(prompt['prompt_token_ids'])}) is longer than the maximum model length "
            "of 6144. Make sure that `max_model_len` is no smaller than the number of text tokens."
        )

    engine.llm.llm_engine.add_request = v1_add_request
    with pytest.raises(PromptIgnoredError, match="VLLM_MAX_MODEL_LEN"):
        engine.add_request("long", prompt)
    assert engine._streaming == {}, "not in flight"
    # generate() on V1 raises for the whole call; a batch of one maps it to this event's failure
    engine.llm.generate = lambda *a, **k: v1_add_request("0", {"prompt_token_ids": list(prompt.token_ids)}, None)
    assert isinstance(engine.generate([prompt])[0], PromptIgnoredError)
    with pytest.raises(ValueError):
        engine.generate([prompt, prompt])  # bisection (isolation.py) narrows it to the event


def test_an_empty_prompt_is_refused_as_that_events_failure(fake_vllm, tiny_model_dir):
    from dataclasses import replace

    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    prompt = replace(prompts(engine, sample_events()[:1])[0], token_ids=())
    with pytest.raises(EventGenerationError, match="Prompt cannot be empty"):
        engine.add_request("empty", prompt)


def test_a_crashing_prompt_makes_step_raise(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    batch = many_prompts(engine, 6)
    others = set().union(*(p.token_ids for i, p in enumerate(batch) if i != 3))
    engine.llm.fail_for_token = next(t for t in batch[3].token_ids if t not in others)
    for i, prompt in enumerate(batch):
        engine.add_request(f"c{i}", prompt)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_engine(engine)


def test_in_flight_budget_is_what_vllm_allocated(fake_vllm, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="processor.engines.vllm_engine")
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir, vllm_max_num_seqs=64), llm_factory=None)
    # 0.6.3: cache_config.num_gpu_blocks × block_size, less the block manager's 1 % watermark
    assert engine.in_flight_budget() == InFlightBudget(64, (2048 - 20) * 16, 16)
    assert "2048 GPU blocks × 16 tokens" in caplog.text
    # V1 (0.24): the same fields under llm_engine.vllm_config; block 0 is the null block, watermark 0 by default
    engine.llm.llm_engine = SimpleNamespace(
        vllm_config=SimpleNamespace(
            cache_config=SimpleNamespace(num_gpu_blocks=5000, block_size=16),
            scheduler_config=SimpleNamespace(max_num_seqs=256, watermark=0.0),
        )
    )
    assert engine.in_flight_budget() == InFlightBudget(256, 4999 * 16, 16)
    engine.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks = None  # not started yet
    assert engine.in_flight_budget() is None


def test_the_feed_keeps_vllm_inside_its_kv_cache_so_it_never_preempts(fake_vllm, tiny_model_dir):
    settings = vllm_settings(tiny_model_dir, sampling_max_tokens=64)
    import vllm

    small_cache = {"num_gpu_blocks_override": 100}  # 1,600 tokens: a few prompts at a time
    engine = VllmEngine.from_settings(settings, llm_factory=lambda **kw: vllm.LLM(**kw, **small_cache))
    budget = engine.in_flight_budget()
    assert budget == InFlightBudget(256, 99 * 16, 16)
    from dataclasses import replace

    batch = [replace(p, token_ids=p.token_ids[:100]) for p in many_prompts(engine, 30)]  # 7 blocks each
    engine.sampling_override = lambda p: {"max_tokens": 64, "ignore_eos": True}  # every request runs to the limit
    feed = ContinuousFeed(engine, budget=budget, max_new_tokens=64)
    try:
        for i, prompt in enumerate(batch):
            feed.submit(f"k{i}", prompt)
        got = {}
        deadline = time.monotonic() + 30
        while len(got) < len(batch):
            assert time.monotonic() < deadline and feed.failure is None, feed.failure
            feed.wait(0.5)
            got.update({f.request_id: f.outcome for f in feed.take_finished()})
    finally:
        feed.close()
    llm_engine = engine.llm.llm_engine
    assert llm_engine.preemptions == 0
    assert max(blocks for *_, blocks in llm_engine.step_log) <= 100
    assert max(running for running, *_ in llm_engine.step_log) >= 2, "more than one at a time"
    assert all(o.completion_tokens == 64 for o in got.values())
    # Without the feed's admission, the same requests all at once overrun the cache: vLLM preempts.
    for i, prompt in enumerate(batch):
        engine.add_request(f"raw{i}", prompt)
    run_engine(engine, limit=100_000)
    assert llm_engine.preemptions > 0


def test_per_request_sampling_reaches_generate_and_add_request(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    batch = many_prompts(engine, 3)
    lengths = {p.event.event_id: n for p, n in zip(batch, (5, 11, 3))}
    engine.sampling_override = lambda p: {"max_tokens": lengths[p.event.event_id], "ignore_eos": True}
    engine.generate(batch)
    params = engine.llm.calls[-1][1]
    assert [p.max_tokens for p in params] == [5, 11, 3] and all(p.ignore_eos for p in params)
    for prompt in batch:
        engine.add_request(prompt.event.event_id, prompt)
    outcomes = {f.request_id: f.outcome for f in run_engine(engine)}
    assert {k: o.completion_tokens for k, o in outcomes.items()} == lengths


def test_the_feed_with_vllm_bisects_a_crash_through_run_exclusive(fake_vllm, tiny_model_dir):
    engine = VllmEngine.from_settings(vllm_settings(tiny_model_dir))
    batch = many_prompts(engine, 6)
    others = set().union(*(p.token_ids for i, p in enumerate(batch) if i != 2))
    engine.llm.fail_for_token = next(t for t in batch[2].token_ids if t not in others)
    feed = ContinuousFeed(engine, budget=engine.in_flight_budget(), max_new_tokens=1536)
    try:
        with feed._cond:
            for i, prompt in enumerate(batch):
                feed.submit(f"b{i}", prompt)
        assert feed.wait(10) and feed.failure is not None
        failed = feed.failed_ids()
        assert sorted(failed) == [f"b{i}" for i in range(6)]
        assert not engine.llm.llm_engine.has_unfinished_requests(), "aborted: generate() may run on the engine now"
        outcomes = feed.run_exclusive(lambda e: generate_isolated(e, [batch[int(i[1:])] for i in failed]), timeout=10)
        assert [i for i, o in zip(failed, outcomes) if not isinstance(o, Generation)] == ["b2"]
        assert feed.failure is None
    finally:
        feed.close()


# ------------------------------------------------------------------------------ versions
def test_vllm_use_v1_is_set_for_0_6_3_and_dropped_with_a_warning_where_v1_is_the_only_engine(monkeypatch, caplog):
    monkeypatch.setenv("VLLM_USE_V1", "0")
    settings = load_settings(engine="vllm")
    vllm_version.configure_engine_selection(settings, (0, 6, 3))
    assert vllm_version.os.environ["VLLM_USE_V1"] == "0"
    vllm_version.configure_engine_selection(settings, None)  # unknown version (a double on sys.path): as 0.6.3
    assert vllm_version.os.environ["VLLM_USE_V1"] == "0"
    caplog.set_level(logging.WARNING, logger="processor.engines.vllm_version")
    vllm_version.configure_engine_selection(settings, (0, 24, 0))
    assert "VLLM_USE_V1" not in vllm_version.os.environ, "unknown to vLLM 0.24, which would warn about it"
    assert "VLLM_USE_V1=0 is ignored: vLLM 0.24.0 has only the V1 engine" in caplog.text
    caplog.clear()
    monkeypatch.delenv("VLLM_USE_V1", raising=False)
    vllm_version.configure_engine_selection(load_settings(engine="vllm"), (0, 24, 0))
    assert "VLLM_USE_V1" not in vllm_version.os.environ and caplog.text == "", "nothing asked for V0: no warning"


@pytest.mark.parametrize("text, parsed", [("0.6.3", (0, 6, 3)), ("0.24.0", (0, 24, 0)), ("0.11.0rc1", (0, 11, 0)), ("0.6.3.post1+cu124", (0, 6, 3))])
def test_the_installed_vllm_version_is_read_without_importing_it(monkeypatch, text, parsed):
    monkeypatch.setattr(vllm_version.metadata, "version", lambda name: text)
    assert vllm_version.installed_vllm_version() == parsed
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    vllm_version.installed_vllm_version()
    assert "vllm" not in sys.modules
