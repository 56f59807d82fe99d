"""`qwen2audio serve`: its arguments (vLLM's names where vLLM has one) and the server's start.

Owns checking everything a user typed before the model loads (the port, the limits, the chat
template file, flags vLLM has that we do not), the startup log, and handing the app to uvicorn.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import pathlib
import signal
import socket
from typing import TYPE_CHECKING, Any

from qwen2audio.errors import AdapterError, InputError

if TYPE_CHECKING:  # the model and the app load when serving starts, not for ``qwen2audio --help``
    from qwen2audio import EngineOptions, Qwen2Audio
    from qwen2audio.server.app import ServerOptions

logger = logging.getLogger("qwen2audio.server")
UNSUPPORTED = {  # vLLM flags a user will try: what to do instead
    "tensor_parallel_size": "the 8.4 B model fits one GPU; run one server per GPU behind a load balancer",
    "pipeline_parallel_size": "the 8.4 B model fits one GPU; run one server per GPU behind a load balancer",
    "data_parallel_size": "use --replicas N: N engine replicas on Ray Serve behind this one server",
}


def add_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("model_path", nargs="?", metavar="MODEL", help="checkpoint directory or hub id (or --model)")
    serve.add_argument("--model", help="the same as MODEL (default: MODEL)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (1-65535)")
    serve.add_argument("--api-key",
                       help="require 'Authorization: Bearer KEY' (or set QWEN2AUDIO_API_KEY; default: no key)")
    serve.add_argument("--served-model-name", nargs="+", help="the model id(s) clients use (default: MODEL)")
    serve.add_argument("--max-model-len", type=_positive,
                       help="longest prompt + reply in tokens (default: the model's)")
    serve.add_argument("--max-num-seqs", type=_positive, default=256, help="most requests running at once")
    serve.add_argument("--max-num-batched-tokens", type=_positive, default=16384, help="most tokens in one step")
    serve.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9,
                       help="share of GPU memory for weights, activations and the KV cache")
    serve.add_argument("--kv-cache-memory-bytes", type=_positive,
                       help="the KV cache's size in bytes (default: sized from free memory and "
                            "--gpu-memory-utilization)")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV cache of shared prompt prefixes (audio keyed by content)")
    serve.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling")
    serve.add_argument("--chat-template", metavar="FILE",
                       help="a Jinja chat template file to use instead of the model's (default: the model's)")
    serve.add_argument("--limit-mm-per-prompt", type=_limits, metavar="JSON",
                       help='most clips per prompt, e.g. \'{"audio": 2}\' (default: no limit)')
    serve.add_argument("--allowed-local-media-path",
                       help="allow file:// audio URLs inside this directory (default: file:// refused)")
    serve.add_argument("--allow-remote-audio", action="store_true",
                       help="allow http(s) audio URLs (private, loopback and link-local addresses stay refused)")
    serve.add_argument("--allowed-host", action="append", default=[],
                       help="a host that remote audio may come from even if it is private (repeatable; default: none)")
    serve.add_argument("--max-body-mb", type=float, default=25.0, help="largest request body in MB")
    serve.add_argument("--max-pending", type=_positive, default=256, help="requests in flight before 429")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get after SIGTERM")
    serve.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    serve.add_argument("--disable-log-requests", action="store_true", help="do not log each request")
    serve.add_argument("--trust-remote-code", action="store_true",
                       help="accepted for vLLM compatibility; no code is ever loaded from a checkpoint")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH", type=_lora_module,
                       help="LoRA adapters (PEFT's format: a directory or hub id) served beside the base model; "
                            "a request's model picks one by NAME (default: none)")
    serve.add_argument("--enable-lora", action="store_true",
                       help="adapter slots even without --lora-modules, for POST /v1/load_lora_adapter")
    serve.add_argument("--max-loras", type=_positive,
                       help="adapters loaded at once (default: 4, or as many as --lora-modules names)")
    serve.add_argument("--max-lora-rank", type=_positive, default=16, help="the largest adapter rank")
    serve.add_argument("--replicas", type=_positive, default=1,
                       help="engine replicas on Ray Serve behind one front, routed by load (needs qwen2audio[ray]; "
                            "default: 1, a plain single-process server)")
    serve.add_argument("--ray-address", help="with --replicas: a running Ray cluster, e.g. auto (default: start one)")
    serve.add_argument("--gpus-per-replica", type=float,
                       help="with --replicas: GPUs each replica takes (default: 1 where the cluster has GPUs, else 0)")
    serve.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --replicas: CPUs each replica takes")
    for flag, short in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"),
                        ("--data-parallel-size", "-dp")):
        serve.add_argument(flag, short, type=int, default=1, help=argparse.SUPPRESS)


def serve(args: argparse.Namespace) -> int:
    """Check the arguments and the port, load the model, log what was built, run until SIGTERM
    (which stops accepting and lets in-flight requests finish)."""
    import uvicorn

    from qwen2audio import Qwen2Audio
    from qwen2audio.server.app import create_app

    model_name = _model_name(args)
    for name, advice in UNSUPPORTED.items():
        if getattr(args, name) != 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)} is not supported: {advice}")
    options = _server_options(args, model_name)
    _check_port(args.host, args.port)
    logging.getLogger("qwen2audio").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.replicas > 1 or args.ray_address:
        if args.lora_modules or args.enable_lora:
            raise InputError("LoRA adapters are served by one engine: drop --replicas/--ray-address or the adapters")
        return _serve_on_ray(args, model_name, options)
    model = Qwen2Audio.from_pretrained(model_name, device=args.device, dtype=args.dtype, progress=not args.quiet,
                                       engine_options=_engine_options(args),
                                       chat_template=_chat_template(args.chat_template),
                                       segmentation=args.segmentation, quantization=args.quantization,
                                       quantization_group_size=args.quantization_group_size)
    _load_adapters(model, args.lora_modules, options.names)
    _log_startup(model, model_name, args)
    app = create_app(model, options)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it through the handler it found:
    # a no-op one makes a drained shutdown exit 0, as process managers expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout,
                log_level="debug" if args.verbose else args.uvicorn_log_level)
    return 0


def _model_name(args: argparse.Namespace) -> str:
    if args.model_path and args.model and args.model_path != args.model:
        raise InputError(f"two models given: {args.model_path} and --model {args.model}")
    name = args.model_path or args.model
    if not name:
        raise InputError("give the model: qwen2audio serve MODEL (a checkpoint directory or hub id)")
    return name


def _engine_options(args: argparse.Namespace) -> EngineOptions:
    from qwen2audio import EngineOptions

    return EngineOptions(**_engine_settings(args), **_lora_settings(args))


def _lora_settings(args: argparse.Namespace) -> dict[str, int]:
    """Adapter slots where adapters are asked for (vLLM's --enable-lora, --max-loras, --max-lora-rank)."""
    if not (args.lora_modules or args.enable_lora or args.max_loras):
        return {}
    names = [name for name, _ in args.lora_modules]
    if len(set(names)) < len(names):
        raise InputError(f"--lora-modules names an adapter twice: {', '.join(sorted(names))}")
    slots = args.max_loras or max(4, len(names))
    if slots < len(names):
        raise InputError(f"--max-loras {slots} holds fewer adapters than the {len(names)} --lora-modules name")
    return {"max_loras": slots, "max_lora_rank": args.max_lora_rank}


def _load_adapters(model: Qwen2Audio, modules: list[tuple[str, str]], served: list[str]) -> None:
    for name, path in modules:
        if name in served:
            raise InputError(f"--lora-modules {name}={path}: {name!r} is the base model's served name")
        try:
            model.load_adapter(path, name)
        except AdapterError as exc:
            raise InputError(f"--lora-modules {name}={path}: {exc}") from None


def _engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"kv_cache_bytes": args.kv_cache_memory_bytes, "max_batch_tokens": args.max_num_batched_tokens,
            "max_running": args.max_num_seqs, "max_model_len": args.max_model_len,
            "memory_fraction": args.gpu_memory_utilization, "enable_prefix_cache": args.enable_prefix_caching,
            "seed": args.seed, "enforce_eager": args.enforce_eager, "kv_cache_dtype": args.kv_cache_dtype,
            "compile_decode": args.compile}


