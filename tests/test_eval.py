"""Evaluation harness: metrics against hand-computed and published values; end to end, resumable."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

from qwen2audio.api import Qwen2Audio
from qwen2audio.evaluation import (
    TASKS,
    accuracy,
    bleu,
    character_error_rate,
    evaluate,
    normalize_chinese,
    normalize_english,
    read_items,
    task_prompt,
    word_error_rate,
)


def test_wer_by_hand():
    # "sat" -> "sit" is one substitution, the second "the" one deletion: 2 errors over 6 words.
    assert word_error_rate(["the cat sat on the mat"], ["the cat sit on mat"]) == pytest.approx(100 * 2 / 6)
    # Corpus level: errors and words add up over utterances (1 + 0 errors over 3 + 2 words).
    assert word_error_rate(["a b c", "d e"], ["a x c", "d e"]) == pytest.approx(20.0)


def test_whisper_english_normalizer_vectors():
    assert normalize_english("Mr. Smith won't pay twenty-one dollars, he's broke.") == \
        "mister smith will not pay $21 he is broke"
    assert word_error_rate(["He won't come"], ["he will not come"]) == 0.0


def test_chinese_normalization_and_cer_by_hand():
    assert normalize_chinese("漢語，你好！") == "汉语你好"  # traditional -> simplified, punctuation gone
    assert character_error_rate(["你好世界"], ["你好视界"]) == pytest.approx(25.0)  # 1 of 4 characters
    assert character_error_rate(["你好，世界。"], ["你好 世界"]) == 0.0


def test_bleu_published_example():
    # sacrebleu's README example: two reference streams, BLEU 48.53.
    refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
            ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    assert bleu(refs, hyps) == pytest.approx(48.530827009929865)
    assert bleu(["the cat is on the mat"], ["the cat is on the mat"]) == pytest.approx(100.0)


def test_accuracy_by_hand():
    assert accuracy(["Neutral", "joy", "sadness", "anger"], ["neutral.", "Joy", "anger", "anger"]) == 0.75


def test_prompts_follow_the_report():
    assert task_prompt(TASKS["librispeech-test-clean"], {}) == \
        "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>"
    assert task_prompt(TASKS["covost2-en-zh"], {}).endswith("Translate the speech into Chinese:")


# ----- end to end on a tiny checkpoint -----------------------------------------------------------


def clips(directory: pathlib.Path, count: int = 6) -> list[pathlib.Path]:
    rng = np.random.default_rng(3)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        path = directory / f"clip{k}.wav"
        soundfile.write(path, rng.standard_normal(8000 + 2000 * k) * 0.1, 16000)
        paths.append(path)
    return paths


def manifest(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def model(checkpoint):
    return Qwen2Audio.from_pretrained(checkpoint, progress=False)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    audio = clips(root / "audio")
    out = {
        "cv15-zh": manifest(root / "asr.jsonl", [{"audio": f"audio/{p.name}", "text": "你好世界", "language": "zh"}
                                                 for p in audio]),
        "covost2-en-de": manifest(root / "st.jsonl", [{"audio": str(p), "text": "Guten Tag"} for p in audio]),
        "meld": manifest(root / "cls.jsonl", [{"audio": f"audio/{p.name}", "label": "neutral"} for p in audio]),
        "airbench-chat": manifest(root / "chat.jsonl", [{"audio": f"audio/{p.name}", "question": "What is it?",
                                                         "answer": "noise"} for p in audio]),
    }
    libri = root / "LibriSpeech" / "test-clean" / "19" / "198"
    libri.mkdir(parents=True)
    lines = []
    for k, path in enumerate(audio):
        data, rate = soundfile.read(path)
        soundfile.write(libri / f"19-198-{k:04d}.flac", data, rate)
        lines.append(f"19-198-{k:04d} HELLO WORLD NUMBER {k}")
    (libri / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    out["librispeech-test-clean"] = root / "LibriSpeech"
    table = pa.table({"audio": [{"bytes": p.read_bytes(), "path": p.name} for p in audio],
                      "sentence": ["bonjour"] * len(audio), "id": [f"fr{k}" for k in range(len(audio))]})
    pq.write_table(table, root / "fr.parquet")
    out["cv15-fr"] = root / "fr.parquet"
    with pa.OSFile(str(root / "vocal.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.set_column(1, "sentence", pa.array(["laughter"] * len(audio))))
    out["vocalsound"] = root / "vocal.arrow"
    return out


@pytest.mark.parametrize("task", ["cv15-zh", "covost2-en-de", "meld", "airbench-chat", "librispeech-test-clean",
                                  "cv15-fr", "vocalsound"])
def test_end_to_end_writes_results_and_resumes_without_repeating(model, datasets, task, tmp_path):
    assert len(read_items(datasets[task])) == 6
    output = tmp_path / f"{task}.json"
    first = evaluate(model, task, datasets[task], output, batch_size=4, max_new_tokens=6, progress=False)
    assert first["items"] == 6 and first["generated_this_run"] == 6
    saved = json.loads(output.read_text())
    assert saved["items"] == 6 and len(saved["results"]) == 6
    table = output.with_suffix(".md").read_text()
    assert task in table and (f"{TASKS[task].paper:g}" in table if TASKS[task].paper else "external" in table)
    refs = [r["reference"] for r in saved["results"]]
    hyps = [r["hypothesis"] for r in saved["results"]]
    if TASKS[task].metric == "cer":
        assert saved["value"] == pytest.approx(character_error_rate(refs, hyps))
    log = output.with_suffix(".jsonl")
    assert len(log.read_text().splitlines()) == 6
    again = evaluate(model, task, datasets[task], output, batch_size=4, max_new_tokens=6, progress=False)
    assert again["generated_this_run"] == 0 and again["value"] == first["value"]
    assert len(log.read_text().splitlines()) == 6  # nothing appended: no repeated work
    # An interrupted run (last line cut) redoes only that item.
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    third = evaluate(model, task, datasets[task], output, batch_size=4, max_new_tokens=6, progress=False)
    assert third["generated_this_run"] == 1 and third["results"] == first["results"]
    fourth = evaluate(model, task, datasets[task], output, batch_size=4, max_new_tokens=6, progress=False)
    assert fourth["generated_this_run"] == 0


def test_eval_command(datasets, checkpoint, tmp_path):
    import subprocess
    import sys

    output = tmp_path / "meld.json"
    result = subprocess.run([sys.executable, "-m", "qwen2audio.cli", "eval", "--model", str(checkpoint),
                             "--task", "meld", "--data", str(datasets["meld"]), "--output", str(output),
                             "--max-new-tokens", "4", "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| meld | accuracy |" in result.stdout and "| 0.553 | 6 |" in result.stdout
    assert json.loads(output.read_text())["items"] == 6


def test_saved_results_are_reused_only_when_made_the_same_way(model, datasets, tmp_path):
    """Another task, length limit or model on the same output refuses, naming what changed;
    --overwrite starts over; an output folder that does not exist is made."""
    from qwen2audio.errors import InputError

    output = tmp_path / "new" / "folder" / "meld.json"
    first = evaluate(model, "meld", datasets["meld"], output, batch_size=6, max_new_tokens=4, progress=False)
    assert first["generated_this_run"] == 6 and output.is_file()
    with pytest.raises(InputError, match=r"6 result\(s\) made another way \(max_new_tokens 4 \(now 5\)\).*--overwrite"):
        evaluate(model, "meld", datasets["meld"], output, max_new_tokens=5, progress=False)
    with pytest.raises(InputError, match=r"task 'meld' \(now 'vocalsound'\)"):
        evaluate(model, "vocalsound", datasets["meld"], output, max_new_tokens=4, progress=False)
    other = Qwen2Audio(model.network, model.processor, model.generation, identity="another-model#0")
    with pytest.raises(InputError, match=r"model '.*' \(now 'another-model#0'\)"):
        evaluate(other, "meld", datasets["meld"], output, max_new_tokens=4, progress=False)
    again = evaluate(model, "meld", datasets["meld"], output, max_new_tokens=5, progress=False, overwrite=True)
    assert again["generated_this_run"] == 6 and again["setup"]["max_new_tokens"] == 5
    resumed = evaluate(model, "meld", datasets["meld"], output, max_new_tokens=5, progress=False)
    assert resumed["generated_this_run"] == 0 and resumed["results"] == again["results"]
    fewer = evaluate(model, "meld", datasets["meld"], output, limit=3, max_new_tokens=5, progress=False)
    assert fewer["generated_this_run"] == 0 and fewer["results"] == again["results"][:3]  # a subset is reused


def test_a_missing_metric_library_is_named_before_the_model_loads(datasets, checkpoint, tmp_path, monkeypatch,
                                                                   capsys):
    import importlib.util

    from qwen2audio import cli
    from qwen2audio.api import Qwen2Audio as Model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sacrebleu" else real(name, *a))
    monkeypatch.setattr(Model, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    code = cli.main(["eval", "--model", str(checkpoint), "--task", "covost2-en-de", "--data",
                     str(datasets["covost2-en-de"]), "--output", str(tmp_path / "st.json"), "--quiet"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ('qwen2audio: error: task covost2-en-de needs sacrebleu, not installed: '
                                               'pip install "qwen2audio[eval]"')
    assert cli.main(["eval", "--model", str(checkpoint), "--task", "meld", "--data", str(tmp_path / "nope.jsonl"),
                     "--quiet"]) == 2
    assert f"--data {tmp_path / 'nope.jsonl'}: no such file" in capsys.readouterr().err
