"""The interactive chat of `qwen2audio chat`: a conversation kept across turns, slash commands.

Owns the REPL: reading lines, attaching clips, streaming replies, Ctrl-C handling, saving. It talks
to the model only through Qwen2Audio.chat, so every turn is an ordinary engine request.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import IO, Any

from qwen2audio.api import Qwen2Audio
from qwen2audio.audio.io import load_audio
from qwen2audio.errors import InputError

HELP = "commands: /audio PATH, /system TEXT, /reset, /save FILE, /exit (an empty line sends attached audio alone)"


def system_messages(system: str | None) -> list[dict[str, Any]]:
    """The conversation's opening: a system message if one is given (else the template's default)."""
    return [{"role": "system", "content": system}] if system else []


def user_message(audios: Sequence[str], text: str | None) -> dict[str, Any]:
    """One user turn: the audio files in order, then the text, if any."""
    content: list[dict[str, Any]] = [{"type": "audio", "audio": path} for path in audios]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


class ChatSession:
    def __init__(self, model: Qwen2Audio, sampling: dict[str, Any], system: str | None = None,
                 adapter: str | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.sampling = sampling
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.pending_audio: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.messages = system_messages(self.system)
        self.pending_audio = []

    def loop(self, stdin: IO[str], stdout: IO[str], stderr: IO[str]) -> int:
        """Read lines until /exit or end of input (Ctrl-D); returns the exit code. At a terminal,
        lines are edited with readline and kept in a history file across sessions."""
        print(HELP, file=stderr)
        with _line_reader(stdin, stderr) as read:
            while True:
                try:
                    line = read()
                except KeyboardInterrupt:
                    print(file=stderr)
                    continue
                if line is None:
                    return 0
                try:
                    if self.handle(line, stdout, stderr) == "exit":
                        return 0
                except InputError as exc:
                    print(f"error: {exc}", file=stderr)

    def handle(self, line: str, stdout: IO[str], stderr: IO[str]) -> str | None:
        command, _, rest = line.partition(" ")
        if command == "/exit":
            return "exit"
        if command == "/audio":
            path = rest.strip()
            load_audio(path)  # fail now, at the command, not later inside the turn
            self.pending_audio.append(path)
            print(f"attached {path} ({len(self.pending_audio)} clip(s) for the next turn)", file=stderr)
        elif command == "/system":
            self.system = rest.strip() or None
            self.reset()
            print("system prompt set; new conversation", file=stderr)
        elif command == "/reset":
            self.reset()
            print("new conversation", file=stderr)
        elif command == "/save":
            self.save(pathlib.Path(rest.strip()))
            print(f"saved to {rest.strip()}", file=stderr)
        elif command.startswith("/"):
            print(f"unknown command {command}; {HELP}", file=stderr)
        elif line.strip() or self.pending_audio:
            self.turn(line.strip(), stdout)
        return None

    def turn(self, text: str, stdout: IO[str]) -> None:
        user = user_message(self.pending_audio, text)
        stream = self.model.chat([*self.messages, user], stream=True, adapter=self.adapter, **self.sampling)
        reply: list[str] = []
        with _ctrl_c_stops() as stopped:
            for delta in stream:
                reply.append(delta)
                stdout.write(delta)
                stdout.flush()
                if stopped.is_set():
                    break
        if stopped.is_set():
            stream.close()  # aborts the request and frees its cache blocks
            stdout.write(" [stopped]")
        stdout.write("\n")
        stdout.flush()
        self.messages += [user, {"role": "assistant", "content": "".join(reply)}]
        self.pending_audio = []

    def save(self, path: pathlib.Path) -> None:
        try:
            path.write_text(json.dumps(self.messages, ensure_ascii=False, indent=2), encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _ctrl_c_stops() -> Iterator[threading.Event]:
    """Ctrl-C sets the event instead of raising: a KeyboardInterrupt could land anywhere inside an
    engine step and leave its bookkeeping half done, so the reply loop checks the event between
    deltas and stops there; a second Ctrl-C interrupts at once. (Outside the main thread, where no
    handler can be set, Ctrl-C is left alone.)"""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def handler(signum: int, frame: object) -> None:
        if stopped.is_set():
            signal.default_int_handler(signum, frame)
        stopped.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)


HISTORY = pathlib.Path("~/.qwen2audio_history")


@contextlib.contextmanager
def _line_reader(stdin: IO[str], stderr: IO[str]) -> Iterator[Any]:
    """A function returning the next line (None at the end of input). At a terminal: input() with
    readline's editing and the history file, read at the start and written at the end."""
    readline = _readline() if stdin is sys.stdin and stdin.isatty() and sys.stdout.isatty() else None
    if readline is None:  # piped, or no readline (Windows): plain lines, the prompt on stderr
        def next_line() -> str | None:
            if stdin.isatty():
                print("you> ", end="", file=stderr, flush=True)
            line = stdin.readline()
            return line.rstrip("\n") if line else None

        yield next_line
        return
    try:
        history = HISTORY.expanduser()
    except RuntimeError:  # no home directory
        history = pathlib.Path(".qwen2audio_history")
    with contextlib.suppress(OSError):
        readline.read_history_file(history)
    readline.set_history_length(1000)

    def read() -> str | None:
        try:
            return input("you> ")
        except EOFError:  # Ctrl-D
            print(file=stderr)
            return None

    try:
        yield read
    finally:
        with contextlib.suppress(OSError):
            readline.write_history_file(history)


def _readline() -> Any:
    try:
        import readline
    except ImportError:
        return None
    return readline