def _serve_on_ray(args: argparse.Namespace, model_name: str, options: ServerOptions) -> int:
    """``--replicas N``: the same app on Ray Serve, over N engine replicas; runs until SIGTERM or
    Ctrl-C, then takes the application down (replicas finish or drop their requests)."""
    import threading

    from qwen2audio.distributed import replica_gpus
    from qwen2audio.distributed.serve import APP_NAME, build_app, require_serve

    serve_api = require_serve()
    import ray

    ray.init(address=args.ray_address, log_to_driver=args.verbose)
    serve_api.start(http_options={"host": args.host, "port": args.port})
    processor_options = {"chat_template": _chat_template(args.chat_template), "segmentation": args.segmentation}
    load = {"device": args.device, "dtype": args.dtype, "quantization": args.quantization,
            "quantization_group_size": args.quantization_group_size, "engine_options": _engine_settings(args),
            **processor_options}
    app = build_app(model_name, options, replicas=args.replicas, load=load, processor_options=processor_options,
                    gpus_per_replica=replica_gpus(args.gpus_per_replica), cpus_per_replica=args.cpus_per_replica,
                    max_ongoing_requests=args.max_num_seqs)
    serve_api.run(app, name=APP_NAME, route_prefix="/")
    logger.info("serving on http://%s:%d with %d engine replicas on Ray (models: %s)", args.host, args.port,
                args.replicas, ", ".join(options.names))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    logger.info("stopping: taking the application down")
    serve_api.delete(APP_NAME)
    ray.shutdown()
    return 0


