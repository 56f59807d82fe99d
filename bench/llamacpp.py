"""Ours against llama.cpp on one random checkpoint, same clip and question, 2 threads each, interleaved.

    python bench/llamacpp.py [--llama-cpp DIR] [--work /tmp/llamacpp-bench] [--repeats 2] [--compile]

Builds llama.cpp (``llama-mtmd-cli``, ``llama-quantize``) from the source the ``llama-cpp-python``
sdist carries, unless ``--llama-cpp`` names a directory holding them already built; on a CPU with
AMX, ggml is built with ``-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`` (its AMX kernels crashed in
Q8_0/Q4_K_M warm-up on such a machine). Writes a mid-size random checkpoint (a Qwen2-0.5B-shaped
decoder with the real 151,936-word vocabulary, a 1280-wide 4-layer encoder), converts it with
llama.cpp's ``convert_hf_to_gguf.py`` (text in f32, ``--mmproj`` for the audio side), quantizes it to
Q8_0 and Q4_K_M, and times the pairs f32/ours float32, Q8_0/ours int8, Q4_K_M/ours int4 on a 10 s
clip to 64 new tokens (greedy, end token ignored), each side timed by its own clock: llama.cpp's
``--perf`` figures (audio encoding, then prompt eval, which includes decoding the audio tokens into
the context; decode rate from its eval time), ours from the request's submission. Needs
``sentencepiece`` for llama.cpp's converter. llama.cpp pads every clip to a 30 s window, so
ours also runs the clip padded to 30 s: the row with equal prompt length.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tarfile

import numpy as np
import soundfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
SPEECH = ROOT / "tests" / "data" / "speech_en_16k.wav"
QUESTION = "What does the speaker say?"
TEXT = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 8192}
AUDIO = {"d_model": 1280, "encoder_layers": 4, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120}
PAIRS = [("f32", "float32"), ("Q8_0", "int8"), ("Q4_K_M", "int4")]
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

OURS = r"""
import json, sys, time
import numpy as np, soundfile, torch
directory, scheme, clip_path, new_tokens, pad, question, compiled = sys.argv[1:8]
torch.set_num_threads(2)
from qwen2audio import EngineOptions, Qwen2Audio, SamplingParams
quantization = scheme if scheme in ("int8", "int4") else None
model = Qwen2Audio.from_pretrained(directory, device="cpu", dtype="auto" if quantization else scheme,
                                   progress=False, quantization=quantization,
                                   engine_options=EngineOptions(enable_prefix_cache=False,
                                                                compile_decode=compiled == "1"))
clip, rate = soundfile.read(clip_path, dtype="float32")
if pad == "1":
    clip = np.concatenate([clip, np.zeros(30 * rate - len(clip), np.float32)])
prompt = model.processor.prepare([{"role": "user", "content": [{"type": "audio", "audio": clip},
                                                               {"type": "text", "text": question}]}])
params = SamplingParams(max_new_tokens=int(new_tokens), min_new_tokens=int(new_tokens), temperature=0.0)
def once():
    times, count = [], 0
    start = time.perf_counter()
    request = model.engine.add_request(prompt, params)
    for output in model.engine.run({request}):
        if output.token_ids:
            count += len(output.token_ids)
            times.append((time.perf_counter(), count))
    (t0, n0), (t1, n1) = times[0], times[-1]
    return {"ttft_s": t0 - start, "decode_tok_s": (n1 - n0) / (t1 - t0), "prompt_tokens": output.prompt_tokens}
once()  # warm-up, as llama.cpp warms up before timing (and, with compile_decode, the compile)
print(json.dumps({**once(), "dtype": str(model.dtype)}))
"""


def llama_binaries(given: pathlib.Path | None, work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, str]:
    """(bin directory, llama.cpp source directory, which build) — built from the sdist if not given."""
    if given is not None:
        for candidate in (given, given / "build" / "bin", given / "bin"):
            if (candidate / "llama-mtmd-cli").is_file():
                source = given if (given / "convert_hf_to_gguf.py").is_file() else _sdist_source(work)
                return candidate, source, f"given: {candidate}"
        sys.exit(f"--llama-cpp {given}: no llama-mtmd-cli there (nor in build/bin, bin)")
    source = _sdist_source(work)
    amx = "amx_tile" in pathlib.Path("/proc/cpuinfo").read_text()
    flags = NO_AMX if amx else ""
    build = source / "build"
    if not (build / "bin" / "llama-mtmd-cli").is_file():
        subprocess.run(["cmake", "-B", str(build), "-S", str(source), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"],
                       check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "llama-mtmd-cli",
                        "llama-quantize"], check=True, capture_output=True)
    return build / "bin", source, "sdist build, native" + (f" with {flags}" if flags else "")


def _sdist_source(work: pathlib.Path) -> pathlib.Path:
    found = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(work),
                    "llama-cpp-python"], check=True, capture_output=True)
    archive = sorted(work.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def legacy_names(checkpoint: pathlib.Path) -> None:
    """Rename the tensors to the official checkpoints' layout (SPEC.md section 2): transformers 5.x
    saves its in-memory names, which llama.cpp's converter does not map."""
    from safetensors.torch import load_file, save_file

    from qwen2audio.model.weights import canonical_name

    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    save_file({canonical_name(name): tensor for name, tensor in tensors.items()}, path, metadata={"format": "pt"})


