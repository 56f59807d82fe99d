"""bench/gpu.py's logic at toy size on the CPU: it builds both models on the same random weights,
feeds them the same inputs, and its agreement checks and figures come out. Run in this process
(the script is imported), which spares a second interpreter's start."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_benchmark_runs_at_toy_size_and_both_sides_agree(tmp_path, capsys, monkeypatch):
    output = tmp_path / "report.json"
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", [
        "gpu.py", "--tiny", "--device", "cpu", "--dtype", "float32", "--requests", "2", "--new-tokens", "8",
        "--repeats", "1", "--clip-seconds", "5", "--output", str(output), "--profile-dir", str(tmp_path),
        "--quantization", "int8", "int4"])
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
    bench.main()  # raises SystemExit if the two sides disagree
    report = json.loads(output.read_text())
    # fp32, same weights, same inputs: transformers computes the same function.
    assert report["agree"] and report["logits_relative_l2"] < 1e-5 and report["same_first_token"]
    assert report["greedy_common_prefix"] == 32 and report["fast_vs_eager_common_prefix"] == 32
    for side in ("ours", "transformers", "ours int8", "ours int4"):
        assert all(value > 0 for value in report[side].values()), report[side]
    # Quantized from the same weights (plain Gaussian ones: int4 is coarse there, see test_quant.py
    # for trained-looking ones): int8 is near, int4 further but the same model.
    assert report["ours int8 logits_relative_l2"] < 0.03 and report["ours int4 logits_relative_l2"] < 0.3
    assert "time to first token, 5 s clip (ms)" in capsys.readouterr().out
    for name in ("profile_prefill.txt", "profile_decode.txt"):  # kernel tables for the next tuning round
        assert "Self CPU" in (tmp_path / name).read_text()
