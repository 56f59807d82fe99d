"""Tokenizer and streaming detokenizer against transformers' Qwen2Tokenizer on the real vocabulary.

The oracle is transformers' ``Qwen2Tokenizer`` loaded from the same vocab.json + merges.txt +
tokenizer_config.json (tests/data/qwen2-tokenizer/); the spot checks come from that folder's README.
"""

from __future__ import annotations

import pathlib
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2audio.text.tokenizer import Tokenizer

VOCAB_DIR = pathlib.Path(__file__).parent / "data" / "qwen2-tokenizer"
SPECIAL_IDS = list(range(151643, 151649))  # <|endoftext|> ... <|audio_eos|> (SPEC.md section 4)
LAST_ID = 151648

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm; isn't it? We'll see, they'd've said \"no\".",
    "contractions_upper": "I'M HERE, YOU'RE THERE, IT'S FINE, WE'VE GOT IT, THEY'LL GO, HE'D SAY, DON'T",
    "numbers": "1234567890 3.14159 -42 1e-10 0x1F 12,345,678 ٣٤٥ ①②③ ¼",
    "chinese": "今天天气很好，我们去公园散步吧。语音识别（ASR）是一项技术，准确率达到了98.5%。",
    "japanese": "こんにちは、世界！カタカナとひらがな、漢字を混ぜた文章です。ｶﾀｶﾅ（半角）も。",
    "korean": "안녕하세요, 세계! 한국어 문장입니다. 음성 인식은 재미있어요.",
    "arabic": "مرحبا بالعالم! هذه جملة عربية مع أرقام ١٢٣ وعلامات الترقيم؟",
    "other_scripts": "Съешь же ещё этих мягких французских булок. नमस्ते दुनिया สวัสดีชาวโลก שלום עולם Γειά σου",
    "python": 'def f(x):\n\treturn {"a": [1, 2, 3]}  # comment\n\n'
              'if __name__ == "__main__":\n    print(f"{x!r:>10}")\n',
    "c_crlf": "for (int i = 0; i < n; ++i) {\r\n    a[i] <<= 2; // C++\r\n}\r\n",
    "json": '{"key": "value", "list": [true, false, null], "nested": {"π": 3.14}}',
    "emoji": "I ❤️ 🐍! 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🧑🏿‍💻 🇯🇵🇺🇸 #️⃣ 😀😃😄",
    "tabs": "tab\tseparated\tvalues\t\t\nend\t",
    "crlf": "windows\r\nline\r\nendings\r\n\r\n\rlone cr\r",
    "space_runs": "runs     of      spaces   and\n\n\n   newlines    ",
    "edge_spaces": "  leading and trailing  ",
    "nbsp": "nbsp\u00a0here\u00a0\u00a0and\u202fnarrow\u2009thin\u3000ideographic",
    "zero_width": "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom\u2060wj",
    "combining": "e\u0301cole cafe\u0301 n\u0303 A\u030a \u0041\u0308\u0304 o\u0308\u0301",
    "hangul_jamo": "\u1112\u1161\u11ab\u1100\u1173\u11af \u1100\u1161",
    "compat_letters": "\u212b\u2126 \u212a ﬁ ｆｕｌｌｗｉｄｔｈ",
    "special_tokens": "<|im_start|>user\nhi<|im_end|>\n<|AUDIO|><|audio_bos|>x<|audio_eos|><|endoftext|>",
    "near_miss_specials": "<|im_start |> <|AUDIO|  <| im_end|> |>",
    "mixed": "Hello世界123abc😀 مرحبا\tçà va?",
    "repeats": "a" * 300 + " " + "ab " * 50 + "🙂" * 20 + "1" * 40,
    "whitespace_only": " \t\n\r\n \u00a0 ",
    "single_space": " ",
    "empty": "",
}


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_dir(VOCAB_DIR)


@pytest.fixture(scope="module")
def oracle():
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(VOCAB_DIR)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    return tokenizer


@pytest.fixture(scope="module")
def from_tokenizer_json(tmp_path_factory, oracle) -> Tokenizer:
    """Our Tokenizer read from a tokenizer.json that transformers wrote (no vocab.json/merges.txt)."""
    directory = tmp_path_factory.mktemp("tokenizer_json")
    oracle.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        (directory / name).unlink(missing_ok=True)
    assert (directory / "tokenizer.json").is_file()
    return Tokenizer.from_dir(directory)


def test_readme_spot_checks(ours: Tokenizer) -> None:
    assert ours.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert ours.encode("<|im_start|>user\n") == [151644, 872, 198]


