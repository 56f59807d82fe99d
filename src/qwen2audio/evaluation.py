"""`qwen2audio eval`: the Qwen2-Audio report's benchmarks on local data, resumable, with metrics.

Owns the task table (prompts, metrics, the paper's figures), the data readers (JSONL manifests,
LibriSpeech's layout, parquet/arrow tables), corpus-level metrics through maintained libraries
(jiwer, sacrebleu, whisper-normalizer, zhconv) and the results files. Generation goes through the
public engine API like every other front end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from qwen2audio.errors import InputError
from qwen2audio.text.tasks import classification_prompt, recognition_prompt, translation_prompt

if TYPE_CHECKING:
    from qwen2audio.api import Qwen2Audio


@dataclass(frozen=True)
class Task:
    kind: str  # asr, st, cls or chat
    metric: str  # wer, cer, bleu, accuracy or none
    paper: float | None  # the report's figure (base model; WER/CER in %, BLEU, accuracy)
    language: str | None = None
    target: str | None = None
    prompt: str | None = None


def _asr(language: str, paper: float) -> Task:
    return Task("asr", "cer" if language in ("zh", "yue") else "wer", paper, language)


TASKS: dict[str, Task] = {
    "librispeech-dev-clean": _asr("en", 1.3), "librispeech-dev-other": _asr("en", 3.4),
    "librispeech-test-clean": _asr("en", 1.6), "librispeech-test-other": _asr("en", 3.6),
    "cv15-en": _asr("en", 8.6), "cv15-zh": _asr("zh", 6.9), "cv15-yue": _asr("yue", 5.9), "cv15-fr": _asr("fr", 9.6),
    "fleurs-zh": _asr("zh", 7.5), "aishell2": _asr("zh", 3.0),
    "covost2-en-de": Task("st", "bleu", 29.9, "en", "de"), "covost2-de-en": Task("st", "bleu", 35.2, "de", "en"),
    "covost2-en-zh": Task("st", "bleu", 45.2, "en", "zh"), "covost2-zh-en": Task("st", "bleu", 24.4, "zh", "en"),
    "meld": Task("cls", "accuracy", 0.553, prompt="Recognize the emotion with keywords in English:"),
    "vocalsound": Task("cls", "accuracy", 0.9392,
                       prompt="Classify the human vocal sound to VocalSound in English:"),
    "airbench-chat": Task("chat", "none", None),
}


def task_prompt(task: Task, item: dict[str, Any]) -> str | list[dict[str, Any]]:
    """The base-model prompt of the report's protocol (chat tasks use the Instruct template)."""
    if task.kind == "asr":
        return recognition_prompt(item.get("language") or task.language)
    if task.kind == "st":
        return translation_prompt(item.get("target") or task.target)
    if task.kind == "cls":
        return classification_prompt(task.prompt)
    return [{"role": "user", "content": [{"type": "audio", "audio": item["audio"]},
                                         {"type": "text", "text": item.get("question", "")}]}]


# ----- metrics ---------------------------------------------------------------------------------


@functools.cache
def _normalizers() -> tuple[Callable[[str], str], Callable[[str], str]]:
    """Whisper's English and basic normalizers, built once: building one costs about three
    normalizations, and the running score renormalizes the whole run after every batch."""
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer(), BasicTextNormalizer()


@functools.lru_cache(maxsize=65536)
def normalize_english(text: str) -> str:
    return _normalizers()[0](text)


@functools.lru_cache(maxsize=65536)
def normalize_basic(text: str) -> str:
    return _normalizers()[1](text)


