"""The FastAPI app: OpenAI-shaped routes over one AsyncEngine, with limits, auth and metrics.

Owns HTTP concerns only (parsing, admission, the model name, disconnects); requests become engine
requests through the Processor and the media policy, nothing deeper. Anything slow or unbounded
(parsing a large body, decoding audio, rendering and tokenizing a prompt) runs off the event loop,
after the size checks that make it cheap to refuse, so /health always answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError

from qwen2audio.api import Qwen2Audio
from qwen2audio.audio.io import load_audio
from qwen2audio.config import SAMPLE_RATE
from qwen2audio.engine.async_engine import AsyncEngine
from qwen2audio.engine.request import Prompt, RequestOutput, SamplingParams
from qwen2audio.hub import resolve_adapter
from qwen2audio.server import jsonbody, responses
from qwen2audio.server.errors import HANDLERS, APIError
from qwen2audio.server.media import MediaPolicy, count_audio_parts, resolve_messages
from qwen2audio.server.metrics import Metrics
from qwen2audio.server.middleware import BodyLimit, Gate
from qwen2audio.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from qwen2audio.transcribe import WINDOW_TOKENS, Transcriber

logger = logging.getLogger(__name__)
STATIC = pathlib.Path(__file__).parent / "static"  # the voice-chat page: plain HTML/CSS/JS, no build step
OFF_LOOP_BYTES = 256 * 1024  # bodies larger than this are validated off the event loop...
CHILD_PARSE_BYTES = 4 * 2**20  # ... and larger than this, parsed in a child interpreter (see jsonbody)


@dataclass
class ServerOptions:
    served_model_name: str | Sequence[str] = "qwen2-audio"  # one name, or several (the first is reported)
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_body_bytes: int = 25 * 1024 * 1024
    max_pending: int = 256  # requests admitted but not finished; more get 429
    max_audios: int | None = None  # audio clips one prompt may hold (vLLM's --limit-mm-per-prompt)
    log_requests: bool = True

    @property
    def names(self) -> list[str]:
        name = self.served_model_name
        return [name] if isinstance(name, str) else list(name)


class Server:
    """State shared by the routes (``app.state.server``): the engine, options, metrics and the
    admission counter."""

    def __init__(self, model: Qwen2Audio, options: ServerOptions, engine: Any = None) -> None:
        self.model = model
        self.options = options
        self.engine = engine or AsyncEngine(model.engine)  # or engines elsewhere (distributed.serve)
        self.max_model_len = self.engine.max_context
        self.metrics = Metrics(lambda: self.engine.stats, lambda: self.engine.replicas)
        self.pending = 0
        self.child_parses = asyncio.Semaphore(2)  # bounds the memory and cores huge bodies take

    def check_capacity(self, count: int) -> None:
        if self.pending + count > self.options.max_pending:
            raise APIError(429, "the server is at capacity; retry later", "rate_limit_error", code="queue_full")

    @contextlib.contextmanager
    def holding(self, count: int) -> Iterator[None]:
        """Count ``count`` requests as pending while the block runs, however it ends."""
        self.pending += count
        try:
            yield
        finally:
            self.pending -= count

    @contextlib.contextmanager
    def admitted(self, count: int) -> Iterator[None]:
        self.check_capacity(count)
        with self.holding(count):
            yield

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model); an unknown name is a 404."""
        if not name or name in self.options.names:
            return None
        adapters = [loaded.name for loaded in self.engine.adapters]
        if name in adapters:
            return name
        served = ", ".join(repr(n) for n in [*self.options.names, *adapters])
        raise APIError(404, f"The model `{name}` does not exist or you do not have access to it (this server "
                            f"serves {served})", param="model", code="model_not_found")

    async def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """An engine request's outputs, counted in the metrics; a failed generation is a 500."""
        started = time.perf_counter()
        first = True
        try:
            async for output in self.engine.generate(prompt, params):
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - started)
                    first = False
                if output.error:
                    raise APIError(500, f"generation failed: {output.error}", "server_error")
                if output.finished:
                    self.metrics.prompt_tokens.inc(output.prompt_tokens)
                    self.metrics.generation_tokens.inc(output.completion_tokens)
                yield output
        finally:
            self.metrics.latency.observe(time.perf_counter() - started)


