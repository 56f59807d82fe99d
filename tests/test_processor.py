"""Processor (chat template, placeholder expansion, batching, features) against transformers.

The oracle is transformers' ``Qwen2AudioProcessor`` (5.15: it wraps bare ``<|AUDIO|>`` in
``<|audio_bos|>``/``<|audio_eos|>``) over ``WhisperFeatureExtractor(feature_size=128)`` and
``AutoTokenizer`` loaded from the same directory, left padded. It runs on the real Qwen2 vocabulary
and on a tiny byte-level BPE vocabulary trained here, with the six Qwen2-Audio special tokens after it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import itertools
import json
import pathlib
from typing import Any

import numpy as np
import pytest
import soundfile
import torch

from qwen2audio.errors import AudioError, ContextLengthError, InputError, PromptError
from qwen2audio.processor import Processor
from qwen2audio.text.prompt import ChatTemplate
from qwen2audio.text.tokenizer import QWEN2_SPLIT, Tokenizer

from checkpoints import ORACLE_IS_PINNED, PINNED_ORACLE, has_bare_audio

DATA = pathlib.Path(__file__).parent / "data"
REAL_DIR = DATA / "qwen2-tokenizer"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
SR = 16000


def tokens_for(samples: int) -> int:
    """SPEC.md section 4, written out independently: 25 audio tokens a second."""
    frames = min(-(-samples // 160), 3000)
    return (((frames - 1) // 2 + 1) - 2) // 2 + 1


# ---- audio ------------------------------------------------------------------------------------

def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = round(seconds * SR)
    t = np.arange(n) / SR
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    return np.clip(tone + 0.05 * rng.standard_normal(n), -1, 1).astype(np.float32)


CLIPS: dict[str, np.ndarray] = {
    "n003": _clip(0.03, 1),
    "n05": _clip(0.5, 2),
    "n1": _clip(1.0, 3),
    "n403": _clip(4.03, 4),
    "n777": _clip(7.77, 5),
    "n15": _clip(15.0, 6),
    "n2999": _clip(29.99, 7),
    "n30": _clip(30.0, 8),
    "en": soundfile.read(DATA / "speech_en_16k.wav", dtype="float32")[0],
    "zh": soundfile.read(DATA / "speech_zh_16k.wav", dtype="float32")[0],
}
assert CLIPS["en"].ndim == 1 and CLIPS["zh"].ndim == 1

# Every string source (path, base64, data URI) -> the samples transformers is given for it.
STRING_SOURCES: dict[str, np.ndarray] = {
    str(DATA / "speech_en_16k.wav"): CLIPS["en"],
    str(DATA / "speech_zh_16k.wav"): CLIPS["zh"],
}


def _wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SR, format="WAV", subtype="FLOAT")  # float WAV: exact round trip
    return buffer.getvalue()


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> dict[str, str]:
    """The named clips as float WAV files, as base64 and as data URIs."""
    folder = tmp_path_factory.mktemp("clips")
    out = {}
    for name in ("n003", "n05", "n1", "n403", "n777"):
        data = _wav_bytes(CLIPS[name])
        path = folder / f"{name}.wav"
        path.write_bytes(data)
        encoded = base64.b64encode(data).decode("ascii")
        out[f"{name}.path"] = str(path)
        out[f"{name}.b64"] = encoded
        out[f"{name}.uri"] = "data:audio/wav;base64," + encoded
        for key in ("path", "b64", "uri"):
            STRING_SOURCES[out[f"{name}.{key}"]] = CLIPS[name]
    return out


# ---- the suite --------------------------------------------------------------------------------

@dataclasses.dataclass
class Item:
    name: str
    prompt: Any  # a conversation, or a raw prompt string
    raw_audios: list[np.ndarray] = dataclasses.field(default_factory=list)  # for raw prompts only


def A(name: str) -> dict[str, Any]:
    return {"type": "audio", "audio": CLIPS[name]}


def T(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def build_suite(files: dict[str, str]) -> list[Item]:
    en_path, zh_path = str(DATA / "speech_en_16k.wav"), str(DATA / "speech_zh_16k.wav")
    user = "user"
    return [
        Item("voice_chat_1s", [{"role": user, "content": [A("n1")]}]),
        Item("voice_chat_30s", [{"role": user, "content": [A("n30")]}]),
        Item("voice_chat_0.03s", [{"role": user, "content": [A("n003")]}]),
        Item("analysis_audio_then_text", [{"role": user, "content": [
            {"type": "audio", "audio": en_path}, T("What does the speaker say?")]}]),
        Item("analysis_text_then_audio", [{"role": user, "content": [
            T("Listen to this clip and describe it: "), A("n403")]}]),
        Item("custom_system", [
            {"role": "system", "content": "You are a sound-event classifier. Answer in one word."},
            {"role": user, "content": [A("n777"), T("What is the sound?")]}]),
        Item("system_as_parts", [
            {"role": "system", "content": [T("You are terse."), T(" Very terse.")]},
            {"role": user, "content": [A("n05"), T("Describe.")]}]),
        Item("multi_turn_text_followups", [
            {"role": user, "content": [A("n1"), T("What animal is this?")]},
            {"role": "assistant", "content": "It is a dog barking."},
            {"role": user, "content": "How many barks?"},
            {"role": "assistant", "content": "Three."},
            {"role": user, "content": "Thanks! Anything else?"}]),
        Item("audios_across_turns", [
            {"role": user, "content": [A("n2999"), T("What's that sound?")]},
            {"role": "assistant", "content": "Glass shattering."},
            {"role": user, "content": [{"type": "audio", "audio": zh_path}, T("How about this one?")]}]),
        Item("three_audios_one_turn", [{"role": user, "content": [
            A("n1"), A("n05"), A("n003"), T("Which clip is the longest?")]}]),
        Item("every_part_form", [{"role": user, "content": [
            A("n05"),
            {"type": "audio", "audio": files["n1.path"]},
            {"type": "audio", "audio": pathlib.Path(files["n003.path"])},
            {"type": "audio", "audio_url": files["n403.path"]},
            {"type": "input_audio", "input_audio": {"data": files["n05.b64"], "format": "wav"}},
            {"type": "audio_url", "audio_url": {"url": files["n777.uri"]}},
            {"type": "audio", "audio": (CLIPS["n1"], SR)},
            {"type": "audio", "audio": torch.from_numpy(CLIPS["n003"])},
            T("Compare all eight.")]}]),
        Item("audio_path_part", [{"role": user, "content": [
            {"type": "audio", "audio": files["n777.path"]}, T("Transcribe.")]}]),
        Item("audio_url_string_part", [{"role": user, "content": [
            {"type": "audio", "audio_url": files["n1.path"]}, T("Transcribe.")]}]),
        Item("input_audio_part", [{"role": user, "content": [
            {"type": "input_audio", "input_audio": {"data": files["n403.b64"], "format": "wav"}}]}]),
        Item("audio_url_data_uri_part", [{"role": user, "content": [
            T("Which language? "), {"type": "audio_url", "audio_url": {"url": files["n05.uri"]}}]}]),
        Item("untyped_and_bare_string_parts", [{"role": user, "content": [
            {"text": "Untyped text part. "}, "A bare string part. ", {"audio": CLIPS["n1"]}]}]),
        Item("chinese_analysis", [{"role": user, "content": [
            {"type": "audio", "audio": zh_path}, T("请把这段话翻译成英文。")]}]),
        Item("multilingual_whitespace_text", [
            {"role": "system", "content": "Réponds en français 🇫🇷\u00a0!"},
            {"role": user, "content": [T("日本語、한국어、العربية 👨‍👩‍👧‍👦\t tabs\r\n  "), A("n1"), T("e\u0301  ")]}]),
        Item("text_only_conversation", [{"role": user, "content": "Hello, who are you?"}]),
        Item("late_system_message", [
            {"role": user, "content": "hi"},
            {"role": "system", "content": "A system turn that is not first."},
            {"role": user, "content": [A("n05")]}]),
        Item("history_then_audio", [
            {"role": "system", "content": "You analyse audio."},
            {"role": user, "content": "Hi"},
            {"role": "assistant", "content": "Hello! Send me a clip."},
            {"role": user, "content": [A("n15"), T("Summarize it.")]}]),
        Item("raw_wrapped_caption", "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:",
             [CLIPS["en"]]),
        Item("raw_bare_first", "<|AUDIO|>Transcribe this:", [CLIPS["n1"]]),
        Item("raw_bare_middle", "Listen: <|AUDIO|> and answer.", [CLIPS["n403"]]),
        Item("raw_wrapped_and_bare", "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|AUDIO|>\nCompare.",
             [CLIPS["n05"], CLIPS["n30"]]),
        Item("raw_adjacent_bare", "<|AUDIO|><|AUDIO|>", [CLIPS["n003"], CLIPS["n777"]]),
        Item("raw_bos_only", "<|audio_bos|><|AUDIO|> what is it?", [CLIPS["n1"]]),
        Item("raw_text_only", "Hello, world!"),
        Item("raw_empty", ""),
        Item("raw_spaced_bos_and_eos_only", "<|audio_bos|> <|AUDIO|> and x<|AUDIO|><|audio_eos|>y",
             [CLIPS["n05"], CLIPS["n1"]]),
        Item("raw_chinese_asr",
             "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|zh|>", [CLIPS["zh"]]),
    ]


def _is_text(part: Any) -> bool:
    return isinstance(part, str) or (part.get("type") in (None, "text") and "text" in part)


def _samples_of(part: dict[str, Any]) -> np.ndarray:
    source = part.get("audio", part.get("audio_url", part.get("input_audio")))
    if isinstance(source, dict):
        source = source.get("url", source.get("data"))
    if isinstance(source, tuple):
        source = source[0]
    if isinstance(source, torch.Tensor):
        source = source.numpy()
    if isinstance(source, np.ndarray):
        return source
    return STRING_SOURCES[str(source)]


def oracle_view(item: Item) -> tuple[Any, list[np.ndarray]]:
    """The same prompt in the form transformers' template keys on, and its audio in order."""
    if isinstance(item.prompt, str):
        return item.prompt, list(item.raw_audios)
    conversation, audios = [], []
    for message in item.prompt:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if _is_text(part):
                    parts.append({"type": "text", "text": part if isinstance(part, str) else part["text"]})
                else:
                    parts.append({"type": "audio", "audio_url": "clip.wav"})
                    audios.append(_samples_of(part))
            content = parts
        conversation.append({"role": message["role"], "content": content})
    return conversation, audios


