"""The package's names load on first use: pieces that need no model (a Ray job's driver, the
command's parser and ``--help``) start without importing torch (about 1.5 s on the 2-core box)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import qwen2audio

LIGHT = {
    "the batch job's driver": "from qwen2audio.distributed.batch import BatchJob, read_batch_items",
    "the command's parser": "from qwen2audio.cli import build_parser; build_parser()",
}


@pytest.mark.parametrize("code", LIGHT.values(), ids=LIGHT.keys())
def test_pieces_that_need_no_model_do_not_import_torch(code):
    probe = f"import sys\n{code}\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_every_public_name_resolves_to_its_home_module():
    import qwen2audio.api
    import qwen2audio.errors

    for name in qwen2audio.__all__:
        value = getattr(qwen2audio, name)
        assert value is getattr(__import__(qwen2audio._HOME[name], fromlist=[name]), name)
    assert qwen2audio.Qwen2Audio is qwen2audio.api.Qwen2Audio
    assert qwen2audio.InputError is qwen2audio.errors.InputError
    assert set(dir(qwen2audio)) >= set(qwen2audio.__all__)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Qwen3Audio'"):
        qwen2audio.Qwen3Audio
