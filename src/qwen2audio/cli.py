"""The `qwen2audio` command: run, chat, transcribe, inspect; a thin adapter over the Python API.

Owns argument parsing, terminal I/O, exit codes and one-line error messages; it must not reach
past the public API (Qwen2Audio, Processor, load_audio) into the engine or the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from qwen2audio import DEFAULT_MAX_DURATION_S, SEGMENTATIONS
from qwen2audio.errors import CheckpointError, InputError

EXIT_USAGE = 2

EXAMPLES = {
    "run": """examples:
  qwen2audio run --model Qwen/Qwen2-Audio-7B-Instruct --audio question.wav
  qwen2audio run --model ./Qwen2-Audio-7B-Instruct --audio speech.mp3 --prompt "What does the speaker want?"
  qwen2audio run --model ./Qwen2-Audio-7B --raw --audio glass.wav \\
      --prompt "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:" --temperature 0""",
    "chat": """commands inside the chat:
  /audio PATH     attach a clip to the next turn (an empty line sends the clips alone: voice chat)
  /system TEXT    set the system prompt (starts a new conversation)
  /reset          start a new conversation
  /save FILE      write the conversation as JSON (audio by path)
  /exit           leave (Ctrl-D too); Ctrl-C stops the reply being written

example:
  qwen2audio chat --model ./Qwen2-Audio-7B-Instruct""",
    "transcribe": """examples:
  qwen2audio transcribe --model ./Qwen2-Audio-7B-Instruct meeting.m4a
  qwen2audio transcribe --model ./Qwen2-Audio-7B recordings/ --format srt --output-dir subs/
  qwen2audio transcribe --model ./Qwen2-Audio-7B interview.mp3 --language fr --task translate""",
    "serve": """examples:
  qwen2audio serve ./Qwen2-Audio-7B-Instruct --port 8000
  qwen2audio serve Qwen/Qwen2-Audio-7B-Instruct --served-model-name qwen2-audio --max-model-len 8192 \\
      --limit-mm-per-prompt '{"audio": 4}' --api-key secret --allow-remote-audio""",
    "eval": """examples:
  qwen2audio eval --model ./Qwen2-Audio-7B --task librispeech-test-clean --data LibriSpeech/test-clean
  qwen2audio eval --model ./Qwen2-Audio-7B --task meld --data meld_test.jsonl --output meld.json
  qwen2audio eval --model ./Qwen2-Audio-7B-Instruct --task airbench-chat --data airbench_chat.parquet""",
    "batch": """examples:
  qwen2audio batch --model ./Qwen2-Audio-7B --input manifest.jsonl --task transcribe --output out.parquet
  qwen2audio batch --model ./Qwen2-Audio-7B-Instruct --input clips/ --task chat --output answers.jsonl \\
      --ray-address auto --replicas 8 --gpus-per-replica 1
manifest lines: {"id": "a1", "audio": "a1.flac", "question": "What is the mood?", "language": "en"}
a rerun with the same --output skips the ids already written there""",
    "inspect": """example:
  qwen2audio inspect speech.wav music.mp3 --json""",
    "quantize": """examples:
  qwen2audio quantize --model ./Qwen2-Audio-7B-Instruct --quantization int4 --output ./Qwen2-Audio-7B-Instruct-int4
  qwen2audio run --model ./Qwen2-Audio-7B-Instruct-int4 --audio speech.wav --prompt 'What is said?'""",
}


def _load_model(args: argparse.Namespace) -> Any:
    from qwen2audio import EngineOptions, Qwen2Audio

    options = EngineOptions(enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype,
                            compile_decode=args.compile)
    return Qwen2Audio.from_pretrained(args.model, device=args.device, dtype=args.dtype, progress=not args.quiet,
                                      engine_options=options, segmentation=args.segmentation,
                                      quantization=args.quantization,
                                      quantization_group_size=args.quantization_group_size)


def _adapter(args: argparse.Namespace, model: Any) -> str | None:
    """``--lora PATH``: the adapter every reply of this command comes from (its name: the folder's)."""
    if not args.lora:
        return None
    from qwen2audio.errors import AdapterError

    try:
        return model.load_adapter(args.lora)
    except AdapterError as exc:
        raise InputError(f"--lora {args.lora}: {exc}") from None


def _lora_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", metavar="PATH",
                        help="a LoRA adapter (PEFT's format: a directory with adapter_config.json and "
                             "adapter_model.safetensors, or a hub id) that answers instead of the base model "
                             "(default: none)")