def _server_options(args: argparse.Namespace, model_name: str) -> ServerOptions:
    from qwen2audio.server.app import ServerOptions
    from qwen2audio.server.media import MediaPolicy

    root = args.allowed_local_media_path
    if root is not None and not pathlib.Path(root).is_dir():
        raise InputError(f"--allowed-local-media-path {root}: not a directory")
    media = MediaPolicy(allow_remote=args.allow_remote_audio,
                        allowed_hosts=frozenset(h.lower() for h in args.allowed_host),
                        local_root=pathlib.Path(root) if root else None)
    return ServerOptions(served_model_name=tuple(args.served_model_name or [model_name]),
                         api_key=args.api_key or os.environ.get("QWEN2AUDIO_API_KEY"), media=media,
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_pending=args.max_pending,
                         max_audios=(args.limit_mm_per_prompt or {}).get("audio"),
                         log_requests=not args.disable_log_requests)


def _chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--chat-template {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None


def _check_port(host: str, port: int) -> None:
    """Bind once, as uvicorn will, so a taken port is reported before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        reason = "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise InputError(f"cannot listen on {host}:{port}: {reason}") from None


def _log_startup(model: Qwen2Audio, name: str, args: argparse.Namespace) -> None:
    engine = model.engine  # builds the KV cache now, so its size can be logged before serving
    runner = engine.runner
    per_block = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in runner.caches)
    per_block //= runner.num_blocks + 1
    logger.info("model %s on %s (%s, %s backend)", name, model.device, model.dtype, model.network.backend.name)
    logger.info("KV cache: %d blocks of %d tokens = %d tokens, %.2f GiB (%s); max context %d tokens",
                runner.num_blocks, runner.block_size, runner.num_blocks * runner.block_size,
                runner.num_blocks * per_block / 2**30, runner.cache_dtype, engine.max_context)
    logger.info("serving on http://%s:%d (models: %s)", args.host, args.port,
                ", ".join(args.served_model_name or [name]))


def _lora_module(text: str) -> tuple[str, str]:
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=PATH (an adapter's name and its directory)")
    return name, path


def _port(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range (1-65535)")
    return value


def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def _limits(text: str) -> dict[str, Any]:
    try:
        limits = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON (e.g. '{{\"audio\": 2}}')") from None
    if not isinstance(limits, dict) or set(limits) - {"audio"}:
        raise argparse.ArgumentTypeError("give a JSON object with one key, audio: Qwen2-Audio takes audio only")
    if not isinstance(limits.get("audio", 1), int) or limits.get("audio", 1) < 0:
        raise argparse.ArgumentTypeError("the audio limit must be a non-negative integer")
    return limits
