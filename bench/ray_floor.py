"""What a 1-replica Ray batch job costs beside the model when the replica takes every core: Ray's own
CPU use while the job runs, and what the same CPU use does to a plain in-process run.

    python bench/ray_floor.py [--work /tmp/ray-batch-bench] [--items 96] [--repeats 2]

Same checkpoint and items as bench/ray_batch.py. 1. A 1-replica job (``BatchJob``, the replica
holding both cores) runs in a fresh process; from its first output rows to its last, every other
process's CPU time is summed (Ray's driver executor, raylet, GCS, agents, Ray Data's helper actors)
and the replica times its own calls. 2. The in-process run (``Qwen2Audio.generate`` in batches of
16) runs alone; beside a burner process that uses the same share of one core, waking ten times a
second; and beside a Ray Data job whose one replica holds both cores and only sleeps (Ray's and Ray
Data's own work, nothing else). What those cost the in-process run is the share of the Ray job's
slowdown that comes from Ray running beside the model rather than from the replica's code path.
Sides alternate per round; per-batch times leave out each run's first batch (warm-up).
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import statistics
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ray_batch import prepare, result

RAY = r"""
import json, sys, time
import psutil
import qwen2audio.distributed.batch as batch

def cpu_by_process():
    seconds = {}
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        if times is not None:
            seconds[process.pid] = (process.info["name"], times.user + times.system)
    return seconds

class Timed(batch.Qwen2AudioPredictor):  # sent to the replica by value: its calls, timed where they run
    calls = 0

    def __call__(self, rows):
        begun = time.perf_counter()
        out = super().__call__(rows)
        self.calls += 1
        size = len(out["id"])
        return {**out, "call": [self.calls] * size, "seconds": [time.perf_counter() - begun] * size}

checkpoint, manifest, output = sys.argv[1], sys.argv[2], sys.argv[3]
batch.Qwen2AudioPredictor = Timed
job = batch.BatchJob(model=checkpoint, input=manifest, output=output, task="chat", replicas=1, cpus_per_replica=2,
                     batch_size=16, device="cpu", sampling={"max_new_tokens": 32, "min_new_tokens": 32})
marks, calls, write = [], {}, batch.Journal.write

def journal_write(self, row):
    if not marks:
        marks.append((time.perf_counter(), cpu_by_process()))
    return write(self, row)

clean = batch._clean

def clean_timed(row):
    calls[int(row["call"])] = row["seconds"]
    return clean(row)

batch._clean = clean_timed
batch.Journal.write = journal_write
job.run(progress=False)
end, after = time.perf_counter(), cpu_by_process()
start, before = marks[0]
used = {pid: (name, after[pid][1] - before[pid][1]) for pid, (name, _) in after.items() if pid in before}
replica = max(used, key=lambda pid: used[pid][1])
others = sorted(((seconds, name) for pid, (name, seconds) in used.items() if pid != replica), reverse=True)
later = [seconds for call, seconds in calls.items() if call > 1]  # the first call warms up
print(json.dumps({"window": end - start, "per_batch": sum(later) / len(later), "replica": used[replica],
                  "others": sum(s for s, _ in others), "top": others[:8]}))
"""

PLAIN = r"""
import json, multiprocessing, statistics, sys, time

def burn(share):
    while True:
        started = time.perf_counter()
        while time.perf_counter() - started < share * 0.1:
            pass
        time.sleep((1 - share) * 0.1)

if __name__ == "__main__":
    checkpoint, manifest, share = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if share > 0:
        multiprocessing.get_context("fork").Process(target=burn, args=(share,), daemon=True).start()
    import torch
    torch.set_num_threads(2)
    from qwen2audio import Qwen2Audio
    items = [json.loads(line) for line in open(manifest)]
    model = Qwen2Audio.from_pretrained(checkpoint, device="cpu", progress=False)
    seconds = []
    for start in range(0, len(items), 16):
        conversations = [[{"role": "user", "content": [{"type": "audio", "audio": i["audio"]},
                                                       {"type": "text", "text": i["question"]}]}]
                         for i in items[start:start + 16]]
        begun = time.perf_counter()
        model.generate(conversations, temperature=0.0, max_new_tokens=32, min_new_tokens=32)
        seconds.append(time.perf_counter() - begun)
    print(json.dumps({"per_batch": statistics.mean(seconds[1:])}))
"""


IDLE_JOB = r"""
import sys, time
import ray
import ray.data

class Sleeper:  # a replica that takes both cores and does nothing: Ray and Ray Data's own work alone
    def __call__(self, rows):
        time.sleep(3.5)
        return rows

ray.init(num_cpus=2, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
pool = ray.data.ActorPoolStrategy(size=1, enable_true_multi_threading=True)
items = ray.data.from_items([{"n": n} for n in range(16 * 200)], override_num_blocks=200)  # no read tasks
rows = items.map_batches(Sleeper, batch_size=16, num_cpus=2, compute=pool)
for number, _ in enumerate(rows.iter_batches(batch_size=None)):
    if number == 1:
        print("running", flush=True)
"""


def beside_idle_job(checkpoint: pathlib.Path, manifest: pathlib.Path) -> dict:
    """The in-process run while a Ray Data job of one sleeping replica runs beside it."""
    job = subprocess.Popen(
        [sys.executable, "-c", IDLE_JOB], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        if job.stdout.readline().strip() != "running":
            raise SystemExit("the idle Ray Data job did not start")
        return result(PLAIN, str(checkpoint), str(manifest), "0")
    finally:
        job.send_signal(signal.SIGINT)  # its ray.shutdown stops the local cluster it started
        job.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/ray-batch-bench"))
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, manifest = prepare(args.work, args.items)
    ray_batch, shares, plain, loaded, beside = [], [], [], [], []
    for round_ in range(args.repeats):
        (args.work / "floor.jsonl").unlink(missing_ok=True)
        job = result(RAY, str(checkpoint), str(manifest), str(args.work / "floor.jsonl"))
        share = job["others"] / job["window"]
        ray_batch.append(job["per_batch"])
        shares.append(share)
        plain.append(result(PLAIN, str(checkpoint), str(manifest), "0")["per_batch"])
        loaded.append(result(PLAIN, str(checkpoint), str(manifest), f"{share:.4f}")["per_batch"])
        beside.append(beside_idle_job(checkpoint, manifest)["per_batch"])
        top = ", ".join(f"{name} {seconds:.2f} s" for seconds, name in job["top"][:6])
        print(
            f"round {round_ + 1}: Ray replica {ray_batch[-1]:.2f} s/batch, using "
            f"{job['replica'][1] / job['window']:.0%} of a core; the other processes {share:.1%} ({top}); "
            f"in-process {plain[-1]:.2f} s/batch, beside a {share:.1%} burner {loaded[-1]:.2f}, beside an idle "
            f"Ray Data job {beside[-1]:.2f}",
            flush=True,
        )
    base = statistics.median(plain)
    print(f"{args.items} items, median seconds per batch of 16 (first batch left out):")
    print(f"  in-process alone: {base:.2f} s")
    print(
        f"  in-process beside a burner of Ray's share ({statistics.median(shares):.1%} of one core): "
        f"{statistics.median(loaded):.2f} s, {statistics.median(loaded) / base:.3f}x"
    )
    print(
        f"  in-process beside a Ray Data job of one sleeping replica: {statistics.median(beside):.2f} s, "
        f"{statistics.median(beside) / base:.3f}x"
    )
    print(f"  Ray replica: {statistics.median(ray_batch):.2f} s, {statistics.median(ray_batch) / base:.3f}x")


if __name__ == "__main__":
    main()
