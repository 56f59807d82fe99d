"""A 1-replica Ray batch job against a plain in-process run of the same items, side by side.

    python bench/ray_batch.py [--work /tmp/ray-batch-bench] [--items 384] [--new-tokens 32] [--repeats 2]

The mid-size checkpoint of bench/engine_cpu.py (decoder 896 wide, 8 layers; encoder 384 wide),
``--items`` distinct clips of real speech (the test clips cut, scaled and lightly noised per item,
2-11 s) with a question each, greedy to exactly
``--new-tokens``. Each side runs in a fresh process and is timed end to end, as a user waits for it:
in-process = load the model, generate in batches of 16, write the JSONL; Ray = ``BatchJob.run()``
with one replica taking both cores (so it decodes audio itself), which loads the model in the
replica and either starts a local Ray cluster itself ("Ray, new cluster") or joins one already
running (``ray start --head``, as on a cluster: "Ray, running cluster"). Rounds alternate the
sides; medians are compared, and the outputs are checked equal.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
CLIPS = ["speech_en_16k.wav", "question_en_16k.wav", "speech_zh_16k.wav", "speech_en_48k.flac"]

PLAIN = r"""
import json, sys, time
import torch
started = time.perf_counter()
torch.set_num_threads(2)
from qwen2audio import Qwen2Audio
checkpoint, manifest, output, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
items = [json.loads(line) for line in open(manifest)]
model = Qwen2Audio.from_pretrained(checkpoint, device="cpu", progress=False)
with open(output, "w") as sink:
    for start in range(0, len(items), 16):
        batch = items[start:start + 16]
        conversations = [[{"role": "user", "content": [{"type": "audio", "audio": i["audio"]},
                                                       {"type": "text", "text": i["question"]}]}] for i in batch]
        for item, reply in zip(batch, model.generate(conversations, temperature=0.0, max_new_tokens=tokens,
                                                     min_new_tokens=tokens)):
            sink.write(json.dumps({"id": item["id"], "text": reply.text}) + "\n")
print(json.dumps({"seconds": time.perf_counter() - started}))
"""

RAY = r"""
import json, sys, time
started = time.perf_counter()
from qwen2audio.distributed.batch import BatchJob
checkpoint, manifest, output, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
job = BatchJob(model=checkpoint, input=manifest, output=output, task="chat", replicas=1, cpus_per_replica=2,
               batch_size=16, device="cpu", sampling={"max_new_tokens": tokens, "min_new_tokens": tokens},
               ray_address=sys.argv[5] if len(sys.argv) > 5 else None)
summary = job.run(progress=False)
assert summary.generated == summary.items and not summary.failures, summary.text()
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def prepare(work: pathlib.Path, count: int) -> tuple[pathlib.Path, pathlib.Path]:
    from engine_cpu import AUDIO, TEXT

    from checkpoints import build_checkpoint

    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        build_checkpoint(checkpoint, seed=3, text_dims=TEXT, audio_dims=AUDIO)
    manifest = work / "items.jsonl"
    rows = [{"id": f"item-{n:03d}", "audio": str(clip(work, n)),
             "question": f"What does the speaker say in recording {n}?"} for n in range(count)]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return checkpoint, manifest


def clip(work: pathlib.Path, number: int) -> pathlib.Path:
    """A distinct clip per item (a test recording, cut and scaled its own way, with a little noise):
    repeated audio would be served from the encoder and prefix caches and time nothing."""
    import numpy as np
    import soundfile

    path = work / "clips" / f"{number:03d}.wav"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        rng = np.random.default_rng(number)
        samples, rate = soundfile.read(ROOT / "tests" / "data" / CLIPS[number % len(CLIPS)], dtype="float32")
        samples = samples if samples.ndim == 1 else samples.mean(axis=1)
        start = int(rng.integers(0, len(samples) // 4))
        noisy = samples[start:] * rng.uniform(0.5, 1.0) + rng.normal(0, 0.003, len(samples) - start)
        soundfile.write(path, noisy.astype(np.float32), rate)
    return path


def run(code: str, checkpoint: pathlib.Path, manifest: pathlib.Path, output: pathlib.Path, tokens: int,
        *extra: str) -> float:
    output.unlink(missing_ok=True)
    return result(code, str(checkpoint), str(manifest), str(output), str(tokens), *extra)["seconds"]


def result(code: str, *args: str) -> dict:
    """What ``code`` run in a fresh interpreter with ``args`` printed last, as JSON."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def texts(path: pathlib.Path) -> dict[str, str]:
    return {row["id"]: row["text"] for row in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/ray-batch-bench"))
    parser.add_argument("--items", type=int, default=384)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, manifest = prepare(args.work, args.items)
    times: dict[str, list[float]] = {"in-process": [], "Ray, new cluster": [], "Ray, running cluster": []}
    for round_ in range(args.repeats):
        times["in-process"].append(run(PLAIN, checkpoint, manifest, args.work / "plain.jsonl", args.new_tokens))
        times["Ray, new cluster"].append(run(RAY, checkpoint, manifest, args.work / "ray.jsonl", args.new_tokens))
        subprocess.run(["ray", "start", "--head", "--num-cpus", "2", "--include-dashboard", "false"], check=True,
                       capture_output=True)
        try:
            times["Ray, running cluster"].append(run(RAY, checkpoint, manifest, args.work / "ray-running.jsonl",
                                                     args.new_tokens, "auto"))
        finally:
            subprocess.run(["ray", "stop", "--force"], capture_output=True)
        print(f"round {round_ + 1}: " + ", ".join(f"{side} {t[-1]:.1f} s" for side, t in times.items()), flush=True)
    expected = texts(args.work / "plain.jsonl")
    same = all(texts(args.work / name) == expected for name in ("ray.jsonl", "ray-running.jsonl"))
    plain = statistics.median(times["in-process"])
    print(f"{args.items} items x {args.new_tokens} tokens, outputs equal: {same}")
    for side, values in times.items():
        value = statistics.median(values)
        print(f"  {side}: {value:.1f} s ({args.items / value:.2f} items/s), {value / plain:.3f}x in-process")

if __name__ == "__main__":
    main()
