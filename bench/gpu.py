"""GPU benchmark: our engine against transformers' generate, full Qwen2-Audio-7B architecture.

    python bench/gpu.py [--requests 32] [--new-tokens 128] [--quantization int8 int4 fp8] [--output results.json]
    python bench/gpu.py --tiny --device cpu      # the same logic at toy size (the tests run this,
                                                 # with --clip-seconds 5: transformers' prefill is the cost)

Random weights are built in memory (no files): ours are drawn on the device, then transformers'
model takes a copy of the very same numbers, so both compute the same function on the same inputs
(our token ids and log-mel features, which the test suite checks against transformers' processor).
Before timing it checks that they agree: last-position logits of one prompt and greedy tokens,
and our CUDA-graph decode path against our eager path. Then, for both and as a ratio:

  - time to first token, one request with a 30 s clip (ours from the raw samples: features,
    encoder, prefill, first token; transformers from ready features);
  - decode tokens/s of that one request;
  - N concurrent requests (a distinct 30 s clip each, all arriving at once, --new-tokens each,
    end tokens banned until then on both sides): decode-phase tokens/s (after every request has
    its first token) and end-to-end output tokens/s (arrival to last token).

Runs only on what a GPU machine has: torch, transformers, triton, tokenizers, jinja2, numpy.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # runs from a plain checkout, no install
sys.path.insert(1, str(ROOT / "tests"))  # checkpoints.write_lora, for --lora

from qwen2audio.config import GenerationConfig, ModelConfig  # noqa: E402
from qwen2audio.engine.core import Engine  # noqa: E402
from qwen2audio.engine.options import EngineOptions  # noqa: E402
from qwen2audio.engine.request import SamplingParams  # noqa: E402
from qwen2audio.model.attention import AttentionMetadata  # noqa: E402
from qwen2audio.model.backend import Backend, choose_backend  # noqa: E402
from qwen2audio.model.qwen2_audio import Qwen2AudioForConditionalGeneration  # noqa: E402
from qwen2audio.model.weights import parameter_views  # noqa: E402
from qwen2audio.processor import Processor  # noqa: E402

TOKENIZER = ROOT / "tests" / "data" / "qwen2-tokenizer"
QUESTION = "What is happening in this recording? Describe the sounds and the speech in it."

FULL = {  # Qwen2-Audio-7B(-Instruct): SPEC.md section 3, Qwen2 defaults written out
    "model_type": "qwen2_audio", "audio_token_index": 151646,
    "audio_config": {"model_type": "qwen2_audio_encoder", "d_model": 1280, "encoder_layers": 32,
                     "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "num_mel_bins": 128,
                     "max_source_positions": 1500, "activation_function": "gelu", "scale_embedding": False},
    "text_config": {"model_type": "qwen2", "vocab_size": 156032, "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                    "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False},
}
TINY = {
    **FULL,
    "audio_config": {**FULL["audio_config"], "d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4,
                     "encoder_ffn_dim": 128},
    "text_config": {**FULL["text_config"], "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 4},
}
TARGETS = {"ttft_ms": 30.0, "decode_1": 220.0, "decode_n": 5000.0, "e2e_n": 2500.0}


@dataclass
class Figures:
    ttft_ms: float
    decode_1: float
    decode_n: float
    e2e_n: float


def log(message: str) -> None:
    print(message, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_network(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Our network with N(0, 0.02) weights (norms 1, their biases 0), drawn on the device, on the
    backend loading would choose there (the Triton kernels on CUDA; plain linears, which
    transformers copies from, on the CPU)."""
    model_config = ModelConfig.from_dict(config)
    backend = choose_backend(model_config.text, device, dtype, onednn=False)
    with torch.device("meta"):
        network = Qwen2AudioForConditionalGeneration(model_config, backend)
    network = network.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return network