def test_special_token_ids(ours: Tokenizer) -> None:
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
    assert [ours.token_to_id(name) for name in names] == SPECIAL_IDS
    assert ours.eos_id == 151645 and ours.pad_id == 151643
    assert ours.special_ids == frozenset(SPECIAL_IDS)
    assert ours.vocab_size == 151649
    assert ours.model_max_length == 8192


@pytest.mark.parametrize("name", CORPUS)
def test_encode_matches_transformers(ours: Tokenizer, oracle, name: str) -> None:
    text = CORPUS[name]
    expected = oracle.encode(text, add_special_tokens=False)
    assert ours.encode(text) == expected
    assert ours.decode(expected, skip_special_tokens=False) == oracle.decode(expected, skip_special_tokens=False)
    assert ours.decode(expected) == oracle.decode(expected, skip_special_tokens=True)
    # Round trip: decoding gives back the NFC form of the input (tests/data/qwen2-tokenizer/README.md).
    assert ours.decode(expected, skip_special_tokens=False) == unicodedata.normalize("NFC", text)


def test_nfc_is_applied_before_splitting(ours: Tokenizer) -> None:
    assert ours.encode("e\u0301cole") == ours.encode("\u00e9cole")
    assert ours.encode("\u212b") == ours.encode("\u00c5")


def test_encode_batch_matches_transformers(ours: Tokenizer, oracle) -> None:
    texts = list(CORPUS.values())
    assert ours.encode_batch(texts) == [oracle.encode(t, add_special_tokens=False) for t in texts]


def test_tokenizer_json_and_vocab_merges_agree(ours: Tokenizer, from_tokenizer_json: Tokenizer) -> None:
    for text in CORPUS.values():
        assert from_tokenizer_json.encode(text) == ours.encode(text), text
    assert from_tokenizer_json.special_ids == ours.special_ids
    assert (from_tokenizer_json.eos_id, from_tokenizer_json.pad_id) == (ours.eos_id, ours.pad_id)
    ids = ours.encode(CORPUS["special_tokens"] + CORPUS["emoji"])
    assert from_tokenizer_json.decode(ids) == ours.decode(ids)


MESSY = " \t\r\n\u00a0\u3000\u200d\u0301ab1'sSé中文😀👍🏽-_.,!?<|>"


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(max_size=80), st.text(alphabet=MESSY, max_size=80)))
def test_random_text_matches_transformers(ours: Tokenizer, oracle, text: str) -> None:
    assert ours.encode(text) == oracle.encode(text, add_special_tokens=False)


# ---- streaming detokenization -------------------------------------------------------------------

def stream(tokenizer: Tokenizer, ids, stop=(), skip_special_tokens: bool = True):
    """Feed ids one by one; return (deltas from add, delta from finish, the detokenizer)."""
    detok = tokenizer.detokenizer(stop=stop, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.finish(), detok


CJK_EMOJI_TEXT = "你好世界，语音识别。こんにちは한국어😀🫠𠀋龘👨‍👩‍👧‍👦🇯🇵é"


STREAM_ALPHABET = CJK_EMOJI_TEXT + " a\n\u0301"


@pytest.fixture(scope="module")
def multibyte_ids(ours: Tokenizer) -> list[int]:
    ids = ours.encode(CJK_EMOJI_TEXT)
    # The point of these ids: several are byte fragments that do not decode on their own.
    assert any("\ufffd" in ours.decode([i]) for i in ids)
    return ids


def any_ids(multibyte_ids: list[int]):
    return st.lists(
        st.one_of(
            st.integers(0, LAST_ID),
            st.sampled_from(SPECIAL_IDS),
            st.sampled_from(multibyte_ids),
        ),
        max_size=40,
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_streaming_equals_one_shot_decode_of_random_ids(ours: Tokenizer, oracle, multibyte_ids, data) -> None:
    ids = data.draw(any_ids(multibyte_ids))
    skip = data.draw(st.booleans())
    deltas, last, detok = stream(ours, ids, skip_special_tokens=skip)
    expected = oracle.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + last == expected
    assert detok.output == expected and detok.stopped_on is None


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet=st.characters(blacklist_characters="\ufffd", blacklist_categories=("Cs",)), max_size=40)
    | st.text(alphabet=STREAM_ALPHABET, max_size=40),
    data=st.data(),
)
def test_streaming_valid_text_never_shows_a_replacement_char(ours: Tokenizer, oracle, text: str, data) -> None:
    ids = ours.encode(text)
    # Special tokens between (and inside) characters are skipped without breaking the byte stream.
    for _ in range(data.draw(st.integers(0, 3))):
        ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.sampled_from(SPECIAL_IDS)))
    deltas, last, _ = stream(ours, ids)
    assert all("\ufffd" not in d for d in [*deltas, last])
    assert "".join(deltas) + last == oracle.decode(ids, skip_special_tokens=True)
    if set(text) <= set(STREAM_ALPHABET):
        # Not for any text: the tokenizers library's NFC tables predate Unicode 14 (e.g. it leaves
        # U+0301 U+1ACA unordered), while Python's unicodedata reorders them.
        assert "".join(deltas) + last == unicodedata.normalize("NFC", text)


