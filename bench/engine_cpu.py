"""End-to-end generation on CPU: transformers `generate` vs our engine, side by side in one run.

    python bench/engine_cpu.py [--new-tokens 48] [--repeats 2]

One mid-size random checkpoint (decoder hidden 896, 8 layers, GQA 14/2 heads, vocab 32k; encoder
384 wide, 4 layers) in the real layout; the same requests for both, greedy, exactly --new-tokens
each (min = max): one request (a 9 s clip + question), then 8 concurrent requests (clips of 4-15 s).
Times include turning the conversation and audio arrays into model inputs.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from qwen2audio.api import Qwen2Audio

from checkpoints import build_checkpoint

TEXT = {"vocab_size": 32000, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 8,
        "num_attention_heads": 14, "num_key_value_heads": 2}
AUDIO = {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536}


def conversations(seconds: list[float], rng: np.random.Generator) -> tuple[list, list]:
    clips = [(rng.standard_normal(int(s * 16000)) * 0.1).astype(np.float32) for s in seconds]
    convs = [[{"role": "user", "content": [{"type": "audio", "audio": clip},
                                           {"type": "text", "text": "What does the person say?"}]}]
             for clip in clips]
    return convs, clips


def run_transformers(model, processor, convs, clips, new_tokens: int) -> float:
    start = time.perf_counter()
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
    inputs = processor(text=texts, audio=clips, sampling_rate=16000, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] - inputs.input_ids.shape[1] == new_tokens
    return time.perf_counter() - start


def run_ours(model: Qwen2Audio, convs, new_tokens: int) -> float:
    start = time.perf_counter()
    completions = model.generate(convs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0)
    assert all(len(c.token_ids) == new_tokens for c in completions)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides use it")
    args = parser.parse_args()
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    directory = build_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "mid", text_dims=TEXT, audio_dims=AUDIO,
                                 randomize=False)
    hf = Qwen2AudioForConditionalGeneration.from_pretrained(directory, dtype=getattr(torch, args.dtype)).eval()
    processor = AutoProcessor.from_pretrained(directory)
    processor.tokenizer.padding_side = "left"
    ours = Qwen2Audio.from_pretrained(directory, device="cpu", dtype=args.dtype, progress=False)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; "
          f"{args.new_tokens} new tokens per request")
    for label, seconds in (("1 request", [9.0]), ("8 concurrent", [4, 5.5, 7, 8.5, 10, 11.5, 13, 15])):
        convs, clips = conversations(seconds, rng)
        run_transformers(hf, processor, convs[:1], clips[:1], 2)  # warm-up
        run_ours(ours, convs[:1], 2)
        theirs, mine = [], []
        for _ in range(args.repeats):
            # Fresh clips every time: our encoder and prefix caches must not see a repeat.
            convs, clips = conversations(seconds, rng)
            theirs.append(run_transformers(hf, processor, convs, clips, args.new_tokens))
            mine.append(run_ours(ours, convs, args.new_tokens))
        t, m = statistics.median(theirs), statistics.median(mine)
        tokens = len(convs) * args.new_tokens
        print(f"{label:>13}: transformers {t:6.2f} s ({tokens / t:6.1f} tok/s)   "
              f"qwen2audio {m:6.2f} s ({tokens / m:6.1f} tok/s)   speed-up {t / m:4.2f}x")


if __name__ == "__main__":
    main()