def transformers_copy(config: dict, network, device: torch.device, dtype: torch.dtype):
    """transformers' Qwen2-Audio on the same weights (a copy: it keeps q/k/v and gate/up apart)."""
    import transformers

    hf_config = transformers.Qwen2AudioConfig(
        audio_config=config["audio_config"], text_config=config["text_config"],
        audio_token_index=config["audio_token_index"],
    )
    with torch.device(device):
        model = transformers.Qwen2AudioForConditionalGeneration._from_config(hf_config, dtype=dtype)
    model.eval().requires_grad_(False)
    params = dict(model.named_parameters())
    views = parameter_views(network, {name: tuple(p.shape) for name, p in params.items()})
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(views[name])
    return model


def processor_for(config: dict, directory: pathlib.Path) -> Processor:
    """The real Qwen2-Audio vocabulary and chat template (tests/data) beside this config."""
    for path in TOKENIZER.iterdir():
        shutil.copy(path, directory / path.name)
    (directory / "config.json").write_text(json.dumps(config))
    return Processor.from_pretrained(directory)


def clips(count: int, seconds: float, seed: int) -> list[np.ndarray]:
    """Distinct clips (noise under a tone sweep), so no cache can share work between requests."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return [(0.1 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (200 + 40 * k) * t)).astype(np.float32)
            for k in range(count)]


def conversation(clip: np.ndarray) -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": QUESTION}]}]


# --- ours -------------------------------------------------------------------------------------


@dataclass
class Ours:
    """One of our engines, and the processor that prepares its prompts (an engine takes prepared ones)."""

    engine: Engine
    processor: Processor
    adapters: tuple[str, ...] = ()  # LoRA adapters the requests take in turn
    submitted: int = 0

    def submit(self, clip: np.ndarray, params: SamplingParams) -> str:
        adapter = self.adapters[self.submitted % len(self.adapters)] if self.adapters else None
        self.submitted += 1
        return self.engine.add_request(replace(self.processor.prepare(conversation(clip)), adapter=adapter), params)


def ours_run(ours: Ours, batch: list[np.ndarray], new_tokens: int) -> tuple[float, float, float, list[list[int]]]:
    """All requests arrive at once: (seconds to every first token, to the last token, first token of
    the first request, token ids)."""
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0)
    start = time.perf_counter()
    engine = ours.engine
    ids = [ours.submit(clip, params) for clip in batch]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    first_token = None
    all_first = None
    while engine.has_unfinished:
        for output in engine.step():
            tokens[output.request_id].extend(output.token_ids)
        now = time.perf_counter() - start
        if first_token is None and tokens[ids[0]]:
            first_token = now
        if all_first is None and all(tokens.values()):
            all_first = now
    total = time.perf_counter() - start
    assert all(len(t) == new_tokens for t in tokens.values()), "a request ended early"
    return all_first, total, first_token, [tokens[i] for i in ids]


def measure_ours(engine: Ours, requests: int, new_tokens: int, repeats: int, seconds: float) -> Figures:
    seed = iter(range(1000, 2000))
    ours_run(engine, clips(1, seconds, next(seed)), 4)  # warm-up: first prefill shapes, kernels
    ours_run(engine, clips(requests, seconds, next(seed)), 4)
    singles = [ours_run(engine, clips(1, seconds, next(seed)), new_tokens) for _ in range(repeats)]
    ttft = statistics.median(s[2] for s in singles)
    decode_1 = statistics.median((new_tokens - 1) / (s[1] - s[0]) for s in singles)
    batches = [ours_run(engine, clips(requests, seconds, next(seed)), new_tokens)
               for _ in range(max(1, repeats - 1))]
    decode_n = statistics.median(requests * (new_tokens - 1) / (b[1] - b[0]) for b in batches)
    e2e_n = statistics.median(requests * new_tokens / b[1] for b in batches)
    return Figures(1000 * ttft, decode_1, decode_n, e2e_n)


def profile_ours(ours: Ours, requests: int, directory: pathlib.Path, device: torch.device, seconds: float) -> None:
    """Kernel tables for the next tuning round, written to ``directory``: one clip request's
    prefill (features, encoder, prefill, first token), and 12 decode steps of ``requests`` requests
    in steady state. Best effort: a profiler that fails here does not stop the benchmark."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    params = SamplingParams(max_new_tokens=64, min_new_tokens=64, temperature=0)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with profile(activities=activities) as prefill:
            ours_run(ours, clips(1, seconds, 5000), 1)
        (directory / "profile_prefill.txt").write_text(prefill.key_averages().table(sort_by=sort, row_limit=40))
        engine = ours.engine
        ids = [ours.submit(clip, params) for clip in clips(requests, seconds, 5001)]
        seen: set[str] = set()
        while len(seen) < len(ids):  # every request past its prefill
            seen.update(output.request_id for output in engine.step())
        for _ in range(4):
            engine.step()
        synchronize(device)
        with profile(activities=activities) as decode:
            for _ in range(12):
                engine.step()
            synchronize(device)
        (directory / "profile_decode.txt").write_text(decode.key_averages().table(sort_by=sort, row_limit=40))
        for request_id in ids:
            engine.abort(request_id)
    except Exception as exc:  # diagnostics only
        log(f"   profiling failed: {type(exc).__name__}: {exc}")


