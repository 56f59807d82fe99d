"""Batch jobs on Ray Data: many audio items through N engine replicas into one parquet or JSONL file.

Owns what a job is made of: the items (manifests, tables, folders of audio), the prompt each task
gives an item, the CPU stage (decode, cut, tokenize), the replica class that holds one engine (also
a building block for anyone's Ray Data pipeline), the journal that lets a rerun skip finished ids,
and the summary. Scheduling, retries and replacing dead actors are Ray Data's; none of it is here.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import pathlib
import pickle
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qwen2audio.distributed import replica_gpus
from qwen2audio.errors import InputError
from qwen2audio.evaluation import read_finished

logger = logging.getLogger(__name__)

BASE_TASKS = ("chat", "transcribe", "caption")
CAPTION_INSTRUCTION = "Generate the caption in English:"
COLUMNS = ("id", "task", "text", "finish_reason", "prompt_tokens", "completion_tokens", "reference", "error")
DEFAULT_SAMPLING = {"temperature": 0.0}  # reproducible: a rerun's rows match the first run's


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or one error naming the extra that brings them."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError('this needs Ray, which is not installed: pip install "qwen2audio[ray]"') from None
    return ray


def check_task(task: str) -> str:
    from qwen2audio.evaluation import TASKS

    if task not in BASE_TASKS and task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose from {', '.join((*BASE_TASKS, *TASKS))}")
    return task


# ----- items ---------------------------------------------------------------------------------


def read_batch_items(source: str | pathlib.Path) -> list[dict[str, Any]]:
    """Items with a unique ``id`` and an ``audio`` (path or bytes): a JSONL manifest, a parquet/arrow
    table (or folder of them), a LibriSpeech folder, or a folder of audio files (ids: their paths
    inside it)."""
    from qwen2audio.evaluation import data_kind, read_items

    path = pathlib.Path(source)
    if not path.exists():
        raise InputError(f"--input {source}: no such file or directory")
    if path.is_dir() and data_kind(path) is None:
        from qwen2audio.transcribe import collect_files

        items = [{"id": name.as_posix(), "audio": str(file)} for file, name in collect_files([str(path)])]
    else:
        items = read_items(path)
    for item in items:
        item["id"] = str(item["id"])
    repeated = [name for name, count in Counter(item["id"] for item in items).items() if count > 1]
    if repeated:
        raise InputError(f"{source}: ids must be unique, {len(repeated)} repeat (first: {repeated[0]!r})")
    if not items:
        raise InputError(f"{source}: no items")
    return items


def task_input(task: str, item: dict[str, Any]) -> tuple[str | list[dict[str, Any]], list[Any]]:
    """What the processor prepares for one item: a conversation or a raw prompt, and the audios the
    raw prompt's placeholders take. chat: the clip and the item's ``question`` (none: voice chat)."""
    from qwen2audio.evaluation import TASKS, task_prompt
    from qwen2audio.text.prompt import AUDIO_PLACEHOLDER
    from qwen2audio.text.tasks import recognition_prompt

    audio = item["audio"]
    if task == "chat":
        content: list[dict[str, Any]] = [{"type": "audio", "audio": audio}]
        question = item.get("question") or item.get("prompt")
        if question:
            content.append({"type": "text", "text": str(question)})
        system = [{"role": "system", "content": str(item["system"])}] if item.get("system") else []
        return [*system, {"role": "user", "content": content}], []
    if task == "transcribe":
        return recognition_prompt(item.get("language")), [audio]
    if task == "caption":
        return AUDIO_PLACEHOLDER + CAPTION_INSTRUCTION, [audio]
    evaluation = TASKS[task]
    return task_prompt(evaluation, item), [] if evaluation.kind == "chat" else [audio]


# ----- the CPU stage and the replica ------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _processor(model: str, segmentation: str) -> Any:
    from qwen2audio.processor import Processor

    return Processor.from_pretrained(model, segmentation=segmentation)


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _prepare_one(processor: Any, task: str, item: dict[str, Any]) -> tuple[bytes | None, str | None]:
    try:
        conversation, audios = task_input(task, item)
        return pickle.dumps(processor.prepare(conversation, iter(audios))), None
    except Exception as exc:  # a bad item is a row with its reason, never a failed job
        return None, _failure(exc)


def prepare_batch(batch: dict[str, Any], model: str, task: str, segmentation: str = "vad") -> dict[str, list]:
    """The CPU stage (``map_batches`` function): decode each item's audio, cut its windows and
    tokenize its prompt. Columns in: ``id``, ``item`` (a pickled item dict); out: ``id``, ``prompt``
    (a pickled :class:`~qwen2audio.engine.request.Prompt`, or None), ``reference``, ``error``."""
    return _prepared(batch, _processor(model, segmentation), task)


def _prepared(batch: dict[str, Any], processor: Any, task: str) -> dict[str, list]:
    out: dict[str, list] = {"id": [], "prompt": [], "reference": [], "error": []}
    for key, packed in zip(batch["id"], batch["item"], strict=True):
        item = pickle.loads(packed)  # noqa: S301 (written by this job's driver)
        prompt, error = _prepare_one(processor, task, item)
        out["id"].append(str(key))
        out["prompt"].append(prompt)
        out["reference"].append(_reference(item))
        out["error"].append(error)
    return out


def _text(value: Any) -> str | None:
    """A string column's value as Ray Data hands it over (None may arrive as NaN)."""
    return value if isinstance(value, str) else None


