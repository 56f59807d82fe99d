"""The full-size Qwen2-Audio-7B (8.4 B parameters, random weights) on this CPU: bf16, int8 and int4.

    python bench/full_size_cpu.py [--dir /tmp/q2a-7b] [--schemes bfloat16 int8 int4] [--threads 2]

Writes (once) a random checkpoint with the real config, names and shapes as bf16 safetensors shards,
one shard at a time (the model is never held whole), then, in a fresh process per scheme, loads it
with a 1 GiB KV cache and answers a question about a 30 s clip to 32 new tokens (greedy, end token
ignored), printing peak RSS, load time, time to first token and decode tok/s, and the decode ratios
against bf16. Random weights: the text is noise; the shapes, bytes and kernels are the real ones.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "data" / "qwen2-tokenizer"
SPEECH = ROOT / "tests" / "data" / "speech_en_16k.wav"
SHARD_BYTES = 2 * 2**30

# SPEC.md section 3: what the official config.json stores (the rest are Qwen2 / Whisper defaults).
CONFIG = {
    "architectures": ["Qwen2AudioForConditionalGeneration"], "model_type": "qwen2_audio",
    "audio_token_index": 151646, "ignore_index": -100, "torch_dtype": "bfloat16",
    "audio_config": {"model_type": "qwen2_audio_encoder", "d_model": 1280, "encoder_layers": 32,
                     "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "num_mel_bins": 128,
                     "max_source_positions": 1500, "activation_function": "gelu", "scale_embedding": False},
    "text_config": {"model_type": "qwen2", "vocab_size": 156032, "intermediate_size": 11008,
                    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                    "bos_token_id": 151643, "eos_token_id": 151645, "sliding_window": 32768,
                    "torch_dtype": "bfloat16"},
}

CHILD = r"""
import json, resource, sys, time
import numpy as np, soundfile, torch
directory, scheme, threads, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
compiled = sys.argv[6] == "1"
torch.set_num_threads(threads)
from qwen2audio import EngineOptions, Qwen2Audio, SamplingParams
options = EngineOptions(kv_cache_bytes=2**30, cpu_onednn=False, compile_decode=compiled)
started = time.perf_counter()
quantization = None if scheme == "bfloat16" else scheme
model = Qwen2Audio.from_pretrained(directory, device="cpu", dtype="bfloat16", progress=False,
                                   engine_options=options, quantization=quantization)
load_s = time.perf_counter() - started
speech, rate = soundfile.read(sys.argv[5], dtype="float32")
clip = np.resize(speech, 30 * rate)  # the speech repeated to fill 30 s
prompt = model.processor.prepare([{"role": "user", "content": [
    {"type": "audio", "audio": clip}, {"type": "text", "text": "What does the speaker say, and in what tone?"}]}])
eos = set(model.generation.eos_token_ids)
params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0)
engine = model.engine
compile_s = 0.0
if compiled:  # a short text request first, so that the compile is not timed as decoding
    started = time.perf_counter()
    warm = engine.add_request(model.processor.prepare([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]),
                              SamplingParams(max_new_tokens=3, min_new_tokens=3, temperature=0.0))
    list(engine.run({warm}))
    compile_s = time.perf_counter() - started
times, count = [], 0
start = time.perf_counter()
request = engine.add_request(prompt, params)
for output in engine.run({request}):
    if output.token_ids:
        count += len(output.token_ids)
        times.append((time.perf_counter(), count))
