"""Request bodies parsed with their nesting bounded, in this process and in a child interpreter:
both ways give json.loads's value or a client-facing BodyError, never a RecursionError."""

from __future__ import annotations

import asyncio
import json

import pytest

from qwen2audio.server import jsonbody

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "é\u0000" * 10}]}],
        "n": 2, "seed": -(2**63), "logit_bias": {"1": -1.5}, "stop": None, "stream": True}
BAD = [
    (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 64"),  # json.loads itself gives up: RecursionError
    (json.dumps(json.loads("[" * 65 + "]" * 65)).encode(), "nests deeper than 64"),  # parses, but too deep
    (b"\xff\xfe not json", "not valid JSON"),
    (b'{"a": 1', "not valid JSON"),
    (b"", "not valid JSON"),
]


def both(raw: bytes):
    """parse(raw) here and in a child: each a ("ok", value) or ("error", message)."""
    answers = []
    for way in (jsonbody.parse, lambda body: asyncio.run(jsonbody.parse_in_child([body[:7], body[7:]]))):
        try:
            answers.append(("ok", way(raw)))
        except jsonbody.BodyError as exc:
            answers.append(("error", str(exc)))
    return answers


def test_a_body_parses_to_what_json_loads_gives_in_process_and_in_a_child():
    raw = json.dumps(GOOD).encode()
    assert both(raw) == [("ok", json.loads(raw))] * 2
    exactly_64 = json.dumps(json.loads("[" * 64 + "]" * 64)).encode()
    assert both(exactly_64) == [("ok", json.loads(exactly_64))] * 2


@pytest.mark.parametrize(("raw", "fragment"), BAD, ids=["recursion", "65-deep", "bytes", "truncated", "empty"])
def test_bad_bodies_are_body_errors_in_process_and_in_a_child(raw, fragment):
    (here, in_child) = both(raw)
    assert here[0] == in_child[0] == "error" and fragment in here[1] and fragment in in_child[1], (here, in_child)


def test_shape_limits_depth_containers_and_values():
    """Each limit holds exactly: at the limit passes, one past it is a BodyError."""
    deep = []
    for _ in range(jsonbody.MAX_DEPTH - 2):  # 63 lists in all
        deep = [deep]
    jsonbody.check_shape({"a": deep})  # the object is level 1, the innermost list level 64
    with pytest.raises(jsonbody.BodyError, match="nests deeper"):
        jsonbody.check_shape({"a": [deep]})
    jsonbody.check_shape([{}] * (jsonbody.MAX_CONTAINERS - 1))
    with pytest.raises(jsonbody.BodyError, match="objects and arrays"):
        jsonbody.check_shape([{}] * jsonbody.MAX_CONTAINERS)
    jsonbody.check_shape([0] * (jsonbody.MAX_VALUES - 1))
    with pytest.raises(jsonbody.BodyError, match="values"):
        jsonbody.check_shape([0] * jsonbody.MAX_VALUES)


def test_a_container_heavy_body_is_refused_by_the_child():
    raw = b'{"x": [' + b",".join([b"{}"] * (jsonbody.MAX_CONTAINERS + 1)) + b"]}"
    with pytest.raises(jsonbody.BodyError, match="objects and arrays"):
        asyncio.run(jsonbody.parse_in_child([raw]))


def test_a_child_that_dies_while_fed_small_chunks_is_a_body_error(monkeypatch, tmp_path):
    """Killed mid-read (out of memory, say): a BodyError (a 400), not a BrokenPipeError (a 500)."""
    dying = tmp_path / "dying.py"
    dying.write_text("import os\nos._exit(3)\n")
    monkeypatch.setattr(jsonbody, "__file__", str(dying))
    with pytest.raises(jsonbody.BodyError, match="could not be parsed"):
        asyncio.run(jsonbody.parse_in_child([b" " * 100] * 20_000))