# --- transformers ------------------------------------------------------------------------------


def hf_inputs(processor: Processor, batch: list[np.ndarray], device: torch.device, dtype: torch.dtype) -> dict:
    """Our token ids and features for transformers (every prompt here has the same length)."""
    prompts = [processor.prepare(conversation(clip)) for clip in batch]
    assert len({p.num_tokens for p in prompts}) == 1
    features = processor.feature_extractor([a for p in prompts for a in p.audios], device=device)
    ids = torch.tensor([p.token_ids for p in prompts], device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "input_features": features.input_features.to(dtype),
            "feature_attention_mask": features.feature_attention_mask}


class StepClock:
    """A transformers streamer that only notes when each put arrives: first the prompt, then every
    step's new tokens (generate copies them to the host, so the times are when they exist)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class HFRun:
    total: float  # seconds from the call to the last token
    first: float  # seconds from the call to the first new token
    tokens: torch.Tensor  # [B, new tokens]


def hf_generate(model, inputs: dict, new_tokens: int, device: torch.device) -> HFRun:
    clock = StepClock()
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock)
    synchronize(device)
    total = time.perf_counter() - start
    return HFRun(total, clock.times[1] - start if len(clock.times) > 1 else total,
                 out[:, inputs["input_ids"].shape[1]:])


def measure_transformers(model, processor: Processor, requests: int, new_tokens: int, repeats: int,
                         device: torch.device, dtype: torch.dtype, seconds: float) -> Figures:
    """Times within each run (a streamer marks the first token), medians over runs."""
    seed = iter(range(1000, 2000))
    single = hf_inputs(processor, clips(1, seconds, next(seed)), device, dtype)
    batch = hf_inputs(processor, clips(requests, seconds, next(seed)), device, dtype)
    hf_generate(model, single, 4, device)  # warm-up
    hf_generate(model, batch, 2, device)
    singles = [hf_generate(model, single, new_tokens, device) for _ in range(repeats)]
    batches = [hf_generate(model, batch, new_tokens, device) for _ in range(max(1, repeats - 1))]
    return Figures(
        1000 * statistics.median(run.first for run in singles),
        statistics.median((new_tokens - 1) / (run.total - run.first) for run in singles),
        statistics.median(requests * (new_tokens - 1) / (run.total - run.first) for run in batches),
        statistics.median(requests * new_tokens / run.total for run in batches),
    )


# --- agreement -----------------------------------------------------------------------------------


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def our_prompt_logits(network, processor: Processor, clip: np.ndarray, device: torch.device) -> torch.Tensor:
    """Last-position logits of one prompt through the eager network (no cache, no kernels)."""
    prompt = processor.prepare(conversation(clip))
    features = processor.feature_extractor(prompt.audios, device=device)
    with torch.inference_mode():
        audio = network.encode_audio(features.input_features, features.feature_attention_mask,
                                     features.window_tokens)
        index = torch.arange(prompt.offsets[0], prompt.offsets[0] + audio.shape[0], device=device)
        ids = torch.tensor(prompt.token_ids, device=device)
        hidden = network(ids, torch.arange(len(ids), device=device), AttentionMetadata.prefill([len(ids)]),
                         None, audio, index)
        return network.logits(hidden[-1:])[0].float().cpu()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- the run ------------------------------------------------------------------------------------


@contextlib.contextmanager
def section(name: str, report: dict, output: str | None) -> Iterator[None]:
    """Log a phase and its duration; the report so far is saved after each one, so a run cut short
    by a time limit still leaves its figures."""
    started = time.perf_counter()
    log(f"-- {name}")
    yield
    log(f"   ({time.perf_counter() - started:.1f} s)")
    report.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
    if output:
        pathlib.Path(output).write_text(json.dumps(report, indent=2, default=vars))


def release() -> None:
    """Return the memory of engines and models just dropped (their KV caches are large)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def kv_bytes(config: dict, tokens: int, dtype: torch.dtype) -> int:
    text = config["text_config"]
    per_token = (2 * text["num_hidden_layers"] * text["num_key_value_heads"]
                 * (text["hidden_size"] // text["num_attention_heads"]) * torch.empty((), dtype=dtype).element_size())
    return per_token * tokens


def print_table(results: dict[str, Figures], requests: int, seconds: float) -> None:
    """One row per figure; a column per run, then each of ours against transformers and the target."""
    rows = [(f"time to first token, {seconds:g} s clip (ms)", "ttft_ms", True),
            ("decode, 1 request (tok/s)", "decode_1", False),
            (f"decode phase, {requests} requests (tok/s)", "decode_n", False),
            (f"end to end, {requests} requests (tok/s)", "e2e_n", False)]
    theirs = results.get("transformers")
    ours = [name for name in results if name != "transformers"]
    header = f"{'figure':42s}" + "".join(f"{name:>14s}" for name in results)
    header += "".join(f"{name + ' ratio':>18s}" for name in ours if theirs) + f"{'target':>8s}  met ({ours[0]})"
    log(header)
    for label, key, lower_better in rows:
        line = f"{label:42s}" + "".join(f"{getattr(f, key):14.1f}" for f in results.values())
        for name in ours if theirs else []:
            mine, other = getattr(results[name], key), getattr(theirs, key)
            line += f"{(other / mine if lower_better else mine / other):17.2f}x"
        mine = getattr(results[ours[0]], key)
        met = mine <= TARGETS[key] if lower_better else mine >= TARGETS[key]
        log(line + f"{TARGETS[key]:8.0f}  {'yes' if met else 'NO'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy dimensions (a CPU check of this script)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clip-seconds", type=float, default=30.0,
                        help="length of every request's clip (the targets are for 30 s; shorter for quick checks)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--no-fp8-kv", action="store_true", help="skip the run with an fp8 KV cache")
    parser.add_argument("--quantization", nargs="+", default=[], choices=["int8", "int4", "fp8"],
                        help="also measure ours with the decoder's weights quantized from the same numbers "
                             "(logits against the unquantized network are reported)")
    parser.add_argument("--lora", type=int, default=0, metavar="N",
                        help="also measure ours with N LoRA adapters (every decoder projection), requests in turn")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--check-only", action="store_true",
                        help="only the checks (fast vs eager, ours vs transformers), no timings: e.g. in float32")
    parser.add_argument("--output", help="write the figures and checks here as JSON")
    parser.add_argument("--profile-dir", help="also write kernel tables of our prefill and decode steps here")
    return parser.parse_args()


class Bench:
    """One run: the network, the processor, and the report that every phase adds to."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device, self.dtype = torch.device(args.device), getattr(torch, args.dtype)
        self.config = TINY if args.tiny else FULL
        self.report: dict = {
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "requests": args.requests,
            "new_tokens": args.new_tokens, "tiny": args.tiny, "clip_seconds": args.clip_seconds,
        }
        self.results: dict[str, Figures] = {}
        self.report["figures"] = self.results  # saved as it fills
        log(json.dumps(self.report))
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="qwen2audio-bench-"))
        self.processor = processor_for(self.config, self.workdir)
        self.options = EngineOptions(
            kv_cache_bytes=kv_bytes(self.config, args.requests * 1024 + 4096, self.dtype),
            max_running=max(args.requests, 1), max_graph_batch=max(args.requests, 1),
            static_decode=True,  # the default with CUDA graphs; said here so the CPU check runs that path too
            async_decode=True,  # likewise
        )
        self.probe = clips(1, args.clip_seconds, 7)[0]
        with self.section("building the network (random weights, on the device)"):
            self.network = random_network(self.config, self.device, self.dtype)
            self.report["parameters_b"] = sum(p.numel() for p in self.network.parameters()) / 1e9

    def section(self, name: str) -> contextlib.AbstractContextManager[None]:
        return section(name, self.report, self.args.output)

    def engine(self, options: EngineOptions, network: Qwen2AudioForConditionalGeneration | None = None) -> Ours:
        generation = GenerationConfig(frozenset({self.processor.tokenizer.eos_id}))
        engine = Engine(network or self.network, self.processor.tokenizer, self.processor.feature_extractor,
                        generation, options)
        return Ours(engine, self.processor)

    def check_paths(self) -> None:
        """Greedy tokens of our fast path (kernels, graphs, pipelining) against our eager path."""
        with self.section("our fast path against our eager path (greedy tokens, one request)"):
            eager = self.engine(EngineOptions(kv_cache_bytes=kv_bytes(self.config, 2048, self.dtype),
                                              enforce_eager=True, async_decode=False),
                                self.network.with_backend(Backend()))
            eager_tokens = ours_run(eager, [self.probe], 32)[3][0]
            del eager
            release()
            self.fast_tokens = ours_run(self.engine(self.options), [self.probe], 32)[3][0]
            release()
            agree = self.report["fast_vs_eager_common_prefix"] = common_prefix(self.fast_tokens, eager_tokens)
            log(f"   fast and eager agree on the first {agree} of 32 greedy tokens")
            self.our_logits = our_prompt_logits(self.network.with_backend(Backend()), self.processor, self.probe,
                                                self.device)

    def measure(self, name: str, options: EngineOptions, network: Qwen2AudioForConditionalGeneration | None = None,
                adapters: Sequence[pathlib.Path] = ()) -> None:
        """Our four figures with these engine options; a side run checks its tokens against the default's
        (not with ``adapters``, which change the replies: each request takes the next adapter)."""
        args = self.args
        with self.section(f"{name}: 1 request, then {args.requests} at once, {args.new_tokens} new tokens each"):
            engine = self.engine(options, network)
            for path in adapters:
                engine.engine.load_adapter(path, path.name)
            engine.adapters = tuple(path.name for path in adapters)
            if (options != self.options or network is not None) and not adapters:
                agree = common_prefix(ours_run(engine, [self.probe], 32)[3][0], self.fast_tokens)
                self.report[f"{name} vs ours common prefix"] = agree
                log(f"   greedy tokens agree with the default engine's on the first {agree} of 32")
            self.results[name] = measure_ours(engine, args.requests, args.new_tokens, args.repeats, args.clip_seconds)
            if args.profile_dir and options == self.options:
                profile_ours(engine, args.requests, pathlib.Path(args.profile_dir), self.device, args.clip_seconds)
            del engine
            release()

    def measure_quantized(self, scheme: str) -> None:
        """Ours on a copy of the network whose decoder is quantized from the same weights."""
        from qwen2audio.model.quant import QuantConfig, quantize_network

        with self.section(f"ours {scheme}: quantizing a copy of the network"):
            network = quantize_network(self.network.with_backend(self.network.backend), QuantConfig(scheme), self.dtype)
            logits = our_prompt_logits(network, self.processor, self.probe, self.device)
            self.report[f"ours {scheme} logits_relative_l2"] = relative(logits, self.our_logits)
            log(f"   last-position logits against the unquantized network: relative L2 "
                f"{self.report[f'ours {scheme} logits_relative_l2']:.2e}")
        self.measure(f"ours {scheme}", self.options, network)
        del network
        release()

    def measure_lora(self, count: int, rank: int) -> None:
        """Ours with ``count`` rank-``rank`` adapters on every decoder projection, requests in turn."""
        from checkpoints import write_lora

        paths = [write_lora(self.workdir / f"lora{k}", self.workdir, rank, k) for k in range(count)]
        options = replace(self.options, max_loras=count, max_lora_rank=rank)
        self.measure(f"ours {count} LoRA", options, adapters=paths)

    def compare_with_transformers(self, timed: bool = True) -> None:
        """transformers on a copy of the same weights: logits and greedy tokens, then its figures."""
        args, report = self.args, self.report
        with self.section("transformers on the same weights"):
            model = transformers_copy(self.config, self.network, self.device, self.dtype)
            inputs = hf_inputs(self.processor, [self.probe], self.device, self.dtype)
            with torch.inference_mode():
                hf_logits = model(**inputs).logits[0, -1].float().cpu()
            hf_tokens = hf_generate(model, inputs, 32, self.device).tokens[0].tolist()
            report["logits_relative_l2"] = relative(self.our_logits, hf_logits)
            report["same_first_token"] = bool(self.our_logits.argmax() == hf_logits.argmax())
            report["greedy_common_prefix"] = common_prefix(self.fast_tokens, hf_tokens)
            try:  # diagnostics: the same prompt through our kernels (no cache) against transformers
                kernels = our_prompt_logits(self.network, self.processor, self.probe, self.device)
                report["kernels_logits_relative_l2"] = relative(kernels, hf_logits)
                log(f"   our kernels' logits against transformers': relative L2 {relative(kernels, hf_logits):.2e}")
            except Exception as exc:
                log(f"   kernels' logits not taken: {type(exc).__name__}: {exc}")
            log(f"   last-position logits: relative L2 difference {report['logits_relative_l2']:.2e}, "
                f"same argmax: {report['same_first_token']}; greedy tokens agree on the first "
                f"{report['greedy_common_prefix']} of 32")
        if not timed:
            return
        with self.section(f"transformers: 1 request, then {args.requests} at once"):
            self.results["transformers"] = measure_transformers(
                model, self.processor, args.requests, args.new_tokens, args.repeats, self.device, self.dtype,
                args.clip_seconds)
            del model
            release()

    def finish(self) -> None:
        report = self.report
        report.update({name: vars(figures) for name, figures in self.results.items()})
        del report["figures"]
        if self.results:
            print_table(self.results, self.args.requests, self.args.clip_seconds)
        shutil.rmtree(self.workdir, ignore_errors=True)
        tolerance = 1e-4 if self.dtype == torch.float32 else 5e-2  # bf16: rounding differs op by op
        report["agree"] = self.args.skip_transformers or report["logits_relative_l2"] < tolerance
        log(json.dumps(report))
        if self.args.output:
            pathlib.Path(self.args.output).write_text(json.dumps(report, indent=2, default=vars))
        if not report["agree"]:
            raise SystemExit("ours and transformers disagree on the same weights and inputs")


def main() -> None:
    args = parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    bench = Bench(args)
    bench.check_paths()
    if args.check_only:
        bench.compare_with_transformers(timed=False)
        bench.finish()
        return
    bench.measure("ours", bench.options)
    if not args.skip_transformers:  # before the variants: a run cut by its time limit keeps the oracle check
        bench.compare_with_transformers()
    if args.lora:
        bench.measure_lora(args.lora, args.lora_rank)
    for scheme in args.quantization:
        bench.measure_quantized(scheme)
    if not args.no_fp8_kv:
        bench.measure("ours fp8 KV", replace(bench.options, kv_cache_dtype="fp8"))
    bench.finish()


if __name__ == "__main__":
    main()