def _reference(item: dict[str, Any]) -> str | None:
    value = item.get("reference")
    return str(value) if value not in (None, "") else None


class Qwen2AudioPredictor:
    """One engine replica for Ray Data: ``ds.map_batches(Qwen2AudioPredictor, fn_constructor_kwargs=
    {"model": path, "task": "transcribe"}, compute=ray.data.ActorPoolStrategy(size=N), num_gpus=1)``.

    Takes the CPU stage's rows (``prompt``/``error``, see :func:`prepare_batch`) or raw ones (``id``
    and ``item``, prepared here); gives one output row per input row (:data:`COLUMNS`), a failure as
    its ``error``. Rows of one call run as one continuously batched engine job.
    """

    def __init__(self, model: str, task: str = "chat", sampling: dict[str, Any] | None = None,
                 device: str = "auto", dtype: str = "auto", quantization: str | None = None,
                 segmentation: str = "vad", engine_options: dict[str, Any] | None = None) -> None:
        from qwen2audio import EngineOptions, Qwen2Audio, SamplingParams

        self.task = check_task(task)
        self.params = SamplingParams(**{**DEFAULT_SAMPLING, **(sampling or {})})
        self.model = Qwen2Audio.from_pretrained(model, device=device, dtype=dtype, progress=False,
                                                engine_options=EngineOptions(**(engine_options or {})),
                                                quantization=quantization, segmentation=segmentation)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        if "prompt" not in batch:
            batch = _prepared(batch, self.model.processor, self.task)
        rows = {"id": [str(key) for key in batch["id"]], "error": [_text(e) for e in batch["error"]],
                "reference": [_text(r) for r in batch["reference"]]}
        todo = [(index, pickle.loads(packed)) for index, packed in enumerate(batch["prompt"])  # noqa: S301
                if isinstance(packed, bytes) and rows["error"][index] is None]
        results: dict[int, Any] = dict(zip([i for i, _ in todo], self._generate([p for _, p in todo]), strict=True))
        out: dict[str, list] = {name: [] for name in COLUMNS}
        for index, key in enumerate(rows["id"]):
            result = results.get(index)
            error = rows["error"][index] or (result if isinstance(result, str) else None)
            done = None if error else result
            out["id"].append(key)
            out["task"].append(self.task)
            out["text"].append(done.text if done else None)
            out["finish_reason"].append(done.finish_reason if done else None)
            out["prompt_tokens"].append(done.prompt_tokens if done else 0)
            out["completion_tokens"].append(done.completion_tokens if done else 0)
            out["reference"].append(rows["reference"][index])
            out["error"].append(error)
        return out

    def _generate(self, prompts: Sequence[Any]) -> list[Any]:
        """Completions, or for a prompt that fails its reason; the batch together when it can be."""
        if not prompts:
            return []
        try:
            return list(self.model.generate_prepared(prompts, params=self.params))
        except Exception:
            logger.info("a batch of %d failed; generating its items one at a time", len(prompts))
        results: list[Any] = []
        for prompt in prompts:
            try:
                results.extend(self.model.generate_prepared([prompt], params=self.params))
            except Exception as exc:
                results.append(_failure(exc))
        return results


