"""The fast decode path against the eager one, on whatever device is here.

On CUDA "fast" means the compiled Triton kernels and captured CUDA graphs; on the CPU it means the
static decoder the graphs replay, run eagerly (the kernels' CPU run is in test_kernels.py and
test_engine.py). These tests need no audio decoding libraries and compare our paths with each
other, not with transformers, so they also run on a GPU machine whose transformers differs from
the pinned oracle: `python -m pytest tests/test_kernels.py tests/test_gpu.py`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from qwen2audio.api import Qwen2Audio
from qwen2audio.engine.core import Engine
from qwen2audio.engine.options import EngineOptions
from qwen2audio.engine.request import SamplingParams
from qwen2audio.model.backend import Backend

from checkpoints import build_checkpoint, write_lora

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RNG = np.random.default_rng(3)
CLIPS = [(RNG.standard_normal(int(s * 16000)) * 0.1).astype(np.float32) for s in (0.5, 3, 4, 7, 2)]
SHORT = [(RNG.standard_normal(int(s * 16000)) * 0.1).astype(np.float32) for s in (0.5, 0.8, 1.0, 0.6, 0.7)]
LENGTHS = (6, 12, 24, 9, 15)  # the decode batch shrinks and grows through several buckets


def conversation(clip: np.ndarray, k: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": clip},
                                         {"type": "text", "text": f"Question {k}: describe it."}]}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("gpu") / "ckpt", kv_heads=2, seed=4)


def load(checkpoint, device: str, dtype: str = "float32") -> Qwen2Audio:
    """Plain torch linear layers on the CPU, so that the eager twin below can share the weights."""
    return Qwen2Audio.from_pretrained(checkpoint, device=device, dtype=dtype, progress=False,
                                      engine_options=EngineOptions(cpu_onednn=False))


def engines(model: Qwen2Audio, async_decode: bool = False, max_batch: int = 4, **options) -> tuple[Engine, Engine]:
    """(fast, eager) engines over the same weights; the eager one on the eager ops, without the
    static decoder; ``async_decode``: the fast one pipelines its decode steps."""
    budget = {"kv_cache_bytes": options.pop("kv_cache_bytes", 2**26)}
    fast = model.new_engine(EngineOptions(max_graph_batch=max_batch, static_decode=True, async_decode=async_decode,
                                          **budget, **options))
    if model.device.type == "cuda":
        assert model.network.backend.kernels and fast.runner.static is not None and fast.runner.static.graphs
    eager_network = model.network.with_backend(Backend())
    eager = Engine(eager_network, model.processor.tokenizer, model.processor.feature_extractor, model.generation,
                   EngineOptions(enforce_eager=True, async_decode=False, **budget, **options))
    assert eager.runner.static is None and not eager.pipeline.enabled and not eager_network.backend.kernels
    for engine in (fast, eager):
        engine.processor = model.processor  # a test convenience: the engine itself never sees a processor
    return fast, eager


def all_blocks_free(engine: Engine) -> bool:
    stats = engine.stats()
    return stats.kv_blocks_free == stats.kv_blocks


def staggered_run(engine: Engine, logprobs: int | None = None, adapters: list[str | None] | None = None
                  ) -> list[tuple[list[int], list[float]]]:
    """Two requests, then three more after two steps: (tokens, chosen-token logprobs) per request;
    ``adapters``: each request's LoRA adapter."""
    ids: list[str] = []
    tokens: dict[str, tuple[list[int], list[float]]] = {}

    def take(outputs) -> None:
        for output in outputs:
            tokens[output.request_id][0].extend(output.token_ids)
            tokens[output.request_id][1].extend(entry["logprob"] for entry in output.logprobs)

    for k, (clip, n) in enumerate(zip(CLIPS, LENGTHS, strict=True)):
        params = SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0, logprobs=logprobs)
        prompt = replace(engine.processor.prepare(conversation(clip, k)), adapter=adapters[k] if adapters else None)
        ids.append(engine.add_request(prompt, params))
        tokens[ids[-1]] = ([], [])
        if k == 1:
            take(engine.step())
            take(engine.step())
    take(engine.run(set(ids)))
    assert all_blocks_free(engine)
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("device", DEVICES)
def test_fast_decode_gives_the_eager_tokens_in_fp32(checkpoint, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # cuDNN's default TF32 convolutions
    model = load(checkpoint, device)
    fast, eager = engines(model)
    got, expected = staggered_run(fast), staggered_run(eager)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [len(t) for t, _ in got] == list(LENGTHS)
    if device == "cuda":  # and the eager GPU path gives what the CPU engine gives
        cpu = load(checkpoint, "cpu")
        assert [t for t, _ in staggered_run(engines(cpu)[1])] == [t for t, _ in expected]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_fast_decode_in_bf16_stays_within_tolerance_of_eager(checkpoint, kv_cache_dtype):
    """bf16 rounds differently op by op (split-K attention, fused norms): the chosen tokens' logprobs
    agree closely while the tokens agree, and the first tokens agree."""
    model = load(checkpoint, "cuda", "bfloat16")
    fast, eager = engines(model, kv_cache_dtype=kv_cache_dtype)
    got, expected = staggered_run(fast, logprobs=1), staggered_run(eager, logprobs=1)
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, expected, strict=True):
        assert tokens[0] == ref_tokens[0]
        same = next((k for k, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), len(tokens))
        assert max(abs(a - b) for a, b in zip(logprobs[:same], ref_logprobs[:same], strict=True)) < 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_lora_rows_through_graphs_and_pipelined_steps_give_the_eager_tokens(checkpoint, device, tmp_path,
                                                                            monkeypatch):
    """Requests on two adapters (one also on the audio side) and on the base model, staggered: the
    decode graphs (CUDA; the static buffers on the CPU) with pipelined steps give the eager tokens."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = load(checkpoint, device)
    fast, eager = engines(model, async_decode=True, max_loras=2, max_lora_rank=8)
    paths = [write_lora(tmp_path / "a", checkpoint, 8, 1), write_lora(tmp_path / "b", checkpoint, 4, 2, audio=True)]
    for engine in (fast, eager):
        for name, path in zip("ab", paths, strict=True):
            engine.load_adapter(path, name)
    adapters = ["a", None, "b", "a", "b"]
    got, expected = staggered_run(fast, adapters=adapters), staggered_run(eager, adapters=adapters)
    assert [t for t, _ in got] == [t for t, _ in expected]
    base = staggered_run(eager)
    assert all((t == b) == (name is None) for (t, _), (b, _), name in zip(got, base, adapters, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantized_fast_decode_stays_within_tolerance_of_eager(tmp_path_factory, scheme):
    """Quantized layers under the captured graphs and kernels give the eager path's tokens (inputs of
    128 and 256: tinygemm's tiles need multiples of 128, so the tiny 64-wide checkpoint cannot)."""
    from qwen2audio.model import quant_cuda

    if quant_cuda.device_problem(scheme, torch.device("cuda")):
        pytest.skip(quant_cuda.device_problem(scheme, torch.device("cuda")))
    path = build_checkpoint(tmp_path_factory.mktemp("quant") / "ckpt", kv_heads=2, seed=4, hidden=128)
    model = Qwen2Audio.from_pretrained(path, device="cuda", dtype="bfloat16", progress=False, quantization=scheme,
                                       quantization_group_size=32 if scheme == "int4" else None)
    fast, eager = engines(model)
    got, expected = staggered_run(fast, logprobs=1), staggered_run(eager, logprobs=1)
    tolerance = 0.25 if scheme == "fp8" else 0.1  # fp8 also rounds each activation row to 3 mantissa bits
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, expected, strict=True):
        assert tokens[0] == ref_tokens[0]
        same = next((k for k, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), len(tokens))
        assert max(abs(a - b) for a, b in zip(logprobs[:same], ref_logprobs[:same], strict=True)) < tolerance


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_equal_cpu_features():
    from qwen2audio.audio.features import FeatureExtractor

    extractor = FeatureExtractor()
    cpu = extractor([*CLIPS, np.zeros(40 * 16000, dtype=np.float32)])
    gpu = extractor([*CLIPS, np.zeros(40 * 16000, dtype=np.float32)], device="cuda")
    torch.testing.assert_close(gpu.input_features.cpu(), cpu.input_features, atol=1e-4, rtol=0)
    assert torch.equal(gpu.feature_attention_mask.cpu(), cpu.feature_attention_mask)


