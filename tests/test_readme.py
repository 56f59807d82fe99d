"""The README's shell and Python examples, run as written with the tiny test checkpoint standing in
for the real ones (local folders and hub ids alike) and small test clips for the user's files, so
the README cannot drift from the code. Lines that install, download or test are recognised and
left out (each kind named below); any other line must run, exit 0 and print no traceback."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import soundfile

from serving import free_port

ROOT = pathlib.Path(__file__).parent.parent
DATA = pathlib.Path(__file__).parent / "data"
README = (ROOT / "README.md").read_text(encoding="utf-8")
HUB_IDS = ("Qwen/Qwen2-Audio-7B-Instruct", "Qwen/Qwen2-Audio-7B")
LOCAL = ("./Qwen2-Audio-7B-Instruct", "./Qwen2-Audio-7B")
# Commands not run here, and why: each is what CI or the user's own machine does.
NOT_RUN = {
    "pip install": "installs the package (CI's set-up does)",
    "ruff check": "the linter (CI runs it)",
    "python -m pytest": "this suite itself",
    "hf download": "downloads 16.8 GB from the hub (no network here)",
    "bash bench/gpu_session.sh": "needs a GPU",
    "ray start": "starts a Ray node on the user's machines",
}
ON_A_CLUSTER = "--ray-address auto"  # commands that join a running cluster (the one `ray start` makes)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands() -> list[str]:
    """Every shell command of the README: comments dropped, continued lines joined, `a && b` split."""
    found = []
    for block in blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found += [part.strip() for part in line.split("&&")]
    return found


def is_run(command: str) -> bool:
    return not any(command.startswith(prefix) for prefix in NOT_RUN) and ON_A_CLUSTER not in command


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_checkpoint):
    """A folder laid out as the README assumes: the checkpoints, the user's audio, a LibriSpeech set."""
    root = tmp_path_factory.mktemp("readme")
    for name in LOCAL:
        (root / name).symlink_to(tiny_checkpoint, target_is_directory=True)
    (root / "tests").mkdir()
    (root / "tests" / "data").symlink_to(DATA, target_is_directory=True)
    for name, source in {"question.wav": "question_en_16k.wav", "speech.mp3": "speech_en.mp3",
                         "glass.wav": "tone_440hz_3s.wav", "meeting.m4a": "speech_en.m4a"}.items():
        shutil.copy(DATA / source, root / name)
    (root / "talks").mkdir()
    shutil.copy(DATA / "speech_en_16k.wav", root / "talks" / "intro.wav")
    shutil.copy(DATA / "speech_zh_16k.wav", root / "talks" / "second.wav")
    chapter = root / "LibriSpeech" / "test-clean" / "19" / "198"
    chapter.mkdir(parents=True)
    samples, rate = soundfile.read(DATA / "speech_en_16k.wav")
    soundfile.write(chapter / "19-198-0000.flac", samples, rate)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 THE QUICK BROWN FOX\n")
    return root, tiny_checkpoint


def substituted(text: str, checkpoint: pathlib.Path, port: int | None = None) -> str:
    for hub_id in HUB_IDS:
        text = text.replace(f'"{hub_id}"', f'"{checkpoint}"').replace(f" {hub_id} ", f" {checkpoint} ")
    return text.replace("127.0.0.1:8000", f"127.0.0.1:{port}") if port else text


def run(argv: list[str], cwd: pathlib.Path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "HOME": str(cwd)}
    return subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300, env=env)


def assert_clean(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0 and "Traceback" not in result.stderr, f"{what}\n{result.stderr[-2000:]}"


def test_every_command_is_run_or_named_as_not_runnable_here():
    listed = commands()
    assert len([c for c in listed if is_run(c)]) >= 8
    assert all(c.startswith(("qwen2audio ", *NOT_RUN)) for c in listed), listed


@pytest.mark.parametrize("command", [c for c in commands() if is_run(c) and not c.startswith("qwen2audio serve")])
def test_shell_example(workspace, command):
    root, checkpoint = workspace
    argv = shlex.split(substituted(command, checkpoint))
    assert argv[0] == "qwen2audio"
    quiet = [] if argv[1] == "inspect" else ["--quiet"]  # inspect shows no progress to silence
    result = run([sys.executable, "-m", "qwen2audio.cli", *argv[1:], *quiet], root, stdin="/exit\n")
    assert_clean(result, command)
    if argv[1] == "chat":  # given /exit at once: only its help
        assert result.stderr.startswith("commands:")
    elif "--output-dir" in argv:
        folder = root / argv[argv.index("--output-dir") + 1]
        assert sorted(p.name for p in folder.iterdir()) == ["intro.srt", "second.srt"]
    else:
        assert result.stdout.strip()


def test_server_example_and_its_python_client(workspace):
    """`qwen2audio serve` as the README starts it ([--api-key KEY] left out: optional), then the
    README's openai client code against it."""
    root, checkpoint = workspace
    (serve,) = [c for c in commands() if c.startswith("qwen2audio serve") and is_run(c)]
    port = free_port()
    optional_left_out = re.sub(r"\[[^\]]*\]", "", substituted(serve, checkpoint))
    argv = shlex.split(optional_left_out.replace("--port 8000", f"--port {port}"))
    log = root / "serve.log"
    with open(log, "w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "qwen2audio.cli", *argv[1:], "--quiet"], cwd=root,
                                  stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None and time.time() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client_code = [b for b in blocks("python") if "OpenAI(" in b]
        assert client_code
        for code in client_code:
            assert_clean(run([sys.executable, "-c", substituted(code, checkpoint, port)], root), code)
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_python_examples(workspace):
    root, checkpoint = workspace
    examples = [b for b in blocks("python") if "OpenAI(" not in b]
    assert examples
    for code in examples:
        result = run([sys.executable, "-c", substituted(code, checkpoint)], root)
        assert_clean(result, code)
        assert result.stdout.strip()
