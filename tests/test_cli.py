"""The command line on a tiny checkpoint, replies vs the oracle: in-process through cli.main(argv),
and once per kind of command as a user runs it, in a subprocess."""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from qwen2audio import cli as command_line
from qwen2audio import load_audio
from qwen2audio.transcribe import clean_transcript

from checkpoints import greedy_oracle

DATA = pathlib.Path(__file__).parent / "data"
SPEECH = DATA / "speech_en_16k.wav"
TONE = DATA / "tone_440hz_3s.wav"
TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def oracle(checkpoint):
    return greedy_oracle(checkpoint, TOKENS)


def cli(*args, stdin=None):
    """A real `qwen2audio` process. Bytes in and out, decoded without newline translation: replies
    may hold a bare \r."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "-m", "qwen2audio.cli", *map(str, args)],
                            input=stdin.encode() if stdin else None, capture_output=True, env=env, timeout=300)
    result.stdout, result.stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    return result


@pytest.fixture
def main(capsys, monkeypatch):
    """cli.main(argv) in this process: (exit code, stdout, stderr), as `cli` gives them."""

    def call(*args, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        try:
            code = command_line.main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help and usage errors
            code = exc.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return call


def user(*parts):
    return {"role": "user", "content": list(parts)}


def test_run_audio_analysis_streams_the_greedy_reply(checkpoint, oracle):
    result = cli("run", "--model", checkpoint, "--audio", SPEECH, "--prompt", "What is said?",
                 "--temperature", "0", "--max-new-tokens", TOKENS, "--quiet")
    assert result.returncode == 0, result.stderr
    expected, _ = oracle([user({"type": "audio", "audio_url": str(SPEECH)},
                               {"type": "text", "text": "What is said?"})], [SPEECH])
    assert result.stdout == expected + "\n"


def test_run_voice_chat_with_system_prompt_as_json(checkpoint, oracle, main):
    result = main("run", "--model", checkpoint, "--audio", TONE, "--system", "Answer in French.",
                 "--temperature", "0", "--max-new-tokens", TOKENS, "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    text, ids = oracle([{"role": "system", "content": "Answer in French."},
                        user({"type": "audio", "audio_url": str(TONE)})], [TONE])
    reply = json.loads(result.stdout)
    assert reply["token_ids"] == ids and reply["text"] == text
    assert reply["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == TOKENS


def test_run_raw_base_prompt(checkpoint, oracle, main):
    prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:"
    result = main("run", "--model", checkpoint, "--raw", "--audio", TONE, "--prompt", prompt,
                 "--temperature", "0", "--max-new-tokens", TOKENS, "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == oracle(prompt, [TONE])[0] + "\n"


def test_chat_several_turns_through_stdin(checkpoint, oracle, tmp_path, main):
    saved = tmp_path / "conversation.json"
    script = f"/audio {TONE}\nWhat is it?\nAnd what else?\n/save {saved}\n/reset\nHello\n/exit\n"
    result = main("chat", "--model", checkpoint, "--temperature", "0", "--max-new-tokens", TOKENS, "--quiet",
                 stdin=script)
    assert result.returncode == 0, result.stderr
    turn1 = [user({"type": "audio", "audio_url": str(TONE)}, {"type": "text", "text": "What is it?"})]
    reply1, _ = oracle(turn1, [TONE])
    turn2 = [*turn1, {"role": "assistant", "content": reply1}, user({"type": "text", "text": "And what else?"})]
    reply2, _ = oracle(turn2, [TONE])
    reply3, _ = oracle([user({"type": "text", "text": "Hello"})], [])
    assert result.stdout == f"{reply1}\n{reply2}\n{reply3}\n"
    conversation = json.loads(saved.read_text())
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert conversation[0]["content"][0] == {"type": "audio", "audio": str(TONE)}
    assert conversation[3]["content"] == reply2


def test_chat_reports_a_bad_clip_and_goes_on(checkpoint, main):
    result = main("chat", "--model", checkpoint, "--temperature", "0", "--max-new-tokens", 3, "--quiet",
                 stdin=f"/audio {DATA / 'random_bytes.wav'}\n/frobnicate\nHi\n")
    assert result.returncode == 0
    assert "error: audio file" in result.stderr and "cannot decode audio" in result.stderr
    assert "unknown command /frobnicate" in result.stderr
    assert len(result.stdout.splitlines()) == 1  # the "Hi" turn still got its reply


TIME = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"


def test_transcribe_long_audio_into_srt_vtt_and_json(checkpoint, oracle, tmp_path, main):
    clip = DATA / "chirp_40s_22k.wav"
    for fmt in ("srt", "vtt", "json"):
        run = cli if fmt == "srt" else main  # one real process, the other formats in-process
        result = run("transcribe", "--model", checkpoint, clip, "--format", fmt, "--output-dir", tmp_path,
                     "--max-new-tokens", 8, "--quiet", "--segmentation", "fixed")  # a chirp is no speech
        assert result.returncode == 0, result.stderr
    srt = (tmp_path / "chirp_40s_22k.srt").read_text()
    vtt = (tmp_path / "chirp_40s_22k.vtt").read_text()
    doc = json.loads((tmp_path / "chirp_40s_22k.json").read_text())
    srt_times = re.findall(rf"^{TIME} --> {TIME}$", srt, re.M)
    assert [t[:4] for t in srt_times] == [("00", "00", "00", "000"), ("00", "00", "30", "000")]
    assert [t[4:] for t in srt_times] == [("00", "00", "30", "000"), ("00", "00", "40", "000")]
    assert srt.startswith("1\n00:00:00,000 --> 00:00:30,000\n") and "\n\n2\n00:00:30,000 --> 00:00:40,000\n" in srt
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:30.000\n")
    assert "\n\n00:00:30.000 --> 00:00:40.000\n" in vtt
    assert [(s["start"], s["end"]) for s in doc["segments"]] == [(0, 30), (30, 40.0)]
    # The first window's text is the oracle's greedy reply to the same instruction, cleaned.
    samples = load_audio(clip)
    instruction = ("Transcribe the speech verbatim. Reply with the transcript only, without quotes or any "
                   "other words.")
    window = tmp_path / "window.wav"
    import soundfile

    soundfile.write(window, samples[:480000], 16000, subtype="FLOAT")
    expected, _ = oracle([user({"type": "audio", "audio_url": str(window)},
                               {"type": "text", "text": instruction})], [window], max_new_tokens=8)
    assert doc["segments"][0]["text"] == clean_transcript(expected)
    # The second window, the last 10 s, as the oracle hears it alone.
    soundfile.write(window, samples[480000:], 16000, subtype="FLOAT")
    expected, _ = oracle([user({"type": "audio", "audio_url": str(window)},
                               {"type": "text", "text": instruction})], [window], max_new_tokens=8)
    assert doc["segments"][1]["text"] == clean_transcript(expected) and doc["segments"][1]["text"]


def test_transcribe_goes_on_past_a_bad_file_and_exits_1(checkpoint, tmp_path, main):
    """Each file is written as it completes; an undecodable one is reported on stderr, the summary
    names it, and the exit status is 1 (a single bad file stays a usage error: exit 2)."""
    good = DATA / "tone_440hz_3s.wav"
    result = main("transcribe", "--model", checkpoint, good, DATA / "random_bytes.wav", "--format", "json",
                  "--output-dir", tmp_path, "--max-new-tokens", 4, "--quiet", "--segmentation", "fixed")
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if "cannot decode audio" in line]
    assert "random_bytes.wav" in line
    assert "1 of 2 files transcribed; failed: " in result.stderr
    doc = json.loads((tmp_path / "tone_440hz_3s.json").read_text())
    assert [(s["start"], s["end"]) for s in doc["segments"]] == [(0.0, 3.0)] and doc["segments"][0]["tokens"]
    assert not (tmp_path / "random_bytes.json").exists()
    alone = main("transcribe", "--model", checkpoint, DATA / "random_bytes.wav", "--quiet")
    assert alone.returncode == 2 and "cannot decode audio" in alone.stderr


def test_clean_transcript_strips_chat_model_chatter():
    assert clean_transcript("The original content of this audio is: 'Hello there.'") == "Hello there."
    assert clean_transcript("<|en|>Hello there.") == "Hello there."
    assert clean_transcript("Transcription: “Bonjour”") == "Bonjour"
    assert clean_transcript("Speech is silver.") == "Speech is silver."


BEFORE_LOADING = [
    (["run", "--audio", DATA / "missing.wav"], f"error: --audio {DATA / 'missing.wav'}: no such file\n"),
    (["run", "--audio", DATA / "random_bytes.wav"], f"--audio {DATA / 'random_bytes.wav'}: cannot decode audio"),
    (["run", "--audio", DATA / "too_short_10ms.wav"],
     f"--audio {DATA / 'too_short_10ms.wav'}: 10.0 ms of audio is too short to yield an audio token"),
    (["run", "--audio", TONE, "--temperature", "-2"], "temperature must be in"),
    (["transcribe", DATA / "nope"], "nope: no such file or directory"),
    (["transcribe", TONE, "--output-dir", TONE / "x"], f"--output-dir {TONE / 'x'}: cannot make this folder"),
]


@pytest.mark.parametrize("args,message", BEFORE_LOADING)
def test_inputs_and_outputs_are_checked_before_the_model_loads(checkpoint, args, message, main, no_model_loading):
    result = main(args[0], "--model", checkpoint, "--quiet", *args[1:])
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--audio", DATA / "missing.wav"], f"error: --audio {DATA / 'missing.wav'}: no such file\n"),
        (["run", "--audio", DATA / "random_bytes.wav"], f"--audio {DATA / 'random_bytes.wav'}: cannot decode audio"),
        (["run", "--audio", DATA / "too_short_10ms.wav"],
         f"--audio {DATA / 'too_short_10ms.wav'}: 10.0 ms of audio is too short to yield an audio token"),
        (["run"], "give --audio, --prompt, or both"),
        (["transcribe", DATA / "nope"], "nope: no such file or directory"),
        (["run", "--audio", TONE, "--temperature", "-2"], "temperature must be in"),
        (["run", "--audio", TONE, "--dtype", "int4"], "dtype 'int4' is not supported"),
    ],
)
def test_errors_exit_2_with_one_line(checkpoint, args, message, main):
    result = main(args[0], "--model", checkpoint, "--quiet", *args[1:])
    assert result.returncode == 2
    assert result.stderr.strip().startswith("qwen2audio: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_model_exits_2(main):
    result = main("run", "--model", "/nonexistent/model", "--audio", TONE, "--quiet")
    assert result.returncode == 2 and "no such checkpoint directory" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["run", "chat", "transcribe", "inspect"])
def test_help_has_examples(command, main):
    result = main(command, "--help")
    assert result.returncode == 0 and "example" in result.stdout
    # inspect loads no model, so it takes none of the model's flags
    assert ("--device" in result.stdout) == (command != "inspect") and "(default: vad)" in result.stdout


def test_chat_ctrl_c_stops_the_reply_and_keeps_the_session(checkpoint):
    import signal
    import threading

    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen2audio.cli", "chat", "--model", str(checkpoint), "--temperature", "0",
         "--max-new-tokens", "3000", "--quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    received = bytearray()

    def read() -> None:
        for chunk in iter(lambda: process.stdout.read(1), b""):
            received.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    process.stdin.write(b"Tell me a long story.\n")
    process.stdin.flush()
    deadline = time.time() + 120
    while not received and time.time() < deadline:
        time.sleep(0.05)
    assert received, "the reply never started"
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.stdin.write(b"/exit\n")
    process.stdin.flush()
    assert process.wait(timeout=120) == 0
    reader.join(timeout=10)
    assert b" [stopped]\n" in received


def one_line_usage_error(result, fragment):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen2audio") and fragment in lines[0], result.stderr


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if the model is loaded: these errors must come before that."""
    from qwen2audio.api import Qwen2Audio

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Qwen2Audio, "from_pretrained", refuse)