def mixed_run(engine: Engine, stop_token: int, abort_at: int | None = None) -> dict[int, tuple[list[int], str | None]]:
    """Greedy and seeded-sampling requests (penalties of every kind, a logit bias), one ending early
    on ``stop_token``, arrivals between steps, and optionally an abort of request 1 after
    ``abort_at`` steps: tokens and finish reason per request."""
    params = [
        SamplingParams(max_new_tokens=14, temperature=0),
        SamplingParams(max_new_tokens=20, temperature=0.8, top_k=40, top_p=0.9, seed=7, repetition_penalty=1.2),
        SamplingParams(max_new_tokens=11, temperature=0, min_new_tokens=3, stop_token_ids=(stop_token,)),
        SamplingParams(max_new_tokens=17, temperature=1.0, seed=3, min_new_tokens=17, frequency_penalty=1.1),
        SamplingParams(max_new_tokens=9, temperature=0, repetition_penalty=1.5, presence_penalty=0.9,
                       logit_bias={stop_token: 1.5}),
    ]
    ids: dict[str, int] = {}
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str | None] = {}

    def take(outputs) -> None:
        for output in outputs:
            k = ids[output.request_id]
            tokens[k].extend(output.token_ids)
            reasons[k] = output.finish_reason

    steps = 0
    for k, (clip, param) in enumerate(zip(CLIPS, params, strict=True)):
        request_id = engine.add_request(engine.processor.prepare(conversation(clip, k)), param)
        ids[request_id], tokens[k], reasons[k] = k, [], None
        for _ in range(3 if k < 2 else 1):
            take(engine.step())
            steps += 1
    while engine.has_unfinished:
        take(engine.step())
        steps += 1
        if abort_at is not None and steps == abort_at:
            engine.abort(next(i for i, k in ids.items() if k == 1))
            reasons[1] = "abort"
    assert all_blocks_free(engine)
    return {k: (tokens[k], reasons[k]) for k in tokens}


