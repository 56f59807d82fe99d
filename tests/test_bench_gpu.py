"""bench/gpu.py's logic at toy size on the CPU: it builds both models on the same random weights,
feeds them the same inputs, and its agreement checks and figures come out."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_benchmark_runs_at_toy_size_and_both_sides_agree(tmp_path):
    output = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--device", "cpu", "--dtype", "float32",
         "--requests", "2", "--new-tokens", "8", "--repeats", "1", "--output", str(output),
         "--profile-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    # fp32, same weights, same inputs: transformers computes the same function.
    assert report["agree"] and report["logits_relative_l2"] < 1e-5 and report["same_first_token"]
    assert report["greedy_common_prefix"] == 32 and report["fast_vs_eager_common_prefix"] == 32
    for side in ("ours", "transformers"):
        assert all(value > 0 for value in report[side].values()), report[side]
    assert "time to first token, 30 s clip (ms)" in result.stdout
    for name in ("profile_prefill.txt", "profile_decode.txt"):  # kernel tables for the next tuning round
        assert "Self CPU" in (tmp_path / name).read_text()