# ----- the job ---------------------------------------------------------------------------------


class Journal:
    """Where finished rows go as they come: the JSONL output itself, or beside a parquet output a
    ``.partial.jsonl`` file folded into the parquet at the end. Reading it back is how a rerun
    skips finished ids, whatever stopped the last run."""

    def __init__(self, output: pathlib.Path) -> None:
        if output.suffix not in (".jsonl", ".parquet"):
            raise InputError(f"--output {output}: must end in .jsonl or .parquet")
        self.output = output
        self.parquet = output.suffix == ".parquet"
        self.path = output.with_suffix(".partial.jsonl") if self.parquet else output
        self.rows: dict[str, dict[str, Any]] = {}
        if self.parquet and output.is_file():
            import pyarrow.parquet as pq

            self.rows.update((row["id"], row) for row in pq.read_table(output).to_pylist())
        self.rows.update(read_finished(self.path))

    def __enter__(self) -> Journal:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():  # a killed run may have cut its last line: it goes, and its id is redone
            written = self.path.read_bytes()
            if written and not written.endswith(b"\n"):
                with open(self.path, "r+b") as cut:
                    cut.truncate(written.rfind(b"\n") + 1)
        self._sink = open(self.path, "a", encoding="utf-8")  # closed in __exit__
        return self

    def write(self, row: dict[str, Any]) -> bool:
        """Append a finished row; False (nothing written) if its id is already there."""
        if row["id"] in self.rows:
            return False
        self._sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._sink.flush()
        self.rows[row["id"]] = row
        return True

    def __exit__(self, *exc: object) -> None:
        self._sink.close()

    def finish(self, order: Sequence[str]) -> None:
        """Parquet output: every row, in the items' order, written whole; the journal is then dropped."""
        if not self.parquet:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        wanted = set(order)
        rows = [self.rows[key] for key in order if key in self.rows]
        rows += [row for key, row in self.rows.items() if key not in wanted]  # from earlier inputs
        temporary = self.output.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), temporary)
        temporary.replace(self.output)
        self.path.unlink(missing_ok=True)


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("task", pa.string()), ("text", pa.string()),
                      ("finish_reason", pa.string()), ("prompt_tokens", pa.int64()),
                      ("completion_tokens", pa.int64()), ("reference", pa.string()), ("error", pa.string())])