@pytest.mark.parametrize("device", DEVICES)
def test_pipelined_decode_gives_what_the_plain_engine_gives(checkpoint, device):
    """Steps launched before the previous one is read: the same tokens, finish reasons and freed
    blocks as the plain engine, through stop tokens, min_new_tokens, seeded sampling, repetition
    penalties, arrivals mid-stream and an abort while a step is in flight."""
    model = load(checkpoint, device)
    fast, plain = engines(model, async_decode=True, max_batch=8)
    alone = plain.add_request(plain.processor.prepare(conversation(CLIPS[2], 2)),
                              SamplingParams(max_new_tokens=8, temperature=0))
    stop_token = [t for output in plain.run({alone}) for t in output.token_ids][4]  # request 2 stops early
    launches = []
    original = fast.pipeline._launch
    fast.pipeline._launch = lambda requests, ahead, tokens: launches.append(ahead) or original(requests, ahead, tokens)
    expected = mixed_run(plain, stop_token)
    assert mixed_run(fast, stop_token) == expected
    assert launches.count(1) > 3 * launches.count(0)  # most decode steps ran ahead
    assert expected[2][1] == "stop" and len(expected[2][0]) <= 5
    fast.pipeline._launch = original
    aborted = mixed_run(fast, stop_token, abort_at=12)
    assert aborted[1][1] == "abort" and len(aborted[1][0]) < len(expected[1][0])
    assert {k: v for k, v in aborted.items() if k != 1} == {k: v for k, v in expected.items() if k != 1}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_launching_a_pipelined_decode_step_never_waits_for_the_gpu(checkpoint):
    """Everything a step launches (input copies, graph replay, sampling with min_new_tokens, a
    repetition penalty and seeded top-k/top-p, the copy of the tokens back) runs under torch's sync
    debug mode set to error: a pageable copy or a .item() there would raise. Reading the finished
    step waits on its event, by design, outside that check."""
    model = load(checkpoint, "cuda", "bfloat16")
    fast, _ = engines(model, async_decode=True)
    original, checked, errors = fast.pipeline._launch, [], []

    def strict_launch(requests, ahead, tokens):
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = original(requests, ahead, tokens)
        except Exception as exc:  # the engine would fall back quietly: remember it
            errors.append(repr(exc))
            raise
        finally:
            torch.cuda.set_sync_debug_mode(0)
        checked.append(ahead)
        return result

    fast.pipeline._launch = strict_launch
    for k, clip in enumerate(CLIPS[:3]):
        params = SamplingParams(max_new_tokens=30, min_new_tokens=20, temperature=0.7 * k, top_k=20, top_p=0.9,
                                seed=k or None, repetition_penalty=1.1)
        fast.add_request(fast.processor.prepare(conversation(clip, k)), params)
    while fast.has_unfinished:
        fast.step()
    assert not errors
    assert checked.count(1) > 20


