"""The FastAPI app: OpenAI-shaped routes over one AsyncEngine, with limits, auth and metrics.

Owns HTTP concerns only (parsing, errors in OpenAI's shape, streaming, disconnects, limits);
requests become engine requests through the Processor and the media policy, nothing deeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from qwen2audio.api import Qwen2Audio
from qwen2audio.audio.io import load_audio
from qwen2audio.config import SAMPLE_RATE
from qwen2audio.engine.async_engine import AsyncEngine
from qwen2audio.engine.request import Prompt, RequestOutput, SamplingParams
from qwen2audio.engine.scheduler import EngineStats
from qwen2audio.errors import InputError
from qwen2audio.server.media import MediaPolicy, resolve_messages
from qwen2audio.server.protocol import ChatCompletionRequest, CompletionRequest, error_body
from qwen2audio.transcribe import WINDOW_TOKENS, Transcriber

logger = logging.getLogger(__name__)
STATIC = pathlib.Path(__file__).parent / "static"  # the voice-chat page: plain HTML/CSS/JS, no build step


@dataclass
class ServerOptions:
    served_model_name: str = "qwen2-audio"
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_body_bytes: int = 25 * 1024 * 1024
    max_pending: int = 256  # requests admitted but not finished; more get 429


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


class Metrics:
    """Prometheus series of one server; the queue and KV gauges read the engine thread's latest
    published snapshot (never the scheduler's live state from another thread)."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwen2audio_requests", "finished HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("qwen2audio_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("qwen2audio_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("qwen2audio_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram("qwen2audio_request_latency_seconds", "request latency", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        Gauge("qwen2audio_requests_waiting", "requests waiting", registry=r).set_function(lambda: stats().waiting)
        Gauge("qwen2audio_requests_running", "requests running", registry=r).set_function(lambda: stats().running)
        Gauge("qwen2audio_kv_cache_usage", "fraction of KV blocks in use", registry=r).set_function(
            lambda: stats().kv_usage)


class Server:
    """State shared by the routes (``app.state.server``): the engine, options, metrics and the
    admission counter."""

    def __init__(self, model: Qwen2Audio, options: ServerOptions) -> None:
        self.model = model
        self.options = options
        self.engine = AsyncEngine(model.engine)
        self.metrics = Metrics(lambda: self.engine.stats)
        self.pending = 0

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


def create_app(model: Qwen2Audio, options: ServerOptions | None = None) -> FastAPI:
    """The app; its Server (and the engine thread) starts with the app's lifespan and stops with it."""
    options = options or ServerOptions()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.server = Server(model, options)
        yield
        app.state.server.engine.shutdown()

    app = FastAPI(title="qwen2audio", lifespan=lifespan)
    app.state.options = options
    app.add_middleware(_BodyLimit, max_bytes=options.max_body_bytes)
    app.middleware("http")(_auth_and_count)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(InputError, _input_error)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)
    return app


def _server(request: Request) -> Server:
    return request.app.state.server


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status)


async def _input_error(_: Request, exc: InputError) -> JSONResponse:
    return JSONResponse(error_body(str(exc)), status_code=400)


async def _auth_and_count(request: Request, call_next: Callable) -> Response:
    options: ServerOptions = request.app.state.options
    if options.api_key and request.url.path.startswith("/v1/"):
        if request.headers.get("authorization") != f"Bearer {options.api_key}":
            return JSONResponse(error_body("invalid or missing API key", "authentication_error",
                                           code="invalid_api_key"), status_code=401)
    response = await call_next(request)
    server = getattr(request.app.state, "server", None)
    if server is not None:
        server.metrics.requests.labels(request.url.path, str(response.status_code)).inc()
    return response


router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return FileResponse(STATIC / "index.html")


