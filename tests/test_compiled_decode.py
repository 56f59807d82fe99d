"""The CPU's compiled decode step (EngineOptions(compile_decode=True)) against the eager step."""

from __future__ import annotations

import pytest

from qwen2audio import EngineOptions, Qwen2Audio, SamplingParams
from qwen2audio.engine.compiled_decode import CompiledDecoder
from test_engine import conv, fresh_engine, text

PROMPTS = ("Say something.", "A longer question about nothing at all?", "Hi")
LENGTHS = (3, 9, 40)  # the batch shrinks 3 -> 2 -> 1; 40 tokens cross two more KV blocks


def _load(checkpoint, dtype):
    return Qwen2Audio.from_pretrained(checkpoint, progress=False, dtype=dtype, quantization="int8",
                                      engine_options=EngineOptions(compile_decode=True))


@pytest.fixture(scope="module")
def int8_fp32(tiny_checkpoint):
    return _load(tiny_checkpoint, "float32")


def _side_by_side(model, count=3):
    """Run the prompts; every decode step goes through the compiled graph and then eagerly on the
    same state (each writes the same key/value slots), for the first ``count`` prompts (one: only the
one-sequence graph is compiled). Returns the tokens and, per decode step,
    (batch size, relative L2 difference of the logits, whether the argmax agrees)."""
    engine = fresh_engine(model, compile_decode=True)
    runner, steps = engine.runner, []
    eager_execute = runner.execute

    def both(step):
        if step.prefills:
            return eager_execute(step)
        compiled = runner.compiled.execute(step.decodes)
        runner.compiled.failed = True  # the eager step, this once
        expected = eager_execute(step)
        runner.compiled.failed = False
        steps.append((len(step.decodes), ((compiled - expected).norm() / expected.norm()).item(),
                      bool((compiled.argmax(-1) == expected.argmax(-1)).all())))
        return compiled

    runner.execute = both
    ids = [engine.add_request(engine.processor.prepare(conv(text(p))), SamplingParams(max_new_tokens=n, temperature=0))
           for p, n in zip(PROMPTS[:count], LENGTHS[:count], strict=True)]
    tokens = {i: [] for i in ids}
    for output in engine.run(set(ids)):
        tokens[output.request_id].extend(output.token_ids)
    assert isinstance(runner.compiled, CompiledDecoder) and not runner.compiled.failed
    assert runner.compiled.compiled == ({False, True} if count > 1 else {False})  # one sequence; 2+
    return [tokens[i] for i in ids], steps


def test_compiled_steps_match_the_eager_steps_at_every_batch_size(int8_fp32):
    tokens, steps = _side_by_side(int8_fp32)
    assert [len(t) for t in tokens] == list(LENGTHS)
    assert {size for size, _, _ in steps} == {1, 2, 3}
    assert all(error < 1e-5 and same for _, error, same in steps), steps


def test_compiled_bf16_steps_stay_within_bf16_rounding(tiny_checkpoint):
    """Inductor keeps fused intermediates in float32 where the eager ops round each to bfloat16:
    the two differ by about 1% on this model, far below what a wrong cache row or position does."""
    _, steps = _side_by_side(_load(tiny_checkpoint, "bfloat16"), count=1)  # one graph: the rounding is the same
    assert max(error for _, error, _ in steps) < 3e-2, steps


def test_a_graph_that_cannot_compile_leaves_eager_steps(int8_fp32, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler here")

    engine = fresh_engine(int8_fp32, compile_decode=True)
    monkeypatch.setattr(engine.runner.compiled, "graph", broken)
    request = engine.add_request(engine.processor.prepare(conv(text("Hi"))), SamplingParams(max_new_tokens=4,
                                                                                           temperature=0))
    outputs = [token for output in engine.run({request}) for token in output.token_ids]
    reference = fresh_engine(int8_fp32)
    again = reference.add_request(reference.processor.prepare(conv(text("Hi"))), SamplingParams(max_new_tokens=4,
                                                                                              temperature=0))
    assert outputs == [token for output in reference.run({again}) for token in output.token_ids]
    assert engine.runner.compiled.failed
    assert "torch.compile of the decode step failed" in caplog.text


@pytest.mark.parametrize("command", [["run", "--model", "m", "--audio", "a.wav"], ["serve", "m"]])
def test_the_command_line_switch_reaches_the_engine_options(command, monkeypatch):
    from qwen2audio import cli
    from qwen2audio.server import launch

    seen = {}
    monkeypatch.setattr(Qwen2Audio, "from_pretrained",
                        classmethod(lambda cls, *a, **k: seen.setdefault("options", k["engine_options"])))
    args = cli.build_parser().parse_args([*command, "--compile"])
    options = launch._engine_options(args) if command[0] == "serve" else (cli._load_model(args), seen["options"])[1]
    assert options.compile_decode
    assert not cli.build_parser().parse_args(command).compile