# ---- a tiny vocabulary ------------------------------------------------------------------------

TINY_CORPUS = [
    "You are a helpful assistant.",
    "Audio 1: Audio 2: Audio 3: What's that sound? How about this one?",
    "system user assistant Transcribe this. Describe. Compare them.",
    "Generate the caption in English: Detect the language and recognize the speech:",
    "今天天气很好，请把这段话翻译成英文。",
    "The quick brown fox jumps over the lazy dog 0123456789",
]


def build_tiny_tokenizer(directory: pathlib.Path) -> None:
    """Train a byte-level BPE with the Qwen2 split and lay it out like a Qwen2-Audio checkpoint."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    backend = HFTokenizer(BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    backend.train_from_iterator(TINY_CORPUS * 5, trainer)
    backend.model.save(str(directory))
    size = len(json.loads((directory / "vocab.json").read_text(encoding="utf-8")))
    real = json.loads((REAL_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    config = {
        "added_tokens_decoder": {
            str(size + k): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for k, name in enumerate(SPECIALS)
        },
        "additional_special_tokens": SPECIALS[1:],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": real["chat_template"],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(directory)
    return directory


def test_tiny_vocabulary_layout(tiny_dir: pathlib.Path) -> None:
    size = len(json.loads((tiny_dir / "vocab.json").read_text(encoding="utf-8")))
    tokenizer = Tokenizer.from_dir(tiny_dir)
    assert 256 < size <= 420
    assert [tokenizer.token_to_id(name) for name in SPECIALS] == list(range(size, size + 6))
    assert (tokenizer.eos_id, tokenizer.pad_id) == (size + 2, size)


# ---- the two sides ----------------------------------------------------------------------------

@dataclasses.dataclass
class Pair:
    ours: Processor
    oracle: Any
    directory: pathlib.Path


_PAIRS: dict[str, Pair] = {}


@pytest.fixture(scope="module", params=["real", "tiny"])
def pair(request) -> Pair:
    if request.param not in _PAIRS:
        transformers = pytest.importorskip("transformers")
        directory = REAL_DIR if request.param == "real" else request.getfixturevalue("tiny_dir")
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        tokenizer.padding_side = "left"
        oracle = transformers.Qwen2AudioProcessor(
            feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128),
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
        )
        _PAIRS[request.param] = Pair(Processor.from_pretrained(directory), oracle, directory)
    return _PAIRS[request.param]


@pytest.fixture(scope="module")
def suite(audio_files) -> list[Item]:
    return build_suite(audio_files)


def run_oracle(pair: Pair, items: list[Item]):
    texts, audios = [], []
    for item in items:
        prompt, clips = oracle_view(item)
        if not isinstance(prompt, str):
            prompt = pair.oracle.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        texts.append(prompt)
        audios.extend(clips)
    return pair.oracle(text=texts, audio=audios or None, return_tensors="pt", padding=True, sampling_rate=SR)


def run_ours(pair: Pair, items: list[Item]):
    raw_audios = [clip for item in items for clip in item.raw_audios]
    if len(items) == 1:  # a single conversation or string, not wrapped in a batch
        return pair.ours(items[0].prompt, audios=raw_audios)
    return pair.ours([item.prompt for item in items], audios=raw_audios)


def assert_same_batch(pair: Pair, items: list[Item]) -> None:
    expected = run_oracle(pair, items)
    got = run_ours(pair, items)
    names = [item.name for item in items]
    assert got.input_ids.shape == expected["input_ids"].shape, names
    for row, name in enumerate(names):
        assert got.input_ids[row].tolist() == expected["input_ids"][row].tolist(), name
        assert got.attention_mask[row].tolist() == expected["attention_mask"][row].tolist(), name
    if "input_features" not in expected:
        assert got.input_features.shape[0] == 0 and got.feature_attention_mask.shape[0] == 0
        return
    assert got.input_features.shape == expected["input_features"].shape
    assert (got.input_features - expected["input_features"]).abs().max().item() <= 1e-4
    assert torch.equal(got.feature_attention_mask, expected["feature_attention_mask"].long())
    assert_spans_consistent(pair, got)


def assert_spans_consistent(pair: Pair, batch) -> None:
    """Each span covers exactly the <|AUDIO|> run of its clip, as SPEC.md counts it, next to bos/eos."""
    audio_id, bos, eos = (pair.ours.tokenizer.token_to_id(t) for t in SPECIALS[3:])
    for row_ids, spans in zip(batch.token_ids, batch.audio_spans, strict=True):
        assert sum(1 for t in row_ids if t == audio_id) == sum(span.length for span in spans)
        for span in spans:
            valid = int(batch.feature_attention_mask[span.first_window].sum())
            assert span.num_windows == 1
            assert span.length == tokens_for(valid * 160) > 0
            before = row_ids[span.offset - 1] if span.offset > 0 else None
            after = row_ids[span.offset + span.length] if span.offset + span.length < len(row_ids) else None
            assert before == bos or after == eos  # both, except for a raw "<|audio_bos|><|AUDIO|>"
            assert audio_id not in (before, after)
            assert set(row_ids[span.offset:span.offset + span.length]) == {audio_id}


ITEM_PROMPTS = [(item.name, item.prompt) for item in build_suite(dict.fromkeys(
    [f"{n}.{k}" for n in ("n003", "n05", "n1", "n403", "n777") for k in ("path", "b64", "uri")], ""))]
ITEM_NAMES = [name for name, _ in ITEM_PROMPTS]


def test_suite_is_large_enough() -> None:
    assert len(ITEM_NAMES) >= 20 and len(set(ITEM_NAMES)) == len(ITEM_NAMES)


@pytest.mark.parametrize("items", [
    pytest.param("all", marks=PINNED_ORACLE),
    pytest.param("portable", marks=pytest.mark.skipif(ORACLE_IS_PINNED, reason="the pinned oracle takes them all")),
])
def test_whole_suite_as_one_left_padded_batch(pair: Pair, suite: list[Item], items: str) -> None:
    """Every item in one batch; with another transformers than the pinned one, the items whose
    expected ids depend on its version are left out."""
    assert_same_batch(pair, [item for item in suite if items == "all" or not has_bare_audio(item.prompt)])


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[PINNED_ORACLE] if has_bare_audio(prompt) else []) for name, prompt in ITEM_PROMPTS
])
def test_each_item_alone(pair: Pair, suite: list[Item], name: str) -> None:
    assert_same_batch(pair, [item for item in suite if item.name == name])


def test_rendering_matches_transformers(pair: Pair, suite: list[Item]) -> None:
    for item in suite:
        if isinstance(item.prompt, str):
            continue
        conversation, _ = oracle_view(item)
        expected = pair.oracle.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert pair.ours.render(item.prompt) == expected, item.name


# ---- hand-computed expectations ----------------------------------------------------------------

@pytest.fixture(scope="module")
def real() -> Processor:
    return Processor.from_pretrained(REAL_DIR)


def test_rendering_by_hand(real: Processor) -> None:
    conversation = [
        {"role": "user", "content": [A("n1"), T("What's that sound?")]},
        {"role": "assistant", "content": "Glass."},
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                                     T("And this?")]},
    ]
    assert real.render(conversation) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat's that sound?<|im_end|>\n"
        "<|im_start|>assistant\nGlass.<|im_end|>\n"
        "<|im_start|>user\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\nAnd this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert real.render(conversation, add_generation_prompt=False).endswith("And this?<|im_end|>\n")


@pytest.mark.parametrize("seconds,count", [(1.0, 25), (4.03, 101), (30.0, 750), (0.03, 1), (0.021, 1)])
def test_bare_placeholder_expands_by_hand(real: Processor, seconds: float, count: int) -> None:
    batch = real("<|AUDIO|>", audios=[np.zeros(round(seconds * SR), np.float32)])
    assert batch.token_ids == [[151647] + [151646] * count + [151648]]
    assert batch.audio_spans[0][0].offset == 1 and batch.audio_spans[0][0].length == count


def test_left_padding_by_hand(real: Processor) -> None:
    batch = real(["Hello, world!", "<|im_start|>user\n"])
    assert batch.input_ids.tolist() == [[9707, 11, 1879, 0], [151643, 151644, 872, 198]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]


def test_long_audio_is_split_into_windows() -> None:
    fixed = Processor.from_pretrained(REAL_DIR, segmentation="fixed")
    clip = np.zeros(40 * SR, np.float32)  # 30 s + 10 s windows: 750 + 250 tokens, not cut at 30 s
    batch = fixed([{"role": "user", "content": [{"type": "audio", "audio": clip}]}])
    (span,) = batch.audio_spans[0]
    assert (span.num_windows, span.length) == (2, 1000)
    assert batch.input_features.shape == (2, 128, 3000)
    assert batch.feature_attention_mask.sum(-1).tolist() == [3000, 1000]


# ---- errors -----------------------------------------------------------------------------------

def conv(*content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(content)}]


ONE_SECOND = np.zeros(SR, np.float32)

PROMPT_ERRORS = {
    "more_placeholders": (("<|AUDIO|> and <|AUDIO|>",), {"audios": [ONE_SECOND]},
                          "more <|AUDIO|> placeholders than audios were given (ran out at placeholder 2)"),
    "more_audios": (("<|AUDIO|>",), {"audios": [ONE_SECOND, ONE_SECOND]},
                    "1 audio(s) were given that no <|AUDIO|> placeholder takes"),
    "audios_for_a_conversation": ((conv(A("n1")),), {"audios": [ONE_SECOND]},
                                  "1 audio(s) were given that no <|AUDIO|> placeholder takes"),
    "placeholder_in_user_text": ((conv(A("n1"), T("<|AUDIO|>")),), {},
                                 "the prompt has 2 <|AUDIO|> placeholder(s) but 1 audio(s) were given"),
    "unknown_part_type": ((conv({"type": "video", "video": "clip.mp4"}),), {},
                          "messages[0].content[0]: unknown content part type 'video'"),
    "input_audio_not_object": ((conv({"type": "input_audio", "input_audio": "UklGRg=="}),), {},
                               "messages[0].content[0]: input_audio must be an object with base64 'data'"),
    "input_audio_without_data": ((conv(T("hi"), {"type": "input_audio", "input_audio": {"format": "wav"}}),), {},
                                 "messages[0].content[1]: input_audio must be an object with base64 'data'"),
    "audio_url_without_url": ((conv({"type": "audio_url", "audio_url": {"href": "x"}}),), {},
                              "messages[0].content[0]: audio_url must be an object with a 'url' string"),
    "part_not_object": ((conv(42),), {}, "messages[0].content[0] must be an object or a string, got int"),
    "text_not_string": ((conv({"type": "text", "text": 5}),), {}, "messages[0].content[0].text must be a string"),
    "content_wrong_type": (([{"role": "user", "content": 3}],), {},
                           "messages[0].content must be a string or a list of parts, got int"),
    "message_without_role": (([{"content": "hi"}],), {}, "messages[0].role must be a non-empty string"),
    "second_message_without_role": (([{"role": "user", "content": "hi"}, {"role": "", "content": "x"}],), {},
                                    "messages[1].role must be a non-empty string"),
    "message_not_object": (([["user", "hi"]],), {}, "messages[0] must be an object with 'role' and 'content'"),
    "dict_instead_of_list": (({"role": "user", "content": "hi"},), {},
                             "inputs must be a conversation, a string, or a list of them, not dict"),
    "batch_item_not_list": (([[{"role": "user", "content": "hi"}], 7],), {},
                            "a prompt must be a conversation (list of messages) or a string, not int"),
    "empty_conversation": (([[]],), {}, "a conversation must be a non-empty list of messages"),
    "empty_batch": (([],), {}, "no inputs given"),
}


@pytest.mark.parametrize("name", PROMPT_ERRORS)
def test_prompt_errors(real: Processor, name: str) -> None:
    args, kwargs, message = PROMPT_ERRORS[name]
    with pytest.raises(PromptError) as caught:
        real(*args, **kwargs)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, InputError)


def test_render_rejects_a_non_list_conversation(real: Processor) -> None:
    with pytest.raises(PromptError, match="a conversation must be a non-empty list of messages"):
        real.render("hello")  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="a conversation must be a non-empty list of messages"):
        real.render({"role": "user", "content": "hi"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "content,where",
    [
        ([A("n1"), {"type": "audio", "audio": np.zeros(320, np.float32)}], "messages[1].content[1]"),
        ([T("Listen: "), {"type": "audio", "audio": np.zeros(100, np.float32)}], "messages[1].content[1]"),
        ([{"type": "audio", "audio": str(DATA / "too_short_10ms.wav")}], "messages[1].content[0]"),
    ],
)
def test_too_short_audio_names_the_part(real: Processor, content: list, where: str) -> None:
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    with pytest.raises(AudioError) as caught:
        real(conversation)
    assert str(caught.value).startswith(where + ": ")
    assert "too short" in str(caught.value) and "20 ms" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_too_short_audio_for_a_raw_placeholder(real: Processor) -> None:
    with pytest.raises(AudioError, match=r"audio for placeholder 2: .*too short"):
        real("<|AUDIO|><|AUDIO|>", audios=[ONE_SECOND, np.zeros(160, np.float32)])


def test_bad_audio_sources_name_the_part(real: Processor) -> None:
    with pytest.raises(AudioError, match=r"^messages\[0\]\.content\[1\]: .*not valid base64"):
        real(conv(T("x"), {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,@@@@"}}))
    missing = r"^messages\[0\]\.content\[0\]: audio file '/nonexistent/clip\.wav': no such file"
    with pytest.raises(AudioError, match=missing):
        real(conv({"type": "audio", "audio": "/nonexistent/clip.wav"}))
    with pytest.raises(AudioError, match=r"^messages\[0\]\.content\[0\]: .*cannot decode"):
        garbage = base64.b64encode(b"x" * 64).decode()
        real(conv({"type": "input_audio", "input_audio": {"data": garbage, "format": "wav"}}))


def test_prompt_longer_than_the_context(real: Processor) -> None:
    small = Processor.from_pretrained(REAL_DIR, max_context=50)
    assert small.max_context == 50
    with pytest.raises(ContextLengthError, match=r"the prompt is \d+ tokens \(25 of them audio\), more than the "
                                                 r"model's context of 50"):
        small(conv(A("n1"), T("What is it?")))
    # A bare placeholder with 1 s of audio is 25 + 2 = 27 tokens: 27 fits, 26 does not.
    fits = Processor(real.tokenizer, real.chat_template, max_context=27)
    assert fits("<|AUDIO|>", audios=[ONE_SECOND]).input_ids.shape == (1, 27)
    with pytest.raises(PromptError, match=r"the prompt is 27 tokens \(25 of them audio\), more than the model's "
                                          r"context of 26"):
        Processor(real.tokenizer, real.chat_template, max_context=26)("<|AUDIO|>", audios=[ONE_SECOND])


def test_max_context_defaults_to_model_max_length(real: Processor) -> None:
    assert real.max_context == 8192  # tokenizer_config.json: model_max_length (no config.json here)


@pytest.mark.parametrize(
    "source,message",
    [
        ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message is required') }}{% endif %}",
         "the chat template refused the conversation: a system message is required"),
        ("{{ messages[0].content.foo.bar }}", "the chat template failed to render"),
        ("{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}", "the chat template does not compile"),
        ("{% for %}", "the chat template does not compile"),
    ],
)
def test_broken_chat_templates(real: Processor, source: str, message: str) -> None:
    with pytest.raises(PromptError) as caught:
        processor = Processor(real.tokenizer, ChatTemplate(source))
        processor([{"role": "user", "content": "hi"}])
    assert message in str(caught.value)


def test_a_non_qwen2_audio_tokenizer_is_refused(tmp_path: pathlib.Path, tiny_dir: pathlib.Path) -> None:
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                      if v["content"] not in SPECIALS[3:]}
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(PromptError, match=r"the tokenizer has no <\|AUDIO\|> token"):
        Processor(Tokenizer.from_dir(tmp_path), ChatTemplate("{{ messages }}"))


def test_placeholder_count_follows_the_checkpoints_feature_settings() -> None:
    """A preprocessor config with another hop length changes how many tokens a clip yields: the
    prompt's <|AUDIO|> run and the features it is paired with must both follow it (a default
    config in one place and the checkpoint's in the other disagreed)."""
    from qwen2audio.audio.features import FeatureConfig, FeatureExtractor

    real = Processor.from_pretrained(REAL_DIR)
    coarse = Processor(real.tokenizer, real.chat_template, FeatureExtractor(FeatureConfig(hop_length=320)))
    clip = _clip(7.0, 3)
    batch = coarse([[{"role": "user", "content": [{"type": "audio", "audio": clip}, T("Hi")]}]])
    placeholders = int((batch.input_ids == coarse.audio_id).sum())
    # 7 s at hop 320: 350 frames -> 175 after the stride-2 conv -> (175 - 2) // 2 + 1 = 87 after pooling
    assert placeholders == 87 == sum(batch.window_tokens)
    assert int(batch.feature_attention_mask.sum()) == 350