def create_app(model: Qwen2Audio, options: ServerOptions | None = None, engine: Any = None) -> FastAPI:
    """The app; its Server (and the engine thread) starts with the app's lifespan and stops with it.

    ``engine``: what generates instead of an AsyncEngine over ``model.engine`` (the same interface:
    generate, check, max_context, stats, alive, shutdown); ``model`` then needs only its processor
    and config, as :mod:`qwen2audio.distributed.serve`'s front has them."""
    options = options or ServerOptions()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.server = Server(model, options, engine)
        # What is alive now (model, libraries) lives as long as the server: frozen, a full collection
        # skips it instead of stalling the event loop (about 145 ms for the tiny model's process).
        gc.collect()
        gc.freeze()
        yield
        gc.unfreeze()
        app.state.server.engine.shutdown()

    app = FastAPI(title="qwen2audio", lifespan=lifespan)
    app.state.options = options
    app.add_middleware(Gate, api_key=options.api_key, counter=lambda: _counter(app))
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)
    return app


def _counter(app: FastAPI) -> Any:
    server = getattr(app.state, "server", None)
    return server.metrics.count if server is not None else None


def _server(request: Request) -> Server:
    return request.app.state.server


router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return FileResponse(STATIC / "index.html")


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


@router.get("/health")
async def health(request: Request) -> Response:
    """200 once the engine runs; 503 before that and after it died."""
    server = getattr(request.app.state, "server", None)
    alive = server is not None and server.engine.alive
    return JSONResponse({"status": "ok" if alive else "unavailable"}, status_code=200 if alive else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return PlainTextResponse(_server(request).metrics.exposition(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    server = _server(request)
    created = int(time.time())
    cards = [(name, name, None) for name in server.options.names]
    cards += [(loaded.name, loaded.path, server.options.names[0]) for loaded in server.engine.adapters]
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "qwen2audio", "root": root, "parent": parent,
         "max_model_len": server.max_model_len} for name, root, parent in cards]}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> Response:
    """vLLM's route: {"lora_name": ..., "lora_path": ...} loads an adapter while serving."""
    server = _server(request)
    body = await _parse(request, LoadLoraRequest)
    if body.lora_name in server.options.names:
        raise APIError(400, f"the adapter name {body.lora_name!r} is the base model's", param="lora_name")
    directory = await asyncio.to_thread(resolve_adapter, body.lora_path)
    await server.engine.load_adapter(str(directory), body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> Response:
    """vLLM's route: {"lora_name": ...}; requests running on the adapter finish with it."""
    server = _server(request)
    body = await _parse(request, UnloadLoraRequest)
    server.engine.unload_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    server = _server(request)
    body = await _parse(request, ChatCompletionRequest)
    adapter = server.check_model(body.model)
    messages = [m.model_dump() for m in body.messages]
    for message in messages:
        if message["role"] == "developer":
            message["role"] = "system"
    _check_audio_count(server, count_audio_parts(messages))
    resolved = await asyncio.to_thread(resolve_messages, messages, server.options.media)
    prompt = replace(await asyncio.to_thread(server.model.processor.prepare, resolved), adapter=adapter)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    choices = [responses.Choice(k, prompt, _params(server, body, prompt, logprobs, k)) for k in range(body.n)]
    return await _respond(server, request, body, choices, prompt.num_tokens, chat=True)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    server = _server(request)
    body = await _parse(request, CompletionRequest)
    adapter = server.check_model(body.model)
    _check_audio_count(server, len(body.audio))
    prompts = [(replace(prompt, adapter=adapter), echo) for prompt, echo in await _completion_prompts(server, body)]
    choices = [responses.Choice(p * body.n + k, prompt, _params(server, body, prompt, body.logprobs, k), echo)
               for p, (prompt, echo) in enumerate(prompts) for k in range(body.n)]
    total = sum(prompt.num_tokens for prompt, _ in prompts)
    return await _respond(server, request, body, choices, total, chat=False)


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> Response:
    return await _transcription(request, "transcribe")


@router.post("/v1/audio/translations")
async def translations(request: Request) -> Response:
    return await _transcription(request, "translate")


# -- parsing --------------------------------------------------------------------------------------


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    """A JSON body (Content-Type application/json, as vLLM requires) validated against ``schema``;
    large bodies are parsed off the event loop, and bodies shaped past jsonbody's limits are refused."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise APIError(400, f"Unsupported Media Type {media_type or '(none)'!r}: only 'application/json' is allowed")
    chunks = [chunk async for chunk in request.stream()]
    size = sum(map(len, chunks))
    try:
        if size > CHILD_PARSE_BYTES:
            async with _server(request).child_parses:
                data = await jsonbody.parse_in_child(chunks)
        elif size > OFF_LOOP_BYTES:
            data = await asyncio.to_thread(jsonbody.parse, b"".join(chunks))
        else:
            data = jsonbody.parse(b"".join(chunks))
    except jsonbody.BodyError as exc:
        raise APIError(400, str(exc)) from None
    return await asyncio.to_thread(_validated, data, schema) if size > OFF_LOOP_BYTES else _validated(data, schema)


def _validated(data: Any, schema: type[BaseModel]) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"]) or None
        message = str(error["msg"]).removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}" if param else message, param=param) from None


def _check_audio_count(server: Server, count: int) -> None:
    limit = server.options.max_audios
    if limit is not None and count > limit:
        raise APIError(400, f"the prompt holds {count} audio clips; this server takes at most {limit} "
                            f"(--limit-mm-per-prompt)", param="messages")


def _params(server: Server, body: Any, prompt: Prompt, logprobs: int | None, choice: int) -> SamplingParams:
    """One choice's sampling parameters (a bad value is a 400 here, once). A requested length that
    does not fit the context after the prompt is refused, naming both numbers, as OpenAI does."""
    limit = body.limit
    context = server.max_model_len
    if limit is not None and prompt.num_tokens + limit > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt.num_tokens + limit} tokens ({prompt.num_tokens} in the prompt, {limit} in the "
                            f"completion). Please reduce the length of the prompt or of max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    seed = None if body.seed is None else body.seed + choice
    params = SamplingParams(max_new_tokens=limit, min_new_tokens=body.min_tokens, temperature=body.temperature,
                            top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                            presence_penalty=body.presence_penalty or 0.0,
                            frequency_penalty=body.frequency_penalty or 0.0,
                            logit_bias=body.biases, seed=seed, stop=body.stops, logprobs=logprobs)
    server.engine.check(prompt, params)  # refused now: a stream's 400 needs the status line
    return params


async def _completion_prompts(server: Server, body: CompletionRequest) -> list[tuple[Prompt, str]]:
    """Each prompt prepared (text through the processor, token ids as given), with its echo text."""
    processor = server.model.processor
    sources = [{"type": "audio_url", "audio_url": {"url": a}} for a in body.audio]
    resolved = await asyncio.to_thread(_resolve_sources, sources, server.options.media)
    texts = [p for p in body.prompts if isinstance(p, str)]
    if resolved and len(texts) != len(body.prompts):
        raise APIError(400, "audio goes with text prompts (their <|AUDIO|> placeholders), not token ids",
                       param="audio")
    prepared = iter(await asyncio.to_thread(processor.prepare_many, texts, resolved) if texts else [])
    prompts = []
    for item in body.prompts:
        if isinstance(item, str):
            prompts.append((next(prepared), item if body.echo else ""))
        else:
            prompt = _token_prompt(server, item)
            prompts.append((prompt, processor.tokenizer.decode(item, skip_special_tokens=False) if body.echo else ""))
    return prompts


def _token_prompt(server: Server, ids: list[int]) -> Prompt:
    vocab = server.model.config.text.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    if server.model.config.audio_token_id in ids:
        raise APIError(400, "a token-id prompt cannot hold the <|AUDIO|> placeholder (send text with audio)",
                       param="prompt")
    if len(ids) >= server.max_model_len:
        raise APIError(400, f"the prompt is {len(ids)} tokens; the model's context is {server.max_model_len}",
                       param="prompt")
    return Prompt(list(ids), [], [], [], [])


def _resolve_sources(parts: list[dict[str, Any]], policy: MediaPolicy) -> list[Any]:
    if not parts:
        return []
    messages = resolve_messages([{"role": "user", "content": parts}], policy)
    return [part["audio"] for part in messages[0]["content"]]


# -- answering ------------------------------------------------------------------------------------


async def _respond(server: Server, request: Request, body: Any, choices: list[responses.Choice], prompt_tokens: int,
                   chat: bool) -> Response:
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    reply = responses.Reply(ident, server.options.names[0], chat, choices, prompt_tokens,
                            logprobs=(body.logprobs is not None) if not chat else body.logprobs,
                            include_usage=bool(body.stream_options and body.stream_options.include_usage))
    if server.options.log_requests:
        logger.info("%s: %d prompt tokens, %d choice(s), max_tokens %s, stream %s", ident, prompt_tokens,
                    len(choices), body.limit, body.stream)
    tokenizer = server.model.processor.tokenizer
    if body.stream:
        server.check_capacity(len(choices))  # refused here: a 429 needs the status line
        return StreamingResponse(_held(server, len(choices), responses.events(reply, server.stream, tokenizer)),
                                 media_type="text/event-stream")
    with server.admitted(len(choices)):
        work = asyncio.gather(*(responses.generate(server.stream, choice) for choice in choices))
        try:
            results = await responses.until_disconnected(request, work)
        except APIError as exc:
            if exc.status == 499:
                server.metrics.aborted.inc()
            raise
    return JSONResponse(responses.body(reply, results, tokenizer))


async def _held(server: Server, count: int, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream counted as pending while it runs (a client gone before the first event leaves no count)."""
    finished = False
    with server.holding(count):
        try:
            async for event in events:
                yield event
            finished = True
        finally:
            if not finished:
                server.metrics.aborted.inc()
            await events.aclose()


async def _transcription(request: Request, task: str) -> Response:
    """Whisper's routes, through the same driver as `qwen2audio transcribe` (Transcriber.run)."""
    server = _server(request)
    form = await request.form()
    adapter = server.check_model(str(form.get("model") or "") or None)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "the multipart field 'file' (the audio) is required", param="file")
    data = await upload.read()
    fmt = str(form.get("response_format") or "json")
    if fmt not in ("json", "text", "srt", "vtt", "verbose_json"):
        raise APIError(400, f"response_format {fmt!r} is not one of json, text, srt, vtt, verbose_json",
                       param="response_format")
    language = form.get("language") or None
    granularities = set(form.getlist("timestamp_granularities[]")) | set(form.getlist("timestamp_granularities"))
    if granularities - {"segment"}:
        raise APIError(400, f"timestamp_granularities {sorted(granularities - {'segment'})} not supported: only "
                            f"'segment' (no word aligner runs offline here)", param="timestamp_granularities")
    if granularities and fmt != "verbose_json":
        raise APIError(400, "timestamp_granularities needs response_format verbose_json",
                       param="timestamp_granularities")
    transcriber = Transcriber(server.model, language=language if task == "transcribe" else None, task=task,
                              max_new_tokens=_form_int(form, "max_completion_tokens", WINDOW_TOKENS),
                              segmentation=str(form.get("segmentation") or server.model.processor.segmentation),
                              temperature=_form_float(form, "temperature", 0.0), details=fmt == "verbose_json",
                              context=str(form.get("prompt") or "") or None, adapter=adapter)
    samples = await asyncio.to_thread(load_audio, data)
    transcript, prompts = await asyncio.to_thread(transcriber.plan, samples, upload.filename or "audio")
    if _form_bool(form, "stream", False):
        server.check_capacity(len(prompts))
        usage = _form_bool(form, "stream_options[include_usage]", True)  # OpenAI's done event carries it
        events = _transcript_events(transcriber, transcript, prompts, server.stream, usage)
        return StreamingResponse(_held(server, len(prompts), events), media_type="text/event-stream")
    with server.admitted(len(prompts)):
        await responses.until_disconnected(request, transcriber.run(transcript, prompts, server.stream))
    duration = len(samples) / SAMPLE_RATE
    if fmt == "json":
        return JSONResponse({"text": transcript.text, "usage": _transcription_usage(prompts, transcript)})
    if fmt == "text":
        return PlainTextResponse(transcript.text)
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(transcript.render(fmt))
    return JSONResponse({"task": task, "language": language or "unknown", "duration": duration,
                         "text": transcript.text, "segments": [s.openai(i) for i, s in enumerate(transcript.segments)],
                         "usage": {"type": "duration", "seconds": duration}})