@router.get("/health")
async def health(request: Request) -> Response:
    server = getattr(request.app.state, "server", None)
    alive = server is not None and server.engine.alive
    return JSONResponse({"status": "ok" if alive else "dead"}, status_code=200 if alive else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return PlainTextResponse(generate_latest(_server(request).metrics.registry).decode(),
                             media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    name = _server(request).options.served_model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                        "owned_by": "qwen2audio"}]}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    server = _server(request)
    body = _validate(ChatCompletionRequest, await _json(request))
    _check_model(body.model, server.options)
    messages = [m.model_dump() for m in body.messages]
    for message in messages:
        if message["role"] == "developer":
            message["role"] = "system"
    resolved = await asyncio.to_thread(resolve_messages, messages, server.options.media)
    prompt = await asyncio.to_thread(server.model.processor.prepare, resolved)
    limit = body.max_completion_tokens or body.max_tokens
    top = body.top_logprobs if body.logprobs else None
    logprobs = (top or 0) if body.logprobs else None
    return await _respond(server, request, prompt, body, limit, logprobs, chat=True)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    server = _server(request)
    body = _validate(CompletionRequest, await _json(request))
    _check_model(body.model, server.options)
    sources = [{"type": "audio_url", "audio_url": {"url": a}} for a in body.audio]
    resolved = await asyncio.to_thread(_resolve_sources, sources, server.options.media)
    prompt = (await asyncio.to_thread(server.model.processor.prepare_many, [body.prompt], resolved))[0]
    return await _respond(server, request, prompt, body, body.max_tokens, body.logprobs, chat=False)


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> Response:
    return await _transcription(request, "transcribe")


@router.post("/v1/audio/translations")
async def translations(request: Request) -> Response:
    return await _transcription(request, "translate")


async def _transcription(request: Request, task: str) -> Response:
    """Whisper's routes, through the same driver as `qwen2audio transcribe` (Transcriber.run)."""
    server = _server(request)
    form = await request.form()
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "the multipart field 'file' (the audio) is required", param="file")
    data = await upload.read()
    fmt = str(form.get("response_format") or "json")
    if fmt not in ("json", "text", "srt", "vtt", "verbose_json"):
        raise APIError(400, f"response_format {fmt!r} is not one of json, text, srt, vtt, verbose_json",
                       param="response_format")
    language = form.get("language") or None
    transcriber = Transcriber(server.model, language=language if task == "transcribe" else None, task=task,
                              max_new_tokens=_form_int(form, "max_completion_tokens", WINDOW_TOKENS))
    samples = await asyncio.to_thread(load_audio, data)
    transcript, prompts = await asyncio.to_thread(transcriber.plan, samples, upload.filename or "audio")
    with server.admitted(len(prompts)):
        await transcriber.run(transcript, prompts, server.stream)
    if fmt == "json":
        return JSONResponse({"text": transcript.text})
    if fmt == "text":
        return PlainTextResponse(transcript.text)
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(transcript.render(fmt))
    return JSONResponse({"task": task, "language": language or "unknown", "duration": len(samples) / SAMPLE_RATE,
                         "text": transcript.text,
                         "segments": [{"id": i, "start": s.start, "end": s.end, "text": s.text}
                                      for i, s in enumerate(transcript.segments)]})


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


def _resolve_sources(parts: list[dict[str, Any]], policy: MediaPolicy) -> list[Any]:
    if not parts:
        return []
    messages = resolve_messages([{"role": "user", "content": parts}], policy)
    return [part["audio"] for part in messages[0]["content"]]


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None


def _validate(schema: type, body: Any) -> Any:
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"])
        raise APIError(400, f"{param}: {error['msg']}", param=param) from None


def _check_model(name: str | None, options: ServerOptions) -> None:
    if name and name != options.served_model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {options.served_model_name!r}",
                       param="model", code="model_not_found")


def _params(body: Any, max_tokens: int | None, logprobs: int | None, choice: int) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    seed = None if body.seed is None else body.seed + choice
    return SamplingParams(max_new_tokens=max_tokens, min_new_tokens=body.min_tokens, temperature=body.temperature,
                          top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                          seed=seed, stop=stop, logprobs=logprobs)