def _quantization_label(args: argparse.Namespace) -> str | None:
    from qwen2audio import parse_quantization

    scheme = parse_quantization(args.quantization, args.quantization_group_size)
    return scheme.label() if scheme else None


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    values = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "seed": args.seed}
    return {key: value for key, value in values.items() if value is not None}


def _cmd_run(args: argparse.Namespace) -> int:
    """One turn: voice chat (audio only), audio analysis (audio + prompt), or a raw base-model prompt."""
    if not args.audio and not args.prompt:
        raise InputError("give --audio, --prompt, or both")
    from qwen2audio import SamplingParams

    SamplingParams(**_sampling(args))  # a bad value fails here, before the model loads
    audios = [_decoded(path) for path in args.audio]
    model = _load_model(args)
    adapter = _adapter(args, model)
    if args.raw:
        from qwen2audio import AUDIO_PLACEHOLDER, AUDIO_TOKEN

        prompt = args.prompt or ""
        if audios and AUDIO_TOKEN not in prompt:
            prompt = AUDIO_PLACEHOLDER * len(audios) + prompt
        if args.json:
            return _print_json(model.complete(prompt, audios, adapter=adapter, **_sampling(args)))
        stream = model.complete(prompt, audios, stream=True, adapter=adapter, **_sampling(args))
    else:
        messages = _turn(args.system, audios, args.prompt)
        if args.json:
            return _print_json(model.chat(messages, adapter=adapter, **_sampling(args)))
        stream = model.chat(messages, stream=True, adapter=adapter, **_sampling(args))
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _decoded(path: str) -> Any:
    """An --audio file decoded before anything loads; a bad one is named as the user typed it."""
    from pathlib import Path

    from qwen2audio import AudioError, load_audio

    if not Path(path).exists() and not path.startswith(("http://", "https://", "data:", "file:")):
        raise InputError(f"--audio {path}: no such file")
    try:
        return load_audio(path)
    except AudioError as exc:
        raise InputError(f"--audio {path}: {str(exc).removeprefix(f'audio file {path!r}: ')}") from None


def _turn(system: str | None, audios: Sequence[Any], text: str | None) -> list[dict[str, Any]]:
    from qwen2audio.chat_session import system_messages, user_message

    return [*system_messages(system), user_message(audios, text)]