async def _transcript_events(transcriber: Transcriber, transcript: Any, prompts: Sequence[Prompt],
                             generate: Any, usage: bool) -> AsyncIterator[str]:
    """OpenAI's streamed transcription: a transcript.text.delta per window as windows finish, in
    order, then transcript.text.done with the whole text and (unless asked not to) the token usage."""
    async for delta in transcriber.stream(transcript, prompts, generate):
        yield f"data: {json.dumps({'type': 'transcript.text.delta', 'delta': delta}, ensure_ascii=False)}\n\n"
    done = {"type": "transcript.text.done", "text": transcript.text}
    if usage:
        done["usage"] = _transcription_usage(prompts, transcript)
    yield f"data: {json.dumps(done, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def _transcription_usage(prompts: Sequence[Prompt], transcript: Any) -> dict[str, Any]:
    """OpenAI's token usage of a transcription: every window's prompt (audio and text) and reply."""
    audio = sum(sum(prompt.lengths) for prompt in prompts)
    text = sum(prompt.num_tokens for prompt in prompts) - audio
    output = sum(len(segment.tokens) for segment in transcript.segments)
    return {"type": "tokens", "input_tokens": audio + text, "output_tokens": output,
            "total_tokens": audio + text + output, "input_token_details": {"audio_tokens": audio, "text_tokens": text}}


def _form_float(form: Any, name: str, default: float) -> float:
    """A number form field (absent: ``default``); the range is the consumer's to check."""
    value = form.get(name)
    if value is None or value == "":
        return default
    try:
        return float(str(value))
    except ValueError:
        raise APIError(400, f"{name} must be a number, not {str(value)[:40]!r}", param=name) from None


def _form_bool(form: Any, name: str, default: bool) -> bool:
    """A true/false form field (absent: ``default``), as the openai SDK writes booleans."""
    value = str(form.get(name) or "").strip().lower()
    if not value:
        return default
    if value not in ("true", "false"):
        raise APIError(400, f"{name} must be true or false, not {value[:40]!r}", param=name)
    return value == "true"


def _form_int(form: Any, name: str, default: int) -> int:
    """A positive integer form field (absent: ``default``)."""
    value = form.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number < 1:
        raise APIError(400, f"{name} must be a positive integer, not {str(value)[:40]!r}", param=name)
    return number