def ggufs(checkpoint: pathlib.Path, source: pathlib.Path, bins: pathlib.Path, work: pathlib.Path
          ) -> dict[str, pathlib.Path]:
    """The text model in f32, Q8_0 and Q4_K_M, and the audio projector (key "mmproj")."""
    out = {"f32": work / "text-f32.gguf", "mmproj": work / "mmproj-f32.gguf"}
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    convert = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", "f32"]
    if not out["f32"].is_file():
        subprocess.run([*convert, "--outfile", str(out["f32"])], check=True, capture_output=True, env=env)
    if not out["mmproj"].is_file():
        subprocess.run([*convert, "--mmproj", "--outfile", str(out["mmproj"])], check=True, capture_output=True,
                       env=env)
    for kind in ("Q8_0", "Q4_K_M"):
        out[kind] = work / f"text-{kind}.gguf"
        if not out[kind].is_file():
            subprocess.run([str(bins / "llama-quantize"), str(out["f32"]), str(out[kind]), kind, "2"], check=True,
                           capture_output=True)
    return out


def run_llama(bins: pathlib.Path, model: pathlib.Path, mmproj: pathlib.Path, clip: pathlib.Path,
              new_tokens: int) -> dict:
    """One llama-mtmd-cli run; its own timings: audio encode + decode into the context + prompt
    eval until the first token, and its decode rate."""
    command = [str(bins / "llama-mtmd-cli"), "-m", str(model), "--mmproj", str(mmproj), "--audio", str(clip),
               "-p", QUESTION, "-n", str(new_tokens), "-t", "2", "--temp", "0", "--ignore-eos", "-c", "4096",
               "--perf", "-lv", "4"]
    done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=1800)
    log = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"llama-mtmd-cli failed:\n{log[-3000:]}")
    encoded = sum(float(x) for x in re.findall(r"mtmd batch encoding done in (\d+) ms", log))
    prompt = re.search(r"prompt eval time =\s+([\d.]+) ms /\s+(\d+) tokens", log)
    decode = re.search(r"\s eval time =\s+([\d.]+) ms /\s+(\d+) runs", log)
    if not (encoded and prompt and decode):
        raise RuntimeError(f"no timings in llama-mtmd-cli's log:\n{log[-3000:]}")
    # The prompt eval covers the audio tokens decoded into the context and the text around them.
    return {"ttft_s": (encoded + float(prompt.group(1))) / 1000,
            "decode_tok_s": int(decode.group(2)) / float(decode.group(1)) * 1000,
            "prompt_tokens": int(prompt.group(2))}


def run_ours(checkpoint: pathlib.Path, scheme: str, clip: pathlib.Path, new_tokens: int, pad: bool,
             compiled: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", OURS, str(checkpoint), scheme, str(clip), str(new_tokens),
                           "1" if pad else "0", QUESTION, "1" if compiled else "0"],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"ours failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=pathlib.Path)
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/llamacpp-bench"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pairs", nargs="+", default=[p[0] for p in PAIRS], choices=[p[0] for p in PAIRS])
    parser.add_argument("--compile", action="store_true",
                        help="ours decodes through its torch.compile'd step (compiled in the warm-up run)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    bins, source, build = llama_binaries(args.llama_cpp, args.work)
    print(f"llama.cpp: {build}; ours: {'compiled' if args.compile else 'eager'} decode step", flush=True)
    checkpoint = args.work / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        from checkpoints import build_checkpoint

        build_checkpoint(checkpoint, real_vocab=True, text_dims=TEXT, audio_dims=AUDIO, tokenizer_json=True)
        legacy_names(checkpoint)
    files = ggufs(checkpoint, source, bins, args.work)
    speech, rate = soundfile.read(SPEECH, dtype="float32")
    clip = args.work / "clip-10s.wav"
    soundfile.write(clip, np.resize(speech, 10 * rate), rate)
    rows = []
    for kind, scheme in PAIRS:
        if kind not in args.pairs:
            continue
        runs: dict[str, list[dict]] = {"llama": [], "ours": [], "ours30": []}
        for _ in range(args.repeats):  # interleaved, so drifts in the machine hit both sides
            runs["llama"].append(run_llama(bins, files[kind], files["mmproj"], clip, args.new_tokens))
            runs["ours"].append(run_ours(checkpoint, scheme, clip, args.new_tokens, False, args.compile))
            runs["ours30"].append(run_ours(checkpoint, scheme, clip, args.new_tokens, True, args.compile))
        summary = {side: {key: statistics.median(r[key] for r in results) for key in ("ttft_s", "decode_tok_s")}
                   | {"prompt_tokens": results[0]["prompt_tokens"]} for side, results in runs.items()}
        print(json.dumps({"pair": [kind, scheme], **summary}), flush=True)
        rows.append((kind, scheme, summary))
    print("\n| llama.cpp / ours | llama.cpp TTFT (prompt) | ours TTFT (prompt) | ours on the clip padded to 30 s "
          "| llama.cpp decode tok/s | ours decode tok/s | decode ratio |")
    print("|---|---|---|---|---|---|---|")
    for kind, scheme, s in rows:
        lm, us, u30 = s["llama"], s["ours"], s["ours30"]
        print(f"| {kind} / {scheme} | {lm['ttft_s']:.2f} s ({lm['prompt_tokens']}) | {us['ttft_s']:.2f} s "
              f"({us['prompt_tokens']}) | {u30['ttft_s']:.2f} s ({u30['prompt_tokens']}) | {lm['decode_tok_s']:.1f} "
              f"| {us['decode_tok_s']:.1f} | {us['decode_tok_s'] / lm['decode_tok_s']:.2f}x |")


if __name__ == "__main__":
    main()
