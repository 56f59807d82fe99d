"""Checkpoint loading: time and peak host memory, ours vs transformers, each in a fresh process.

    python bench/load.py [--dir /tmp/q2a-1gb] [--dtype float32]

Builds (once) a ~1.1 GB random checkpoint in the real Hugging Face layout with transformers, then
loads it in a child process per loader and reports wall time (until every weight page is resident)
and peak RSS growth over the RSS the process had just before loading (imports excluded), relative to
the weight files' size.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys

TOKENIZER = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "qwen2-tokenizer"

CHILD = r"""
import json, resource, sys, time
import torch
which, directory, dtype = sys.argv[1:4]
if which == "transformers":
    from transformers import Qwen2AudioForConditionalGeneration as M
    import transformers.models.qwen2_audio.processing_qwen2_audio
else:
    from qwen2audio.api import Qwen2Audio as M
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
before = rss_kb()
start = time.perf_counter()
if which == "transformers":  # users load the processor too, as our from_pretrained does
    from transformers import AutoProcessor
    model = M.from_pretrained(directory, dtype=getattr(torch, dtype))
    processor = AutoProcessor.from_pretrained(directory)
else:
    model = M.from_pretrained(directory, device="cpu", dtype=dtype, progress=False).network
# transformers maps the files and reads lazily: touch one element per page of every parameter so
# both loaders are timed and measured with the weights actually in memory.
for param in model.parameters():
    param.detach().reshape(-1)[::512].sum()
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": elapsed, "rss_before_kb": before, "peak_kb": peak}))
"""


def build(directory: pathlib.Path) -> None:
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig(
        audio_config={"d_model": 512, "encoder_layers": 4, "encoder_attention_heads": 8, "encoder_ffn_dim": 2048},
        text_config={"vocab_size": 152064, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
                     "num_attention_heads": 12, "num_key_value_heads": 12, "rms_norm_eps": 1e-5},
        audio_token_index=151646,
    )
    torch.manual_seed(0)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(directory)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # the real Qwen2-Audio tokenizer
        shutil.copy(TOKENIZER / name, directory / name)


def measure(which: str, directory: pathlib.Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(directory), dtype], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{which} failed to load:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/q2a-1gb"))
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if not (args.dir / "config.json").is_file():
        build(args.dir)
    if not (args.dir / "preprocessor_config.json").is_file():
        from transformers import WhisperFeatureExtractor

        WhisperFeatureExtractor(feature_size=128).save_pretrained(args.dir)
    weights = sum(p.stat().st_size for p in args.dir.glob("*.safetensors"))
    print(f"checkpoint {args.dir}: {weights / 1e9:.2f} GB of safetensors, loading as {args.dtype}")
    results = {which: measure(which, args.dir, args.dtype) for which in ("qwen2audio", "transformers")}
    for which, r in results.items():
        growth = (r["peak_kb"] - r["rss_before_kb"]) * 1024
        print(f"{which:>13}: {r['seconds']:6.2f} s   peak RSS growth {growth / 1e9:5.2f} GB "
              f"= {growth / weights:.2f}x weights   (absolute peak {r['peak_kb'] / 1e6:.2f} GB)")
    ratio = results["transformers"]["seconds"] / results["qwen2audio"]["seconds"]
    print(f"load time ratio (transformers / qwen2audio): {ratio:.1f}x")


if __name__ == "__main__":
    main()
