"""OpenAI response bodies for generations: chat and text completions, whole or as server-sent events.

Owns turning engine outputs into choices, usage and logprobs as the OpenAI API reference defines
them: choice ``index`` = prompt index * n + choice, usage counted once per prompt, a logprob's
``bytes`` the token's own bytes (a token inside a multi-byte character is named ``bytes:\\xNN``),
and a client that leaves aborting everything it asked for.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from qwen2audio.engine.request import Prompt, RequestOutput, SamplingParams
from qwen2audio.server.errors import APIError
from qwen2audio.server.protocol import error_body
from qwen2audio.text.tokenizer import Tokenizer

Stream = Callable[[Prompt, SamplingParams], AsyncIterator[RequestOutput]]


@dataclass(frozen=True)
class Choice:
    """One generation of a response: its choice index, prompt, parameters and echoed text."""

    index: int
    prompt: Prompt
    params: SamplingParams
    echo: str = ""


@dataclass(frozen=True)
class Reply:
    """What a request asked for: its choices, and how to present them."""

    ident: str
    model: str
    chat: bool
    choices: list[Choice]
    prompt_tokens: int  # counted once per prompt, whatever n is
    logprobs: bool
    include_usage: bool = False

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


@dataclass
class Generated:
    text: str
    last: RequestOutput
    logprobs: list[dict[str, Any]]


async def generate(stream: Stream, choice: Choice) -> Generated:
    parts, logprobs, last = [], [], None
    async for output in stream(choice.prompt, choice.params):
        parts.append(output.delta)
        logprobs.extend(output.logprobs)
        last = output
    return Generated("".join(parts), last, logprobs)


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client goes away first, cancel it (which aborts its engine requests).
    The disconnect is an ASGI message, so it is seen at once rather than at the next poll."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise APIError(499, "client disconnected", code="client_closed_request")
    finally:
        watcher.cancel()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def body(reply: Reply, results: Sequence[Generated], tokenizer: Tokenizer) -> dict[str, Any]:
    """The whole (non-streamed) response."""
    choices = []
    for choice, result in zip(reply.choices, results, strict=True):
        entry: dict[str, Any] = {"index": choice.index, "finish_reason": result.last.finish_reason,
                                 "logprobs": format_logprobs(tokenizer, result.logprobs, reply.chat)
                                 if reply.logprobs else None}
        if reply.chat:
            entry["message"] = {"role": "assistant", "content": result.text}
        else:
            entry["text"] = choice.echo + result.text
        choices.append(entry)
    completion = sum(result.last.completion_tokens for result in results)
    return {"id": reply.ident, "object": reply.kind, "created": int(time.time()), "model": reply.model,
            "choices": choices, "usage": usage(reply.prompt_tokens, completion)}


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def events(reply: Reply, stream: Stream, tokenizer: Tokenizer) -> AsyncIterator[str]:
    """OpenAI's server-sent events; the caller leaving early (a disconnect) cancels every choice's
    stream, aborting its engine request. Errors after the status line go out as an error event."""
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], counted: dict[str, int] | None = None) -> str:
        payload = {"id": reply.ident, "object": f"{reply.kind}.chunk" if reply.chat else reply.kind,
                   "created": created, "model": reply.model, "choices": choices}
        if counted is not None:
            payload["usage"] = counted
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(stream, choice, queue)) for choice in reply.choices]
    try:
        for choice in reply.choices:  # the opening chunk: the role, or the echoed prompt
            opening = {"role": "assistant", "content": ""} if reply.chat else None
            if reply.chat or choice.echo:
                yield chunk([_delta(reply, choice.index, choice.echo if opening is None else opening, None, None)])
        completion, offsets = 0, {c.index: TextOffsets() for c in reply.choices}
        for _ in range(len(reply.choices)):
            async for item in _drain(queue):
                if isinstance(item, str):
                    yield item
                    continue
                choice, output = item
                logprobs = format_logprobs(tokenizer, output.logprobs, reply.chat, offsets[choice.index]) \
                    if reply.logprobs else None
                if output.delta or output.finished or logprobs:  # a byte token's logprob comes before its text
                    content = {"content": output.delta} if reply.chat else output.delta
                    yield chunk([_delta(reply, choice.index, content, logprobs,
                                        output.finish_reason if output.finished else None)])
                completion += output.completion_tokens if output.finished else 0
        if reply.include_usage:
            yield chunk([], usage(reply.prompt_tokens, completion))
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()


def _delta(reply: Reply, index: int, content: Any, logprobs: Any, finish: str | None) -> dict[str, Any]:
    key = "delta" if reply.chat else "text"
    return {"index": index, key: content, "logprobs": logprobs, "finish_reason": finish}


async def _pump(stream: Stream, choice: Choice, queue: asyncio.Queue) -> None:
    try:
        async for output in stream(choice.prompt, choice.params):
            await queue.put((choice, output))
            if output.finished:
                return
    except Exception as exc:  # reported in the stream: the status line has already gone out
        message = exc.message if isinstance(exc, APIError) else str(exc)
        await queue.put(f"data: {json.dumps(error_body(message, 'server_error'))}\n\n")
    await queue.put(None)  # this choice ended without a finished output (an error)


async def _drain(queue: asyncio.Queue) -> AsyncIterator[Any]:
    """Items until one choice ends: its finished output (yielded) or its end marker."""
    while True:
        item = await queue.get()
        if item is None:
            return
        yield item
        if not isinstance(item, str) and item[1].finished:
            return


# -- logprobs -------------------------------------------------------------------------------------


def token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token as text and as its raw bytes. A token that is not whole UTF-8 (part of a multi-byte
    character) is named ``bytes:\\xe4\\xbd``, as OpenAI names them, so two such alternatives never
    collide; joining the bytes of a reply's tokens rebuilds its text."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


class TextOffsets:
    """Each token's character offset in the reply: the characters a UTF-8 decoder has emitted from
    the tokens before it. A token inside a multi-byte character points at that character; a stray
    byte counts as the one U+FFFD the text shows for it; special tokens, left out of the text, count
    for nothing."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def next(self, raw: Sequence[int]) -> int:
        """The offset of the token whose bytes are ``raw``; then move past it."""
        offset = self._chars
        self._chars += len(self._decoder.decode(bytes(raw)))
        return offset