def _print_json(completion: Any) -> int:
    print(json.dumps({"text": completion.text, "finish_reason": completion.finish_reason,
                      "usage": completion.usage, "token_ids": completion.token_ids}, ensure_ascii=False))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from qwen2audio.chat_session import ChatSession

    model = _load_model(args)
    session = ChatSession(model, _sampling(args), system=args.system, adapter=_adapter(args, model))
    return session.loop(sys.stdin, sys.stdout, sys.stderr)


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qwen2audio.transcribe import WINDOW_TOKENS, Transcriber, collect_files

    found = collect_files(args.inputs, args.include)
    names = {str(path): name for path, name in found}
    if args.output_dir:
        _check_distinct_outputs(found, args.format)
        _make_folder(args.output_dir, "--output-dir")
    model = _load_model(args)
    transcriber = Transcriber(model, language=args.language, task=args.task,
                              max_new_tokens=args.max_new_tokens or WINDOW_TOKENS, segmentation=args.segmentation,
                              details=args.format == "json", adapter=_adapter(args, model))

    def write(result: Any) -> None:
        _write_transcript(result, args, Path(names[result.path]), many=len(found) > 1)

    results = transcriber.transcribe([path for path, _ in found], progress=not args.quiet, on_done=write)
    failed = [result for result in results if result.error]
    if len(results) > 1:
        print(f"{len(results) - len(failed)} of {len(results)} files transcribed"
              + (f"; failed: {', '.join(r.path for r in failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def _check_distinct_outputs(found: Sequence[tuple[Any, Any]], fmt: str) -> None:
    """Two inputs must not be written to one transcript file (x.wav and x.mp3, or a/x.wav and b/x.wav)."""
    taken: dict[Any, Any] = {}
    for path, name in found:
        target = name.with_suffix(f".{fmt}")
        if target in taken:
            raise InputError(f"{taken[target]} and {path} would both be written to {target} in --output-dir: "
                             f"transcribe them into separate folders")
        taken[target] = path


def _make_folder(folder: str, option: str) -> None:
    from pathlib import Path

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{option} {folder}: cannot make this folder ({exc.strerror or exc})") from None


def _write_transcript(result: Any, args: argparse.Namespace, name: Any, many: bool) -> None:
    """One file's transcript, written as soon as it is done (a file that failed: one line on stderr).
    In --output-dir a file found in a given folder keeps its path inside that folder."""
    if result.error:
        print(result.error if result.path in result.error else f"{result.path}: {result.error}", file=sys.stderr)
        return
    text = result.render(args.format)
    if args.output_dir:
        from pathlib import Path

        target = Path(args.output_dir) / name.with_suffix(f".{args.format}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    else:
        if many:
            print(f"==> {result.path} <==")
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible server; SIGTERM stops accepting and lets in-flight requests finish."""
    from qwen2audio.server.launch import serve

    return serve(args)


def _cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize while loading, then write codes, scales and the untouched tensors."""
    from qwen2audio import quantize_checkpoint

    target = quantize_checkpoint(args.model, args.output, args.quantization, args.quantization_group_size,
                                 progress=not args.quiet)
    print(f"wrote {target}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """A report benchmark on local data; resumable through OUTPUT.jsonl."""
    from qwen2audio import checkpoint_identity
    from qwen2audio.evaluation import EvalRun

    output = args.output or f"eval-{args.task}.json"
    identity = checkpoint_identity(args.model, quantization=_quantization_label(args))
    run = EvalRun.prepare(args.task, args.data, output, identity, limit=args.limit,
                          max_new_tokens=args.max_new_tokens, segmentation=args.segmentation,
                          overwrite=args.overwrite)
    result = run.run(_load_model(args), batch_size=args.batch_size, progress=not args.quiet)
    sys.stdout.write(_table_text(output))
    return 0 if result["items"] else EXIT_USAGE


def _cmd_batch(args: argparse.Namespace) -> int:
    """A Ray Data job over many items; rows are written as they finish, a rerun resumes."""
    from qwen2audio.distributed.batch import BatchJob

    job = BatchJob(model=args.model, input=args.input, output=args.output, task=args.task, replicas=args.replicas,
                   gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                   batch_size=args.batch_size, sampling=_sampling(args), device=args.device, dtype=args.dtype,
                   quantization=args.quantization, segmentation=args.segmentation, ray_address=args.ray_address,
                   engine_options={"enforce_eager": args.enforce_eager, "kv_cache_dtype": args.kv_cache_dtype,
                                   "compile_decode": args.compile})
    summary = job.run(progress=not args.quiet)
    print(summary.text())
    return 1 if summary.failures else 0


def _table_text(output: str) -> str:
    from pathlib import Path

    return Path(output).with_suffix(".md").read_text(encoding="utf-8")


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Decode each file and report what the model would see: duration, windows, audio tokens. Every
    bad file is reported (one line each) and the rest still inspected."""
    from qwen2audio import AudioError, FeatureExtractor, load_audio, plan_windows

    extractor = FeatureExtractor()
    config = extractor.config
    failed = 0
    for path in args.files:
        try:
            samples = load_audio(path, max_duration_s=args.max_duration)
        except AudioError as exc:
            print(f"qwen2audio: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        windows = plan_windows(samples, args.segmentation, config.chunk_length, skip_silence=False)
        report = {
            "file": path,
            "seconds": round(len(samples) / config.sampling_rate, 3),
            "windows": len(windows),
            "audio_tokens": extractor.token_count(samples, windows),
            "peak": round(float(abs(samples).max()), 4),
        }
        print(json.dumps(report) if args.json else "  ".join(f"{k}={v}" for k, v in report.items()))
    return 0 if not failed else EXIT_USAGE if failed == len(args.files) else 1


def _common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        parser.add_argument("--model", required=True, help="checkpoint directory or Hugging Face hub id")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="GPU: run decode steps eagerly instead of replaying CUDA graphs")
    parser.add_argument("--compile", action="store_true",
                        help="CPU: decode through a torch.compile'd step (faster tokens; compiles once, "
                             "tens of seconds, when decoding first starts; needs a C++ compiler)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                        help="KV cache storage: auto (the model's dtype) or fp8 (half the memory and "
                             "decode reads, slightly less exact)")
    _quantization(parser)
    _segmentation(parser)
    parser.add_argument("--verbose", action="store_true", help="debug logs and full tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _quantization(parser: argparse.ArgumentParser, required: bool = False) -> None:
    written = "write the decoder's weights as int8 (per channel) or int4 (grouped) codes"
    loaded = ("store the decoder's weights as int8 (per channel) or int4 (grouped) codes, or as fp8 on GPUs "
              "of compute capability 8.9+, quantized while loading; a checkpoint written by 'qwen2audio "
              "quantize' loads as saved without it (default: the checkpoint's own weights)")
    parser.add_argument("--quantization", "-q", choices=["int8", "int4"] if required else ["int8", "int4", "fp8"],
                        required=required, help=written if required else loaded)
    parser.add_argument("--quantization-group-size", type=int, choices=[32, 64, 128],
                        help="int4: inputs sharing one scale and zero (default: 128)")


def _segmentation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--segmentation", choices=SEGMENTATIONS, default="vad",
                        help="where audio over 30 s is cut into windows: in pauses found by voice activity "
                             "detection (vad), or every 30 s (fixed)")


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int,
                        help="most tokens to generate (default: the checkpoint's generation_config.json, else 256)")
    parser.add_argument("--temperature", type=float, help="0 = greedy (default: the checkpoint's)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, help="random seed for sampling (default: a fresh one each run)")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (what was wrong, and where to look), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and every option's default shown where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS \
            or action.default == []
        if not unset and "%(default)" not in text and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from qwen2audio import __version__

    parser = _Parser(prog="qwen2audio", description="Qwen2-Audio: audio + text in, text out.")
    parser.add_argument("--version", action="version", version=f"qwen2audio {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                                   formatter_class=_Help)

    run = command("run", "one turn: audio only (voice chat), audio + prompt (analysis), or --raw")
    _common(run)
    run.add_argument("--audio", action="append", default=[],
                     help="an audio file (repeat for several; default: none, text only)")
    run.add_argument("--prompt", help="the text of the turn (with --raw: the whole raw prompt; default: none, "
                                      "the audio alone: voice chat)")
    run.add_argument("--system", help="system prompt (default: the chat template's)")
    run.add_argument("--raw", action="store_true", help="base-model prompt; <|AUDIO|> takes the audios in order")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _lora_option(run)
    _sampling_options(run)
    run.set_defaults(handler=_cmd_run)

    chat = command("chat", "interactive multi-turn chat (voice chat and audio analysis)")
    _common(chat)
    chat.add_argument("--system", help="system prompt (default: the chat template's)")
    _lora_option(chat)
    _sampling_options(chat)
    chat.set_defaults(handler=_cmd_chat)

    transcribe = command("transcribe", "transcribe (or translate) files or directories of audio")
    _common(transcribe)
    transcribe.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="audio files or directories")
    transcribe.add_argument("--language", help="spoken language code, e.g. en, zh, fr (default: detect)")
    transcribe.add_argument("--task", choices=["transcribe", "translate"], default="transcribe",
                            help="translate = into English")
    transcribe.add_argument("--format", choices=["txt", "json", "srt", "vtt"], default="txt")
    transcribe.add_argument("--output-dir",
                            help="write one file per input here, subfolders kept (default: print to stdout)")
    transcribe.add_argument("--max-new-tokens", type=int, help="most tokens per 30 s window (default 448)")
    transcribe.add_argument("--include", metavar="GLOB",
                            help="in directories (searched with their subfolders), only files whose path "
                                 "inside matches GLOB, e.g. '*.m4a' (default: every audio file)")
    _lora_option(transcribe)
    transcribe.set_defaults(handler=_cmd_transcribe)

    serve = command("serve", "OpenAI-compatible HTTP server (chat, completions, audio transcriptions)")
    _common(serve, model=False)
    from qwen2audio.server.launch import add_arguments

    add_arguments(serve)
    serve.set_defaults(handler=_cmd_serve)

    from qwen2audio.evaluation import TASKS

    evaluation = command("eval", "run a Qwen2-Audio report benchmark on local data (resumable)")
    _common(evaluation)
    evaluation.add_argument("--task", required=True, choices=list(TASKS), metavar="TASK",
                            help=f"one of: {', '.join(TASKS)}")
    evaluation.add_argument("--data", required=True,
                            help="JSONL manifest, LibriSpeech directory, or parquet/arrow file or directory")
    evaluation.add_argument("--limit", type=int, help="only the first N items (default: all)")
    evaluation.add_argument("--batch-size", type=int, default=16)
    evaluation.add_argument("--max-new-tokens", type=int, default=256)
    evaluation.add_argument("--output", help="results JSON (default eval-TASK.json; items go to .jsonl, table to .md); "
                                             "a rerun with the same model and settings resumes from it")
    evaluation.add_argument("--overwrite", action="store_true",
                            help="discard results saved in OUTPUT.jsonl instead of resuming")
    evaluation.set_defaults(handler=_cmd_eval)

    batch = command("batch", "many items through N engine replicas on Ray (needs qwen2audio[ray]; resumable)")
    _common(batch)
    batch.add_argument("--input", required=True,
                       help="JSONL manifest, parquet/arrow file or directory, LibriSpeech directory, or a directory "
                            "of audio files")
    batch.add_argument("--task", default="chat", metavar="TASK",
                       help="chat (the item's 'question', or none: voice chat), transcribe, caption, or an eval task")
    batch.add_argument("--output", required=True, help="out.parquet or out.jsonl; finished ids there are skipped")
    batch.add_argument("--ray-address", help="a running cluster, e.g. auto (default: start a local one)")
    batch.add_argument("--replicas", type=int, default=1, help="engine actors")
    batch.add_argument("--gpus-per-replica", type=float, help="default: 1 where the cluster has GPUs, else 0")
    batch.add_argument("--cpus-per-replica", type=float, default=1.0)
    batch.add_argument("--batch-size", type=int, default=16, help="items a replica takes at a time")
    _sampling_options(batch)
    batch.set_defaults(handler=_cmd_batch)

    quantize = command("quantize", "write a copy of a checkpoint with int8 or int4 decoder weights")
    quantize.add_argument("--model", required=True, help="the float checkpoint: directory or Hugging Face hub id")
    _quantization(quantize, required=True)
    quantize.add_argument("--output", required=True, help="new (or empty) directory for the quantized checkpoint")
    quantize.add_argument("--verbose", action="store_true", help="debug logs and full tracebacks")
    quantize.add_argument("--quiet", action="store_true", help="no progress bars")
    quantize.set_defaults(handler=_cmd_quantize)

    inspect = command("inspect", "decode audio files; show duration, windows and audio-token count")
    _segmentation(inspect)
    inspect.add_argument("--verbose", action="store_true", help="debug logs and full tracebacks")
    inspect.add_argument("files", nargs="+", help="audio files (wav, flac, mp3, ogg, opus, m4a, webm, ...)")
    inspect.add_argument("--json", action="store_true", help="one JSON object per file")
    inspect.add_argument("--max-duration", type=float, default=DEFAULT_MAX_DURATION_S,
                         help="longest accepted clip in seconds")
    inspect.set_defaults(handler=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.handler(args)
    except (InputError, CheckpointError, OSError) as exc:
        if args.verbose:
            raise
        print(f"qwen2audio: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
