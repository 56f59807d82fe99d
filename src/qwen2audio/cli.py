"""The `qwen2audio` command: a thin adapter over the public Python API.

Owns argument parsing, exit codes and one-line error messages; it must not reach into the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from qwen2audio.errors import InputError

EXIT_USAGE = 2


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Decode each file and report what the model would see: duration, windows, audio tokens."""
    from qwen2audio.audio.features import FeatureConfig, audio_token_count, frame_count, split_windows
    from qwen2audio.audio.io import load_audio

    config = FeatureConfig()
    for path in args.files:
        samples = load_audio(path, max_duration_s=args.max_duration)
        windows = split_windows(samples, config)
        tokens = sum(audio_token_count(frame_count(len(w), config)) for w in windows)
        report = {
            "file": path,
            "seconds": round(len(samples) / config.sampling_rate, 3),
            "windows": len(windows),
            "audio_tokens": tokens,
            "peak": round(float(abs(samples).max()), 4),
        }
        print(json.dumps(report) if args.json else "  ".join(f"{k}={v}" for k, v in report.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen2audio",
        description="Qwen2-Audio: audio + text in, text out.",
    )
    parser.add_argument("--verbose", action="store_true", help="show debug logs and full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser(
        "inspect",
        help="decode audio files and show duration, 30 s windows and audio-token count",
        description="Decode audio files exactly as the model's front end does.",
        epilog="example: qwen2audio inspect speech.wav music.mp3 --json",
    )
    inspect.add_argument("files", nargs="+", help="audio files (wav, flac, mp3, ogg, opus, m4a, webm, ...)")
    inspect.add_argument("--json", action="store_true", help="one JSON object per file")
    inspect.add_argument("--max-duration", type=float, default=1200.0, help="longest accepted clip in seconds")
    inspect.set_defaults(handler=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.handler(args)
    except InputError as exc:
        if args.verbose:
            raise
        print(f"qwen2audio: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
