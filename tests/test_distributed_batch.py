"""Batch jobs on Ray (issue 19): a local cluster on the CPU, the tiny checkpoint, 40 items.

The expected rows come from the single-process ``Qwen2Audio.generate`` on the same conversations,
built here rather than by the job's own prompt code; crashes are real (SIGKILL of a replica's
process, of the driver's), found by Ray's process titles.
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from qwen2audio import Qwen2Audio  # noqa: E402
from qwen2audio.cli import main  # noqa: E402
from qwen2audio.distributed.batch import BatchJob  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
CLIPS = ("speech_en_16k.wav", "tone_440hz_3s.wav", "speech_zh_16k.wav", "silence_2s.wav", "question_en_16k.wav")
BROKEN = {7: DATA / "random_bytes.wav", 13: DATA / "no_such_file.wav"}
TOKENS = 12


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> pathlib.Path:
    rows = []
    for number in range(40):
        audio = BROKEN.get(number, DATA / CLIPS[number % len(CLIPS)])
        row = {"id": f"clip-{number:02d}", "audio": str(audio)}
        if number % 4:  # every fourth item has no question: voice chat
            row["question"] = f"What do you hear in clip {number}?"
        rows.append(json.dumps(row))
    path = tmp_path_factory.mktemp("batch") / "items.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, manifest) -> dict[str, str]:
    """id -> the single-process greedy reply, for every item whose audio decodes."""
    model = Qwen2Audio.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", progress=False)
    items = [json.loads(line) for line in manifest.read_text().splitlines()]
    good = [item for number, item in enumerate(items) if number not in BROKEN]
    conversations = []
    for item in good:
        content = [{"type": "audio", "audio": item["audio"]}]
        if "question" in item:
            content.append({"type": "text", "text": item["question"]})
        conversations.append([{"role": "user", "content": content}])
    replies = model.generate(conversations, temperature=0.0, max_new_tokens=TOKENS)
    return {item["id"]: reply.text for item, reply in zip(good, replies, strict=True)}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _job(checkpoint, manifest, output, **options) -> BatchJob:
    settings = {"replicas": 2, "cpus_per_replica": 0.5, "batch_size": 4, "sampling": {"max_new_tokens": TOKENS},
                "device": "cpu", "dtype": "float32", **options}
    return BatchJob(model=str(checkpoint), input=str(manifest), output=str(output), task="chat", **settings)


def _rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_rows(rows: list[dict], expected: dict[str, str]) -> None:
    ids = [row["id"] for row in rows]
    assert sorted(ids) == [f"clip-{n:02d}" for n in range(40)], "each item exactly once"
    by_id = {row["id"]: row for row in rows}
    assert {key: by_id[key]["text"] for key in expected} == expected
    assert all(by_id[key]["error"] is None and by_id[key]["completion_tokens"] > 0 for key in expected)
    assert "decode" in by_id["clip-07"]["error"] and by_id["clip-07"]["text"] is None
    assert "no_such_file" in by_id["clip-13"]["error"]


def _replica_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "Qwen2AudioPredictor" in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def _wait_for_rows(path: pathlib.Path, count: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and (lines := path.read_bytes().count(b"\n")) >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {count} rows in {timeout} s")


def test_two_replicas_give_the_single_process_replies(cluster, tiny_checkpoint, manifest, expected, tmp_path):
    output = tmp_path / "out.parquet"
    summary = _job(tiny_checkpoint, manifest, output).run(progress=False)
    import pyarrow.parquet as pq

    _check_rows(pq.read_table(output).to_pylist(), expected)
    assert not output.with_suffix(".partial.jsonl").exists()
    assert (summary.items, summary.generated, summary.skipped) == (40, 40, 0)
    assert set(summary.failures) == {"clip-07", "clip-13"}
    assert summary.completion_tokens == sum(row["completion_tokens"] for row in pq.read_table(output).to_pylist())
    again = _job(tiny_checkpoint, manifest, output).run(progress=False)
    assert (again.generated, again.skipped) == (0, 40)


def test_a_killed_replica_is_replaced_and_every_row_lands_once(cluster, tiny_checkpoint, manifest, expected,
                                                              tmp_path):
    output = tmp_path / "out.jsonl"
    killed = []

    def kill_one_replica() -> None:
        _wait_for_rows(output, 4)
        replicas = _replica_processes()
        assert len(replicas) == 2
        replicas[0].send_signal(signal.SIGKILL)
        killed.append(output.read_bytes().count(b"\n"))

    killer = threading.Thread(target=kill_one_replica)
    killer.start()
    summary = _job(tiny_checkpoint, manifest, output).run(progress=False)
    killer.join()
    assert killed and killed[0] < 40, "the replica was killed while items were left"
    _check_rows(_rows(output), expected)
    assert summary.generated == 40


def test_a_rerun_after_the_driver_is_killed_makes_only_the_missing_rows(cluster, tiny_checkpoint, manifest, expected,
                                                                       tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "qwen2audio.cli", "batch", "--model", str(tiny_checkpoint), "--input",
               str(manifest), "--output", str(output), "--task", "chat", "--replicas", "2", "--cpus-per-replica",
               "0.5", "--batch-size", "4", "--max-new-tokens", str(TOKENS), "--device", "cpu", "--dtype", "float32",
               "--ray-address", cluster, "--quiet"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    try:
        _wait_for_rows(output, 4)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = [row["id"] for row in _rows(output)]  # a line the kill cut is not a row
    assert 4 <= len(before) < 40
    code = main(["batch", "--model", str(tiny_checkpoint), "--input", str(manifest), "--output", str(output),
                 "--replicas", "2", "--cpus-per-replica", "0.5", "--batch-size", "4", "--max-new-tokens", str(TOKENS),
                 "--device", "cpu", "--dtype", "float32", "--quiet"])
    rows = _rows(output)
    _check_rows(rows, expected)
    assert [row["id"] for row in rows[:len(before)]] == before
    assert len(rows) - len(before) == 40 - len(before), "the rerun wrote only the missing ids"
    assert code == 1  # two items failed
    summary = capsys.readouterr().out
    assert f"{40 - len(before)} done in this run" in summary and f"{len(before)} already done" in summary
    assert "clip-07: AudioError" in summary and "clip-13: AudioError" in summary


def test_two_nodes(tiny_checkpoint, manifest, expected, tmp_path):
    """The multi-node path: a head and a worker node (ray.cluster_utils), replicas wherever Ray puts them."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=2)
    try:
        ray.init(address=nodes.address, log_to_driver=False)
        assert len([node for node in ray.nodes() if node["Alive"]]) == 2
        output = tmp_path / "out.jsonl"
        _job(tiny_checkpoint, manifest, output, cpus_per_replica=1).run(progress=False)
        _check_rows(_rows(output), expected)
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_the_replica_pool_calls_on_the_actors_main_thread(cluster):
    """Ray Data's default calls a class from a thread of its own, where torch's CPU steps ran 10-25%
    slower than on the main thread (bench/RESULTS.md)."""
    from qwen2audio.distributed.batch import replica_pool

    if "enable_true_multi_threading" not in inspect.signature(ray.data.ActorPoolStrategy).parameters:
        pytest.skip("this Ray release calls from its own thread whatever the pool")

    class Where:  # defined here, so that Ray ships it by value (the workers cannot import this file)
        def __call__(self, batch):
            return {"thread": [threading.current_thread().name] * len(batch["id"])}

    rows = ray.data.range(4).map_batches(Where, batch_size=2, compute=replica_pool(ray, 1), num_cpus=0.5).take_all()
    assert {row["thread"] for row in rows} == {"MainThread"}