def test_multibyte_characters_are_released_whole(ours: Tokenizer, multibyte_ids: list[int]) -> None:
    deltas, last, _ = stream(ours, multibyte_ids)
    assert last == ""  # nothing is held without stop strings once the last byte arrived
    assert "".join(deltas) == unicodedata.normalize("NFC", CJK_EMOJI_TEXT)
    assert "" in deltas  # at least one token was a fragment that released nothing yet


def test_ascii_is_released_token_by_token(ours: Tokenizer) -> None:
    ids = ours.encode("The quick brown fox")
    deltas, last, _ = stream(ours, ids)
    assert deltas == ["The", " quick", " brown", " fox"] and last == ""


def test_incomplete_bytes_at_the_end_become_one_replacement_char(ours: Tokenizer, oracle) -> None:
    ids = ours.encode("a🫠")
    assert [ours.token_bytes(i) for i in ids] == [b"a", b"\xf0\x9f", b"\xab", b"\xa0"]
    deltas, last, _ = stream(ours, ids[:-1])
    assert deltas == ["a", "", ""] and last == "\ufffd"
    assert oracle.decode(ids[:-1]) == "a\ufffd"


def test_stop_string_spanning_tokens_truncates_before_it(ours: Tokenizer) -> None:
    text = "The quick brown fox jumps"
    ids = ours.encode(text)
    assert ours.decode(ids[2:3]) == " brown" and ours.decode(ids[3:4]) == " fox"  # spans two tokens
    deltas, last, detok = stream(ours, ids, stop=["brown fox"])
    assert "".join(deltas) + last == "The quick "
    assert detok.output == "The quick " and detok.stopped_on == "brown fox"
    assert detok.add(ours.encode(" more")[0]) == ""  # nothing after the stop


def test_earliest_stop_wins_and_inside_multibyte_text(ours: Tokenizer) -> None:
    deltas, last, detok = stream(ours, ours.encode("你好世界和平，世界"), stop=["和平", "世界"])
    assert "".join(deltas) + last == "你好" and detok.stopped_on == "世界"
    deltas, last, detok = stream(ours, ours.encode("Hello 👨‍👩‍👧‍👦 family"), stop=["👩"])
    assert "".join(deltas) + last == "Hello 👨\u200d" and detok.stopped_on == "👩"


def test_partial_stop_match_is_released_at_finish(ours: Tokenizer) -> None:
    deltas, last, detok = stream(ours, ours.encode("The quick brown"), stop=["brown fox"])
    assert "".join(deltas) == "The quick "  # "brown" could still become "brown fox": held back
    assert last == "brown"
    assert detok.output == "The quick brown" and detok.stopped_on is None


def test_held_back_text_is_released_once_it_cannot_match(ours: Tokenizer) -> None:
    deltas, last, detok = stream(ours, ours.encode("The quick brown dog"), stop=["brown fox"])
    assert "".join(deltas) == "The quick brown dog" and last == ""
    assert detok.stopped_on is None


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="ab c中😀\n", min_size=1, max_size=30), data=st.data())
def test_random_stop_string_truncates_at_its_first_occurrence(ours: Tokenizer, text: str, data) -> None:
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start:data.draw(st.integers(start + 1, min(len(text), start + 5)))]
    deltas, last, detok = stream(ours, ours.encode(text), stop=[stop])
    assert "".join(deltas) + last == text[: text.find(stop)]
    assert detok.stopped_on == stop


def test_a_lone_surrogate_is_a_prompt_error(ours: Tokenizer) -> None:
    """JSON's "\\ud83d" escape yields a str with half a surrogate pair, which has no UTF-8 form."""
    from qwen2audio.errors import PromptError

    with pytest.raises(PromptError, match="unpaired surrogate U\\+D83D at character 5"):
        ours.encode("smile\ud83d")
    with pytest.raises(PromptError, match="U\\+DC00"):
        ours.encode_batch(["fine", "x\udc00"])
    assert ours.encode("smile\U0001f600") == ours.encode("smile😀")  # a whole pair is fine