def test_serve_help_lists_the_vllm_flags_with_their_defaults(main):
    result = main("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for fragment in ("MODEL", "--max-model-len", "--gpu-memory-utilization", "(default: 0.9)", "--max-num-seqs",
                     "(default: 256)", "--max-num-batched-tokens", "(default: 16384)", "--kv-cache-memory-bytes",
                     "--seed", "--chat-template", "--limit-mm-per-prompt", "--enable-prefix-caching",
                     "--no-enable-prefix-caching", "--uvicorn-log-level", "--served-model-name",
                     "--disable-log-requests", "--port", "(default: 8000)", "(default: 127.0.0.1)"):
        assert fragment in text, fragment


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 is not supported: the 8.4 B model fits one GPU"),
        (["-pp", "2"], "--pipeline-parallel-size 2 is not supported"),
        (["--port", "70000"], "port 70000 is out of range (1-65535)"),
        (["--port", "http"], "'http' is not an integer"),
        (["--gpu-memory-utilization", "1.5"], "1.5 is not in (0, 1]"),
        (["--limit-mm-per-prompt", '{"image": 1}'], "Qwen2-Audio takes audio only"),
        (["--limit-mm-per-prompt", "audio=2"], "is not JSON"),
        (["--chat-template", "/nonexistent/template.jinja"], "--chat-template /nonexistent/template.jinja: cannot"),
        (["--model", "/other/model"], "two models given"),
    ],
)
def test_serve_refuses_bad_flags_in_one_line_before_loading(main, no_model_loading, checkpoint, args, fragment):
    one_line_usage_error(main("serve", checkpoint, *args), fragment)