@pytest.fixture(scope="module")
def short_checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("gpu-short") / "ckpt", kv_heads=2, seed=5,
                            text_dims={"max_position_embeddings": 96})


@pytest.mark.parametrize("device", DEVICES)
def test_pipelined_decode_through_stop_strings_context_limit_preemption_and_reused_ids(short_checkpoint, device):
    """A 96-position model and a cache too small for every reply at once: the pipelined engine ends
    requests on a stop string and at the context limit, survives preemptions, and tells an aborted
    request from a new one that reuses its id, all as the plain engine does."""
    model = load(short_checkpoint, device)
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads, head dim 16, fp32
    fast, plain = engines(model, async_decode=True, max_batch=8, kv_cache_bytes=per_block * 15)
    probe = plain.add_request(plain.processor.prepare(conversation(SHORT[1], 0)),
                              SamplingParams(max_new_tokens=12, temperature=0))
    text = "".join(output.delta for output in plain.run({probe}))
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()

    def run(engine: Engine) -> dict[str, tuple[list[int], str | None]]:
        specs = {
            "stop": (SHORT[1], SamplingParams(max_new_tokens=40, temperature=0, stop=[stop])),
            "limit": (SHORT[0], SamplingParams(max_new_tokens=200, temperature=0)),
            "seeded": (SHORT[4], SamplingParams(max_new_tokens=50, temperature=0.9, seed=11, repetition_penalty=1.2)),
            "again": (SHORT[2], SamplingParams(max_new_tokens=30, temperature=0)),
        }
        results: dict[str, tuple[list[int], str | None]] = {name: ([], None) for name in specs}
        for k, (name, (clip, params)) in enumerate(specs.items()):
            engine.add_request(engine.processor.prepare(conversation(clip, k)), params, request_id=name)
        steps = 0
        while engine.has_unfinished:
            for output in engine.step():
                results[output.request_id][0].extend(output.token_ids)
                results[output.request_id] = (results[output.request_id][0], output.finish_reason)
            steps += 1
            if steps == 4:  # abort "again" with a step in flight, then reuse its id at once
                engine.abort("again")
                results["again"] = ([], None)
                engine.add_request(engine.processor.prepare(conversation(SHORT[3], 9)),
                                   SamplingParams(max_new_tokens=25, temperature=0), request_id="again")
        assert all_blocks_free(engine)
        return results

    expected, got = run(plain), run(fast)
    assert got == expected
    assert expected["stop"][1] == "stop" and stop in plain.processor.tokenizer.decode(expected["stop"][0])
    assert expected["limit"][1] == "length"
    assert len(expected["again"][0]) == 25 and expected["seeded"][1] == "length"
    limit_prompt = fast.processor.prepare(conversation(SHORT[0], 1)).num_tokens
    assert limit_prompt + len(expected["limit"][0]) == 96  # ended at the context, not at max_new_tokens
    assert fast.stats().preemptions > 0 and plain.stats().preemptions > 0


@pytest.mark.parametrize("device", DEVICES)
def test_each_pipelined_step_reads_back_its_own_tokens(checkpoint, device):
    """A step's tokens are read after the next step is launched, so each launch copies its tokens
    into the host buffer of its own turn: at every read the buffer still holds that step's tokens
    (on the CPU the copy is immediate, so a shared buffer would already hold the next step's)."""
    model = load(checkpoint, device)
    fast, _ = engines(model, async_decode=True)
    pipeline = fast.pipeline
    collect, reads = pipeline._collect, []

    def checked_collect(step):
        if step.done is not None:
            step.done.synchronize()
        reads.append((pipeline.inflight is not None, step.host.tolist() == step.tokens.tolist()))
        return collect(step)

    pipeline._collect = checked_collect
    for k, clip in enumerate(CLIPS[:3]):
        params = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0.8, seed=k)
        fast.add_request(fast.processor.prepare(conversation(clip, k)), params)
    while fast.has_unfinished:
        fast.step()
    assert sum(ahead for ahead, _ in reads) > 5  # most reads happened with the next step launched
    assert all(intact for _, intact in reads)
    hosts = fast.runner.static.sampled
    assert hosts[0].data_ptr() != hosts[1].data_ptr() and hosts[0].is_pinned() == (device == "cuda")
