"""The async front: an Engine's step loop on a background thread; coroutines submit, stream and abort.

Owns the thread bridge. Every engine call happens on the loop thread: submissions and aborts travel
to it as typed commands through a queue, outputs come back through each caller's asyncio queue,
and after every step the loop publishes an EngineStats snapshot that other threads may read.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from qwen2audio import heap
from qwen2audio.engine.core import Engine
from qwen2audio.engine.request import Prompt, RequestOutput, SamplingParams
from qwen2audio.engine.scheduler import EngineStats
from qwen2audio.errors import AdapterError
from qwen2audio.model.lora import Loaded

logger = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5  # how long an idle loop waits for a command before looking at its stop flag


@dataclass(frozen=True)
class Submit:
    """Add a request; its id (or the validation error) resolves ``accepted``, its outputs go to ``stream``."""

    prompt: Prompt
    params: SamplingParams | None
    request_id: str | None
    loop: asyncio.AbstractEventLoop
    stream: asyncio.Queue
    accepted: asyncio.Future


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Stop:
    """Wake the loop so it sees the stop flag (it may be waiting for a command)."""


Command = Submit | Abort | Stop


class AsyncEngine:
    """Runs an Engine's step loop on a background thread; one AsyncEngine per engine."""

    replicas = 1  # engines behind this interface (distributed.serve's RemoteEngine has several)

    def __init__(self, engine: Engine) -> None:
        if getattr(engine, "driven_by", None) is not None:
            raise RuntimeError("this engine already has an AsyncEngine stepping it; one per engine")
        engine.driven_by = self
        self.engine = engine
        self.stats: EngineStats = engine.stats()  # replaced (never mutated) after every step
        self._commands: queue.Queue[Command] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._loop, name="qwen2audio-engine", daemon=True)
        self._stopped = threading.Event()
        self.error: BaseException | None = None
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def check(self, prompt: Prompt, params: SamplingParams) -> None:
        """Raise what submitting this pair would (validation only: safe from any thread)."""
        self.engine.check(prompt, params)

    @property
    def adapters(self) -> list[Loaded]:
        return self.engine.adapters

    async def load_adapter(self, path: str, name: str) -> Loaded:
        """Load a LoRA adapter into a free slot while the engine keeps stepping (the slots are
        locked; reading the files happens off the event loop)."""
        lora = self.engine.runner.lora
        if lora is None:
            raise AdapterError("this engine has no adapter slots: start the server with --enable-lora "
                               "(or --lora-modules)")
        return await asyncio.to_thread(lora.load, path, name)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the loop early (or cancellation) aborts it."""
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        accepted: asyncio.Future = loop.create_future()
        self._commands.put(Submit(prompt, params, request_id, loop, stream, accepted))
        try:
            request_id = await accepted  # raises the engine's validation error, if any
        except asyncio.CancelledError:  # left while the engine thread was busy: see _accept
            if accepted.done() and not accepted.cancelled() and accepted.exception() is None:
                self.abort(accepted.result())
            raise
        finished = False
        try:
            while not finished:
                output = await stream.get()
                if isinstance(output, BaseException):
                    raise output
                finished = output.finished
                yield output
        finally:
            if not finished:
                self._commands.put(Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(Abort(request_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._commands.put(Stop())
        self._thread.join(timeout)
        self.engine.driven_by = None

    def _loop(self) -> None:
        try:
            untrimmed = False  # steps ran since the heap was last trimmed
            while not self._stopped.is_set():
                commanded = self._drain(block=not self.engine.has_unfinished)
                if self.engine.has_unfinished:
                    with torch.inference_mode():
                        outputs = self.engine.step()
                    for output in outputs:
                        self._deliver(output.request_id, output, final=output.finished)
                    untrimmed = True
                elif untrimmed and not commanded:  # idle for a whole wait
                    heap.release()  # idle for a whole wait: see heap.release
                    untrimmed = False
                self.stats = self.engine.stats()
            self._drain(block=False)  # aborts sent before the stop still free their requests
        except BaseException as exc:  # reported to every waiting stream, then re-raised
            self.error = exc
            logger.exception("engine loop died")
            for request_id in list(self._streams):
                self._deliver(request_id, RuntimeError(f"engine failed: {exc}"), final=True)
            raise

    def _drain(self, block: bool) -> bool:
        """Apply the queued commands (waiting up to IDLE_WAIT_S for one if ``block``); False if none came."""
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: Command) -> None:
        match command:
            case Submit():
                self._submit(command)
            case Abort(request_id):
                self.engine.abort(request_id)
                self._streams.pop(request_id, None)
            case Stop():
                pass  # the loop checks the stop flag next
            case _:
                raise TypeError(f"unknown engine command {command!r}")

    def _submit(self, command: Submit) -> None:
        try:
            request_id = self.engine.add_request(command.prompt, command.params, command.request_id)
        except Exception as exc:  # validation errors go back to the caller
            command.loop.call_soon_threadsafe(self._accept, command.accepted, None, exc)
            return
        self._streams[request_id] = (command.loop, command.stream)
        command.loop.call_soon_threadsafe(self._accept, command.accepted, request_id, None)

    def _accept(self, accepted: asyncio.Future, request_id: str | None, error: BaseException | None) -> None:
        """On the caller's loop: the request's id (or its validation error) to the waiting caller. A
        caller that was cancelled meanwhile never sees it, so its request is aborted here, or it would
        run to max_new_tokens with nobody reading (a server's client that left while a step ran)."""
        if accepted.cancelled():
            if request_id is not None:
                self.abort(request_id)
        elif error is not None:
            accepted.set_exception(error)
        else:
            accepted.set_result(request_id)

    def _deliver(self, request_id: str, item: Any, final: bool) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        if final:
            self._streams.pop(request_id, None)
        loop, stream = target
        loop.call_soon_threadsafe(stream.put_nowait, item)