def test_a_chat_template_given_at_load_replaces_the_checkpoints() -> None:
    """`serve --chat-template FILE` hands the file's text to the processor, which renders with it."""
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}ASSISTANT:"
    processor = Processor.from_pretrained(REAL_DIR, chat_template=template)
    prompt = processor.prepare([{"role": "user", "content": "Hello there"}])
    assert processor.tokenizer.decode(prompt.token_ids) == "[user] Hello there\nASSISTANT:"
    assert processor.chat_template.has_checkpoint_template


def test_audio_past_the_context_is_refused_before_its_windows_are_planned(monkeypatch):
    """Ten minutes cannot fit 4096 tokens however they are cut: refused without running the VAD.
    The bound never exceeds the real count: checked by hand-free comparison over many lengths."""
    import qwen2audio.audio.segment as segment

    processor = Processor.from_pretrained(REAL_DIR, max_context=4096)
    monkeypatch.setattr(segment, "speech_spans", lambda samples: pytest.fail("the VAD ran"))
    with pytest.raises(ContextLengthError, match=r"at least 14\d\d\d audio tokens \(600 s of audio\), more than "
                                                 r"the model's context of 4096"):
        processor(conv({"type": "audio", "audio": np.zeros(600 * SR, np.float32)}))
    from qwen2audio.audio.features import FeatureConfig, audio_token_count, frame_count
    from qwen2audio.processor import audio_tokens_at_least

    config, rng = FeatureConfig(), np.random.default_rng(0)
    for n in [*rng.integers(321, 19_200_000, 300), 480_000, 480_321, 960_000]:
        cuts, start = [], 0  # a random cut: every window but the last at least half of 30 s
        while n - start > 480_000:
            start += int(rng.integers(240_000, 480_001))
            cuts.append(start)
        edges = [0, *cuts, n]
        tokens = sum(audio_token_count(frame_count(b - a, config)) for a, b in itertools.pairwise(edges))
        assert audio_tokens_at_least(int(n), config) <= tokens, n