first_t, first_n = times[0]
last_t, last_n = times[-1]
print(json.dumps({"scheme": scheme, "compiled": compiled, "compile_s": compile_s,
                  "load_s": load_s, "prompt_tokens": output.prompt_tokens,
                  "ttft_s": first_t - start, "decode_tok_s": (last_n - first_n) / (last_t - first_t),
                  "tokens": last_n, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the official checkpoint, by its saved name (SPEC.md section 2)."""
    audio, text = CONFIG["audio_config"], CONFIG["text_config"]
    d, ffn, hidden, inter, vocab = audio["d_model"], audio["encoder_ffn_dim"], 4096, text["intermediate_size"], \
        text["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "audio_tower.conv1.weight": (d, 128, 3), "audio_tower.conv1.bias": (d,),
        "audio_tower.conv2.weight": (d, d, 3), "audio_tower.conv2.bias": (d,),
        "audio_tower.embed_positions.weight": (1500, d),
    }
    for n in range(audio["encoder_layers"]):
        p = f"audio_tower.layers.{n}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (d, d)
            if name != "k_proj":
                shapes[p + f"self_attn.{name}.bias"] = (d,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[p + f"{norm}.weight"], shapes[p + f"{norm}.bias"] = (d,), (d,)
        shapes |= {p + "fc1.weight": (ffn, d), p + "fc1.bias": (ffn,), p + "fc2.weight": (d, ffn), p + "fc2.bias": (d,)}
    shapes |= {"audio_tower.layer_norm.weight": (d,), "audio_tower.layer_norm.bias": (d,),
               "multi_modal_projector.linear.weight": (hidden, d), "multi_modal_projector.linear.bias": (hidden,),
               "language_model.model.embed_tokens.weight": (vocab, hidden)}
    for n in range(32):
        p = f"language_model.model.layers.{n}."
        for name in ("q_proj", "k_proj", "v_proj"):
            shapes[p + f"self_attn.{name}.weight"], shapes[p + f"self_attn.{name}.bias"] = (hidden, hidden), (hidden,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes |= {p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter),
                   p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
    shapes |= {"language_model.model.norm.weight": (hidden,), "language_model.lm_head.weight": (vocab, hidden)}
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    for start in range(0, flat.numel(), 2**26):  # fp32 scratch of 256 MB at most
        piece = flat[start:start + 2**26]
        piece.copy_(torch.randn(piece.numel(), generator=generator) * 0.02)
    return out


def write_checkpoint(directory: pathlib.Path) -> None:
    """The weights shard by shard, then the index, config and processor files."""
    if (directory / "model.safetensors.index.json").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes()
    total = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"writing {total / 1e9:.2f} B parameters to {directory}", flush=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, names in enumerate(tqdm(shards, desc="shards")):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: random_tensor(name, shapes[name], generator) for name in names}, directory / file,
                  metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [151643, 151645]}))
    write_processor_files(directory)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2))


def write_processor_files(directory: pathlib.Path) -> None:
    """The real Qwen2 vocabulary with the audio specials, saved by transformers' processor."""
    from transformers import AutoTokenizer, Qwen2AudioProcessor, WhisperFeatureExtractor

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    processor = Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), tokenizer,
                                    chat_template=tokenizer.chat_template)
    processor.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, directory / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/q2a-7b"))
    parser.add_argument("--schemes", nargs="+", default=["bfloat16", "int8", "int4"],
                        choices=["bfloat16", "int8", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--compile", action="store_true",
                        help="decode through the torch.compile'd step (compiled by a warm-up request, timed apart)")
    args = parser.parse_args()
    write_checkpoint(args.dir)
    results = {}
    for scheme in args.schemes:
        done = subprocess.run([sys.executable, "-c", CHILD, str(args.dir), scheme, str(args.threads),
                               str(args.new_tokens), str(SPEECH), "1" if args.compile else "0"],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"{scheme}: failed\n{done.stderr[-3000:]}", flush=True)
            continue
        results[scheme] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[scheme]), flush=True)
    print("| weights | peak RSS | load | time to first token | decode tok/s | decode vs bf16 |")
    print("|---|---|---|---|---|---|")
    base = results.get("bfloat16", {}).get("decode_tok_s")
    for scheme, r in results.items():
        ratio = f"{r['decode_tok_s'] / base:.2f}x" if base else "-"
        rss = r["peak_rss_gib"]
        print(f"| {scheme} | {rss:.2f} GiB = {rss * 2**30 / 1e9:.2f} GB | {r['load_s']:.0f} s | {r['ttft_s']:.1f} s "
              f"({r['prompt_tokens']} prompt tokens) | {r['decode_tok_s']:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