async def _collect(srv: Server, prompt: Prompt, params: SamplingParams) -> tuple[str, RequestOutput, list]:
    parts, logprobs, last = [], [], None
    async for output in srv.stream(prompt, params):
        parts.append(output.delta)
        logprobs.extend(output.logprobs)
        last = output
    return "".join(parts), last, logprobs


async def _respond(srv: Server, request: Request, prompt: Prompt, body: Any, max_tokens: int | None,
                   logprobs: int | None, chat: bool) -> Response:
    params = [_params(body, max_tokens, logprobs, k) for k in range(body.n)]  # a bad value is a 400 here
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if body.stream:
        # Refused here (a 429 needs the status line); counted by the stream itself while it runs,
        # so a client gone before the first event leaves no count behind.
        srv.check_capacity(body.n)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        generator = _sse(srv, prompt, params, ident, chat, include_usage)
        return StreamingResponse(generator, media_type="text/event-stream")
    with srv.admitted(body.n):
        work = asyncio.gather(*(_collect(srv, prompt, p) for p in params))
        results = await _unless_disconnected(request, work)
    choices = []
    usage = {"prompt_tokens": len(prompt.token_ids), "completion_tokens": 0}
    for index, (text, last, lps) in enumerate(results):
        usage["completion_tokens"] += last.completion_tokens
        choice: dict[str, Any] = {"index": index, "finish_reason": last.finish_reason,
                                  "logprobs": _logprobs(srv, lps, chat) if logprobs is not None else None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choices.append(choice)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": srv.options.served_model_name,
                         "choices": choices, "usage": usage})


async def _unless_disconnected(request: Request, work: asyncio.Future) -> Any:
    """Await ``work``; if the client goes away first, cancel it (which aborts the engine requests)."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=0.25)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            raise APIError(499, "client disconnected")


async def _sse(srv: Server, prompt: Prompt, params: list[SamplingParams], ident: str, chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's server-sent events; leaving early (disconnect) closes the streams, aborting them."""
    created, name = int(time.time()), srv.options.served_model_name
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        payload = {"id": ident, "object": kind, "created": created, "model": name, "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, p: SamplingParams) -> None:
        try:
            async for output in srv.stream(prompt, p):
                await queue.put((index, output))
        except Exception as exc:  # reported in the stream: the status line has already gone out
            await queue.put((index, exc))

    with srv.holding(len(params)):  # counted while the stream runs, however it ends
        tasks = [asyncio.create_task(pump(k, p)) for k, p in enumerate(params)]
        completion_tokens, open_streams = 0, len(params)
        try:
            if chat:
                yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for k in range(len(params))])
            while open_streams:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    message = item.message if isinstance(item, APIError) else str(item)
                    yield f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"
                    open_streams -= 1
                    continue
                lps = _logprobs(srv, item.logprobs, chat) if params[index].logprobs is not None else None
                content = {"delta": {"content": item.delta}} if chat else {"text": item.delta}
                if item.delta or item.finished:
                    yield chunk([{"index": index, **content, "logprobs": lps,
                                  "finish_reason": item.finish_reason if item.finished else None}])
                if item.finished:
                    completion_tokens += item.completion_tokens
                    open_streams -= 1
            if include_usage:
                prompt_tokens = len(prompt.token_ids)
                yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens})
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()


def _logprobs(srv: Server, entries: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    decode = srv.model.processor.tokenizer.decode

    def token(token_id: int) -> str:
        return decode([token_id], skip_special_tokens=False)

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token(token_id)  # decoded once for both fields
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    if chat:
        return {"content": [{**entry(e["token_id"], e["logprob"]),
                             "top_logprobs": [entry(t, lp) for t, lp in e["top"]]} for e in entries]}
    return {"tokens": [token(e["token_id"]) for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token(t): lp for t, lp in e["top"]} for e in entries]}


class _BodyLimit:
    """413 for a body past the limit, by Content-Length or by counting a chunked body."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _too_large(send, self.max_bytes)


class _TooLarge(Exception):
    pass


async def _too_large(send: Any, limit: int) -> None:
    body = json.dumps(error_body(f"the request body is larger than the {limit} byte limit",
                                 code="request_too_large")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