@dataclass
class BatchSummary:
    items: int
    generated: int  # rows written by this run
    skipped: int  # finished by an earlier run
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    failures: dict[str, str] = field(default_factory=dict)  # id -> reason, this run's and earlier

    def text(self) -> str:
        rate = self.generated / self.seconds if self.seconds else 0.0
        lines = [f"{self.items} items: {self.generated} done in this run ({rate:.2f}/s), {self.skipped} already "
                 f"done; {self.prompt_tokens} prompt + {self.completion_tokens} generated tokens; "
                 f"{len(self.failures)} failed"]
        lines += [f"  {key}: {reason}" for key, reason in list(self.failures.items())[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (see the output's error column)")
        return "\n".join(lines)


@dataclass
class BatchJob:
    """``qwen2audio batch``: items -> CPU stage (tasks) -> ``replicas`` engine actors -> journal.

    ``device``/``dtype``/``quantization``/``segmentation``/``engine_options`` are each replica's
    :meth:`Qwen2Audio.from_pretrained` arguments; ``sampling`` its :class:`SamplingParams` fields
    (greedy unless told). ``ray_address``: an existing cluster ("auto"), else a local one is started;
    a Ray already initialised in this process is used as it is.
    """

    model: str
    input: str
    output: str
    task: str = "chat"
    replicas: int = 1
    gpus_per_replica: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    batch_size: int = 16
    sampling: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None
    segmentation: str = "vad"
    engine_options: dict[str, Any] = field(default_factory=dict)
    ray_address: str | None = None

    def run(self, progress: bool = True) -> BatchSummary:
        """Generate every item not in the output yet, writing rows as they finish."""
        ray = require_ray()
        check_task(self.task)
        if self.replicas < 1 or self.batch_size < 1:
            raise InputError("--replicas and --batch-size must be at least 1")
        items = read_batch_items(self.input)
        started = time.perf_counter()
        with Journal(pathlib.Path(self.output)) as journal:
            todo = [item for item in items if item["id"] not in journal.rows]
            written = 0
            if todo:
                if not ray.is_initialized():
                    ray.init(address=self.ray_address, log_to_driver=False)
                written = self._stream(ray, todo, journal, len(items), progress)
        journal.finish([item["id"] for item in items])
        return self._summary(items, journal, written, time.perf_counter() - started)

    def _stream(self, ray: Any, todo: list[dict[str, Any]], journal: Journal, total: int, progress: bool) -> int:
        from tqdm.auto import tqdm

        written = 0
        with tqdm(total=total, initial=total - len(todo), desc=f"batch {self.task}", unit="item",
                  disable=not progress) as bar:
            for batch in self.dataset(ray, todo).iter_batches(batch_size=None, batch_format="pandas"):
                for row in batch.to_dict("records"):
                    written += journal.write(_clean(row))
                    bar.update(1)
        return written

    def dataset(self, ray: Any, todo: list[dict[str, Any]]) -> Any:
        """The Ray Data pipeline: packed items, the CPU stage, the replica pool."""
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the job shows its own bar
        blocks = max(1, math.ceil(len(todo) / self.batch_size))
        source = ray.data.from_items([{"id": item["id"], "item": pickle.dumps(item)} for item in todo],
                                     override_num_blocks=blocks)
        if not self._room_to_decode(ray):
            logger.warning("the cluster's CPUs are all taken by the replicas: they decode audio themselves")
        else:  # other remote arguments than the replicas' keep Ray Data from fusing decoding into them
            source = source.map_batches(prepare_batch, batch_size=self.batch_size, num_cpus=1, max_retries=3,
                                        fn_kwargs={"model": self.model, "task": self.task,
                                                   "segmentation": self.segmentation})
        replica = {"model": self.model, "task": self.task, "sampling": self.sampling,
                   "device": self.device, "dtype": self.dtype, "quantization": self.quantization,
                   "segmentation": self.segmentation, "engine_options": self.engine_options}
        return source.map_batches(Qwen2AudioPredictor, fn_constructor_kwargs=replica, batch_size=self.batch_size,
                                  compute=replica_pool(ray, self.replicas),
                                  num_gpus=replica_gpus(self.gpus_per_replica) or None,
                                  num_cpus=self.cpus_per_replica)

    def _room_to_decode(self, ray: Any) -> bool:
        """Whether a CPU is left beside the replicas for the decoding tasks (else they would wait forever)."""
        return ray.cluster_resources().get("CPU", 0) - self.replicas * self.cpus_per_replica >= 1

    def _summary(self, items: list[dict[str, Any]], journal: Journal, written: int, seconds: float) -> BatchSummary:
        rows = [journal.rows[item["id"]] for item in items if item["id"] in journal.rows]
        return BatchSummary(
            items=len(items), generated=written, skipped=len(rows) - written,
            prompt_tokens=sum(int(row.get("prompt_tokens") or 0) for row in rows),
            completion_tokens=sum(int(row.get("completion_tokens") or 0) for row in rows), seconds=seconds,
            failures={row["id"]: row["error"] for row in rows if row.get("error")})


def replica_pool(ray: Any, replicas: int) -> Any:
    """A fixed pool of ``replicas`` actors whose engine runs on the actor's main thread. By default
    Ray Data calls a class from a thread of its own, and torch's CPU steps ran 10-25% slower there
    than on a process's main thread (bench/RESULTS.md, Ray); older Ray releases lack the option and
    keep their thread."""
    strategy = ray.data.ActorPoolStrategy
    if "enable_true_multi_threading" in inspect.signature(strategy).parameters:
        return strategy(size=replicas, enable_true_multi_threading=True)  # calls one at a time all the same
    return strategy(size=replicas)


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """A pandas row as plain JSON values (numpy ints, NaN for a missing string)."""
    out: dict[str, Any] = {}
    for name in COLUMNS:
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out[name] = None
        elif name.endswith("_tokens"):
            out[name] = int(value)
        else:
            out[name] = str(value)
    return out