def test_serve_reports_a_port_in_use_before_loading(main, no_model_loading, checkpoint):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.perf_counter()
        one_line_usage_error(main("serve", checkpoint, "--port", port), f"cannot listen on 127.0.0.1:{port}: in use")
        assert time.perf_counter() - started < 2.0
    one_line_usage_error(main("serve"), "give the model: qwen2audio serve MODEL")


def test_version_and_inspect_reports_every_bad_file(main):
    from qwen2audio import __version__

    version = main("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"qwen2audio {__version__}"
    result = main("inspect", DATA / "random_bytes.wav", TONE, DATA / "empty.wav", "--json")
    assert result.returncode == 1  # some files were bad (all bad: 2, a usage error)
    assert [json.loads(line)["file"] for line in result.stdout.splitlines()] == [str(TONE)]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "random_bytes.wav" in errors[0] and "empty.wav" in errors[1]
    assert main("inspect", DATA / "empty.wav").returncode == 2
    assert main("inspect", TONE, "--device", "cpu").returncode == 2  # not a flag inspect takes


def test_transcribe_searches_subfolders_with_an_include_filter_and_goes_on_past_bad_files(checkpoint, tmp_path,
                                                                                          main):
    import shutil

    tree = tmp_path / "talks"
    (tree / "day1").mkdir(parents=True)
    (tree / "day2").mkdir()
    (tree / ".cache").mkdir()
    shutil.copy(TONE, tree / "day1" / "a.wav")
    shutil.copy(TONE, tree / "day2" / "a.wav")  # the same name in another folder
    shutil.copy(DATA / "random_bytes.wav", tree / "day2" / "b.wav")
    shutil.copy(TONE, tree / ".cache" / "c.wav")  # hidden: skipped
    (tree / "notes.txt").write_text("not audio")
    out = tmp_path / "subs"
    result = main("transcribe", "--model", checkpoint, tree, "--output-dir", out, "--format", "srt",
                  "--max-new-tokens", "4", "--segmentation", "fixed", "--quiet")
    assert result.returncode == 1
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.srt")) == ["day1/a.srt", "day2/a.srt"]
    assert "b.wav" in result.stderr and "2 of 3 files transcribed" in result.stderr
    only = main("transcribe", "--model", checkpoint, tree, "--include", "day1/*.wav", "--output-dir",
                tmp_path / "only", "--max-new-tokens", "4", "--segmentation", "fixed", "--quiet")
    assert only.returncode == 0 and [p.name for p in (tmp_path / "only").rglob("*.txt")] == ["a.txt"]


def test_transcribe_refuses_inputs_that_would_share_a_transcript_before_loading(tmp_path, main, no_model_loading,
                                                                                 checkpoint):
    import shutil

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(TONE, tmp_path / folder / "x.wav")
    shared = main("transcribe", "--model", checkpoint, tmp_path / "a", tmp_path / "b", "--output-dir",
                  tmp_path / "out", "--quiet")
    assert shared.returncode == 2 and "would both be written to x.txt in --output-dir" in shared.stderr
    absolute = main("transcribe", "--model", checkpoint, tmp_path / "a", "--include", "/abs/*.wav", "--quiet")
    assert absolute.returncode == 2 and "--include /abs/*.wav: not a pattern inside a folder" in absolute.stderr


def test_chat_at_a_terminal_edits_lines_keeps_history_and_leaves_on_ctrl_d(checkpoint, tmp_path):
    """`qwen2audio chat` in a pseudo-terminal: readline's editing (Ctrl-A moves to the line's start),
    the up arrow recalls the last line, Ctrl-D leaves with status 0, and the history file holds
    the line for the next session."""
    import os
    import pty
    import select
    import subprocess

    leader, follower = pty.openpty()
    env = {**os.environ, "HOME": str(tmp_path), "TERM": "dumb"}
    process = subprocess.Popen([sys.executable, "-m", "qwen2audio.cli", "chat", "--model", str(checkpoint),
                                "--max-new-tokens", "2", "--quiet"],
                               stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, count: int = 1, timeout: float = 120.0) -> None:
        nonlocal seen
        deadline = time.time() + timeout
        while seen.count(marker) < count:
            assert time.time() < deadline, f"no {marker!r} x{count} in: {seen.decode(errors='replace')}"
            if select.select([leader], [], [], 0.5)[0]:
                with contextlib.suppress(OSError):
                    seen += os.read(leader, 4096)

    import contextlib

    try:
        read_until(b"you> ")
        os.write(leader, b"reset\x01/\r")  # typed "reset", Ctrl-A to its start, "/" before it: "/reset"
        read_until(b"new conversation")
        read_until(b"you> ", 2)
        os.write(leader, b"\x1b[A\r")  # up arrow: "/reset" again
        read_until(b"new conversation", 2)
        read_until(b"you> ", 3)
        os.write(leader, b"\x04")  # Ctrl-D
        assert process.wait(timeout=60) == 0, seen.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    assert seen.count(b"new conversation") == 2 and b"Traceback" not in seen
    assert (tmp_path / ".qwen2audio_history").read_text().splitlines()[-1] == "/reset"


def test_every_option_of_every_command_says_its_default():
    """Options users may leave out say what they get then, in `--help` as argparse renders it."""
    import argparse

    parser = command_line.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    silent = []
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if (not action.option_strings or action.required or action.nargs == 0
                    or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
                continue
            shown = sub.formatter_class(prog=name)._get_help_string(action) % {"default": action.default}
            if "default" not in shown:
                silent.append(f"{name} {action.option_strings[0]}")
    assert not silent, silent


def test_batch_without_ray_names_the_extra_before_any_work(checkpoint, main, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    manifest = tmp_path / "items.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": str(SPEECH)}) + "\n")
    result = main("batch", "--model", checkpoint, "--input", manifest, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 2
    assert result.stderr == 'qwen2audio: error: this needs Ray, which is not installed: pip install "qwen2audio[ray]"\n'
    assert not (tmp_path / "out.jsonl").exists()