def format_logprobs(tokenizer: Tokenizer, entries: list[dict[str, Any]], chat: bool,
                    offsets: TextOffsets | None = None) -> dict[str, Any]:
    """Chat: ``content`` entries with their top alternatives; completions: the legacy parallel lists
    (tokens, token_logprobs, top_logprobs, and text_offset, continuing ``offsets`` across a stream's
    chunks)."""
    if chat:
        return {"content": [_chat_entry(tokenizer, e) for e in entries]}
    offsets = offsets or TextOffsets()
    tokens, positions = [], []
    for entry in entries:
        name, raw = token_text(tokenizer, entry["token_id"])
        tokens.append(name)
        positions.append(offsets.next(raw if entry["token_id"] not in tokenizer.special_ids else []))
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [_legacy_top(tokenizer, e) for e in entries], "text_offset": positions}


def _legacy_top(tokenizer: Tokenizer, entry: dict[str, Any]) -> dict[str, float]:
    """The most likely tokens and, as OpenAI's completions always add it, the sampled one (so up to
    logprobs + 1 entries)."""
    top = dict(entry["top"])
    top.setdefault(entry["token_id"], entry["logprob"])
    return {token_text(tokenizer, t)[0]: lp for t, lp in top.items()}


def _chat_entry(tokenizer: Tokenizer, entry: dict[str, Any]) -> dict[str, Any]:
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        name, raw = token_text(tokenizer, token_id)
        return {"token": name, "logprob": logprob, "bytes": raw}

    return {**one(entry["token_id"], entry["logprob"]), "top_logprobs": [one(t, lp) for t, lp in entry["top"]]}