def normalize_chinese(text: str) -> str:
    """Simplified characters, no punctuation, no spaces: what character error rate is counted on."""
    import zhconv

    return re.sub(r"\s+", "", normalize_basic(zhconv.convert(text, "zh-cn")))


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str], english: bool = True) -> float:
    """Corpus-level WER in % after Whisper's English (or basic) normalizer."""
    import jiwer

    normalize = normalize_english if english else normalize_basic
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    return 100.0 * jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    import jiwer

    pairs = [(normalize_chinese(r), normalize_chinese(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    return 100.0 * jiwer.cer([r for r, _ in pairs], [h for _, h in pairs])


def bleu(references: Sequence[str] | Sequence[Sequence[str]], hypotheses: Sequence[str],
         target: str | None = None) -> float:
    """Corpus BLEU (sacrebleu); ``references`` is one stream of strings or several streams."""
    import sacrebleu

    streams = [list(references)] if references and isinstance(references[0], str) else [list(s) for s in references]
    return sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize="zh" if target == "zh" else "13a").score


def accuracy(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Exact match after lower-casing and dropping punctuation and spaces at the ends."""
    def clean(text: str) -> str:
        return re.sub(r"[^\w\s]", "", text).strip().lower()

    matches = [clean(r) == clean(h) for r, h in zip(references, hypotheses, strict=True)]
    return sum(matches) / len(matches) if matches else 0.0


def score(task: Task, references: Sequence[str], hypotheses: Sequence[str]) -> float | None:
    if not references:
        return None
    if task.metric == "wer":
        return word_error_rate(references, hypotheses, english=task.language == "en")
    if task.metric == "cer":
        return character_error_rate(references, hypotheses)
    if task.metric == "bleu":
        return bleu(references, hypotheses, task.target)
    if task.metric == "accuracy":
        return accuracy(references, hypotheses)
    return None


# ----- data ------------------------------------------------------------------------------------


def read_items(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """Items with an id, audio (path or bytes), reference (text or label) and optional fields."""
    path = pathlib.Path(path)
    kind = data_kind(path)
    if kind == "manifest":
        return list(_manifest(path))
    if kind == "librispeech":
        return list(_librispeech(path))
    if kind == "table":
        return list(_table([path] if path.is_file() else sorted([*path.rglob("*.parquet"), *path.rglob("*.arrow")])))
    raise InputError(f"{path}: not a JSONL manifest, a LibriSpeech directory or parquet/arrow data")


def data_kind(path: pathlib.Path) -> str | None:
    """Which reader takes ``path``: "manifest", "librispeech", "table", or None."""
    if path.is_file():
        return {".jsonl": "manifest", ".json": "manifest", ".parquet": "table", ".arrow": "table"}.get(path.suffix)
    if path.is_dir():
        if any(path.rglob("*.trans.txt")):
            return "librispeech"
        if any(path.rglob("*.parquet")) or any(path.rglob("*.arrow")):
            return "table"
    return None


def _manifest(path: pathlib.Path) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc})") from None
        if "audio" not in row:
            raise InputError(f"{path}:{number}: no 'audio' field")
        audio = pathlib.Path(row["audio"])
        row["audio"] = str(audio if audio.is_absolute() else path.parent / audio)
        row.setdefault("id", f"{path.stem}-{number}")
        row["reference"] = row.get("text", row.get("label", row.get("answer", "")))
        yield row


def _librispeech(root: pathlib.Path) -> Iterator[dict[str, Any]]:
    for transcript in sorted(root.rglob("*.trans.txt")):
        for line in transcript.read_text(encoding="utf-8").splitlines():
            if line.strip():
                utterance, _, text = line.partition(" ")
                yield {"id": utterance, "audio": str(transcript.parent / f"{utterance}.flac"), "reference": text,
                       "language": "en"}


def _table(files: Sequence[pathlib.Path]) -> Iterator[dict[str, Any]]:
    """Parquet files, or the arrow files `datasets.save_to_disk` writes; audio as {bytes, path} or a path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = 0
    for file in files:
        if file.suffix == ".parquet":
            table = pq.read_table(file)
        else:
            with pa.memory_map(str(file)) as source:
                table = pa.ipc.open_stream(source).read_all()
        for row in table.to_pylist():
            audio = row.get("audio")
            if isinstance(audio, dict):
                audio = audio.get("bytes") or audio.get("path")
            if audio is None:
                raise InputError(f"{file}: a row has no 'audio' column value")
            reference = next((row[k] for k in ("text", "sentence", "transcription", "label", "answer")
                              if row.get(k) is not None), "")
            count += 1
            yield {**{k: v for k, v in row.items() if k != "audio"}, "audio": audio,
                   "id": str(row.get("id", f"{file.stem}-{count}")), "reference": str(reference)}


# ----- running ---------------------------------------------------------------------------------

# What each metric and data format imports (module -> pip name), checked before any work starts.
METRIC_MODULES = {"wer": {"jiwer": "jiwer", "whisper_normalizer": "whisper-normalizer"},
                  "cer": {"jiwer": "jiwer", "whisper_normalizer": "whisper-normalizer", "zhconv": "zhconv"},
                  "bleu": {"sacrebleu": "sacrebleu"}}
TABLE_MODULES = {"pyarrow": "pyarrow"}


def check_requirements(task_name: str, data: str | pathlib.Path) -> Task:
    """The task, once its metric's and data reader's libraries are known to be installed: a missing
    one is named with the extra that brings it, before a model is loaded or an item generated."""
    import importlib.util

    if task_name not in TASKS:
        raise InputError(f"unknown task {task_name!r}; choose from {', '.join(TASKS)}")
    task = TASKS[task_name]
    path = pathlib.Path(data)
    if not path.exists():
        raise InputError(f"--data {data}: no such file or directory")
    needed = dict(METRIC_MODULES.get(task.metric, {}))
    if data_kind(path) == "table":
        needed.update(TABLE_MODULES)
    missing = sorted(pip for module, pip in needed.items() if importlib.util.find_spec(module) is None)
    if missing:
        raise InputError(f"task {task_name} needs {', '.join(missing)}, not installed: "
                         f"pip install \"qwen2audio[eval]\"")
    return task


@dataclass
class EvalRun:
    """A task over a dataset with one model and one setting, checked before the model loads: the
    items, where results go, and the saved results an earlier run left that this one may reuse.

    Saved results are reused only when made the same way (model, task, item, prompt, settings);
    any other saved result refuses the run, since mixing them would score one setup's outputs as
    another's. ``overwrite`` starts over instead.
    """

    task_name: str
    task: Task
    items: list[dict[str, Any]]
    output: pathlib.Path
    setup: dict[str, Any]
    done: dict[str, dict[str, Any]]

    @classmethod
    def prepare(cls, task_name: str, data: str | pathlib.Path, output: str | pathlib.Path, model_identity: str,
                limit: int | None = None, max_new_tokens: int = 256, segmentation: str = "vad",
                overwrite: bool = False) -> EvalRun:
        """``model_identity``: what the weights are (:func:`qwen2audio.checkpoint_identity`)."""
        task = check_requirements(task_name, data)
        items = read_items(data)[:limit]
        output = pathlib.Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        log = output.with_suffix(".jsonl")
        if overwrite:
            log.unlink(missing_ok=True)
        setup = {"model": model_identity, "task": task_name, "max_new_tokens": max_new_tokens,
                 "segmentation": segmentation, "decoding": "greedy"}
        run = cls(task_name, task, items, output, setup, read_finished(log))
        run._check_saved(log)
        return run

    def key(self, item: dict[str, Any]) -> str:
        """What produced an item's output: the setup, the item's id and its prompt."""
        prompt = item.get("question", "") if self.task.kind == "chat" else task_prompt(self.task, item)  # no audio
        made_of = [self.setup, str(item["id"]), prompt]
        return hashlib.sha256(json.dumps(made_of, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _check_saved(self, log: pathlib.Path) -> None:
        keys = {str(item["id"]): self.key(item) for item in self.items}
        foreign = [record for record in self.done.values()  # items left out now (--limit) do not count
                   if record["id"] in keys and keys[record["id"]] != record.get("key")]
        if foreign:
            first = foreign[0]
            made = first.get("setup") or {}
            changed = [f"{name} {made.get(name)!r} (now {value!r})" for name, value in self.setup.items()
                       if made.get(name) != value] or [f"item {first['id']!r} or its prompt"]
            raise InputError(f"{log} holds {len(foreign)} result(s) made another way ({'; '.join(changed)}): "
                             f"pass --overwrite to start over, or another --output")

    def run(self, model: Qwen2Audio, batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
        """Generate what is not saved yet (appending each result as it comes), then score all."""
        log = self.output.with_suffix(".jsonl")
        if log.is_file() and log.stat().st_size and not log.read_bytes().endswith(b"\n"):
            with open(log, "a", encoding="utf-8") as sink:  # an interrupted run cut its last line
                sink.write("\n")
        done, task, items = self.done, self.task, self.items
        todo = [item for item in items if str(item["id"]) not in done]
        references = [done[str(i["id"])]["reference"] for i in items if str(i["id"]) in done]
        hypotheses = [done[str(i["id"])]["hypothesis"] for i in items if str(i["id"]) in done]
        with tqdm(total=len(items), initial=len(items) - len(todo), desc=self.task_name, disable=not progress) as bar, \
                open(log, "a", encoding="utf-8") as sink:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                completions = _generate(model, task, batch, self.setup["max_new_tokens"])
                for item, text in zip(batch, completions, strict=True):
                    record = {"id": str(item["id"]), "reference": item["reference"], "hypothesis": text.strip(),
                              "key": self.key(item), "setup": self.setup}
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    sink.flush()
                    done[record["id"]] = record
                    references.append(record["reference"])
                    hypotheses.append(record["hypothesis"])
                value = score(task, references, hypotheses)
                bar.set_postfix({task.metric: f"{value:.4g}"} if value is not None else {})
                bar.update(len(batch))
        return self._write(len(todo))

    def _write(self, generated: int) -> dict[str, Any]:
        ordered = [self.done[str(i["id"])] for i in self.items]
        value = score(self.task, [r["reference"] for r in ordered], [r["hypothesis"] for r in ordered])
        results = [{k: r[k] for k in ("id", "reference", "hypothesis")} for r in ordered]
        result = {"task": self.task_name, "metric": self.task.metric, "value": value, "paper": self.task.paper,
                  "items": len(ordered), "generated_this_run": generated, "setup": self.setup, "results": results}
        self.output.write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
        self.output.with_suffix(".md").write_text(_table_markdown(result), encoding="utf-8")
        return result


def evaluate(model: Qwen2Audio, task_name: str, data: str | pathlib.Path, output: str | pathlib.Path,
             limit: int | None = None, batch_size: int = 16, max_new_tokens: int = 256,
             progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run a task; results append to OUTPUT.jsonl per item, so a rerun with the same model and
    settings skips finished items (see :class:`EvalRun`)."""
    run = EvalRun.prepare(task_name, data, output, model.identity, limit, max_new_tokens,
                          model.processor.segmentation, overwrite)
    return run.run(model, batch_size, progress)


def read_finished(log: pathlib.Path) -> dict[str, dict[str, Any]]:
    """id -> record of a JSONL results log (a line an interrupted run cut is left out: redo it)."""
    done = {}
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by an interrupted run is redone
            done[str(record["id"])] = record
    return done


def _generate(model: Qwen2Audio, task: Task, batch: Sequence[dict[str, Any]], max_new_tokens: int) -> list[str]:
    prompts = [task_prompt(task, item) for item in batch]
    audios = [] if task.kind == "chat" else [item["audio"] for item in batch]
    completions = model.generate(prompts, audios=audios, max_new_tokens=max_new_tokens, temperature=0.0,
                                 repetition_penalty=1.0)
    return [c.text for c in completions]


def _table_markdown(result: dict[str, Any]) -> str:
    unit = {"wer": "WER %", "cer": "CER %", "bleu": "BLEU", "accuracy": "accuracy", "none": "-"}[result["metric"]]
    value = "-" if result["value"] is None else f"{result['value']:.4g}"
    paper = "-" if result["paper"] is None else f"{result['paper']:g}"
    note = " (answers saved for an external GPT-4 judge)" if result["metric"] == "none" else ""
    return (f"| task | metric | measured | paper (Qwen2-Audio base) | items |\n|---|---|---|---|---|\n"
            f"| {result['task']}{note} | {unit} | {value} | {paper} | {result['items']} |\n")
