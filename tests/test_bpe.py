"""The trained byte-level BPE: layout, exact round trips on any text, GPT-2's split, determinism
across thread counts, the vocabulary range, bad files, the saved record, Hugging Face parity."""

import json
import multiprocessing
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from gptforge.errors import GptforgeError
from gptforge.tokenizer import CHATML_TEMPLATE
from gptforge.tokenizer import (
    BPE_FILE,
    MAX_VOCAB_SIZE,
    BPETokenizer,
    GPT2Tokenizer,
    gpt2_vocab_files,
    hf_tokenizer_files,
    load_bpe,
    tokenizer_from_dict,
    train_bpe,
)
from gptforge.tokenizer.bpe import BYTE_CHARS

SRC = Path(__file__).resolve().parents[1] / "src"
VOCAB = 1024

MIXED = ("Hello, world! It's 3.14159 — naïve café.\n\n\n   Indented\tand\ttabbed  \r\n"
         "中文字和标点。한국어 문장. Русский текст. العربية. हिन्दी. ไทย\n"
         "emoji 🤖🎉👍🏽👨‍👩‍👧 flags 🇫🇷 \x00NUL \x01\x1b[0m ctrl \x7f \u200b\u3000\u00a0 "
         "\u0301lone combining mark, e\u0301 precomposed é,   trailing spaces   ")


def corpus(n_docs: int = 400, seed: int = 0) -> list[str]:
    """Documents of pseudo-words in several scripts with a skewed word frequency, punctuation,
    numbers and whitespace runs: a few hundred kB, the same on every machine."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "men", "sho", "la", "ve", "qu", "ст", "ра", "но", "中", "文",
                 "字", "한", "국", "αι", "ου", "ش", "ع", "🙂"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    weights = [1 / (i + 1) for i in range(len(words))]
    docs = []
    for _ in range(n_docs):
        parts = []
        for w in rng.choices(words, weights, k=rng.randint(50, 300)):
            parts.append(w + rng.choice(["", "", "", ",", ".", "!", " 42", "'s"]))
            parts.append(rng.choice([" ", " ", " ", "\n", "\n\n", "  ", "\t"]))
        docs.append("".join(parts))
    return docs


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return corpus()


@pytest.fixture(scope="module")
def tok(docs) -> BPETokenizer:
    return train_bpe(docs, VOCAB)


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


def test_layout_is_gpt2s(tok):
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("bpe", VOCAB, VOCAB - 1)
    assert (tok.im_start_id, tok.im_end_id) == (VOCAB - 3, VOCAB - 2)  # reserved for chat
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.decode([VOCAB - 3, VOCAB - 2]) == "<|im_start|><|im_end|>"
    assert tok.encode("<|im_start|>") != [VOCAB - 3]  # text never forges a special token
    # ids 0..255 are the bytes, in GPT-2's own order
    vocab = json.loads(tok.file_bytes())["model"]["vocab"]
    gpt2_vocab = json.loads(Path(gpt2_vocab_files()[1]).read_text(encoding="utf-8"))
    assert [vocab[c] for c in BYTE_CHARS] == [gpt2_vocab[c] for c in BYTE_CHARS]
    assert sorted(vocab[c] for c in BYTE_CHARS) == list(range(256))
    lengths = tok.token_bytes()
    assert lengths.shape == (VOCAB,) and lengths[tok.eot_id] == 0
    assert (lengths[:256] == 1).all() and (lengths[256:-3] >= 2).all() and (lengths[-3:] == 0).all()
    assert not lengths.flags.writeable


def test_byte_chars_are_the_librarys(tok):
    assert set(BYTE_CHARS) == set(pre_tokenizers.ByteLevel.alphabet())
    mapping = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in ["".join(map(chr, range(128))), "é中🤖\U0010ffff\x80\u00ad"]:
        ((mapped, _),) = mapping.pre_tokenize_str(text)
        assert mapped == "".join(BYTE_CHARS[b] for b in text.encode("utf-8"))


@pytest.mark.parametrize("text", [
    "", " ", "\x00", "\n\n\n", "   \t  ", MIXED, "\u0301", "<|endoftext|>", "a<|endoftext|>b",
    "🤖" * 50, " " * 1000, "x\r\ny\rz\x0b\x0c\x1c\x1d\x85\u2028\u2029",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids  # a document cannot forge the separator
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
    assert tok.encode_array(text).tolist() == ids and tok.encode_array(text).dtype == np.uint32


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=60), max_size=4))
def test_any_text_round_trips(tok, texts):
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    for text, ids in zip(texts, batch):
        assert tok.decode(ids) == text
        assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_lone_surrogates_become_replacement_characters(tok, gpt2):
    text = "a\ud800b \udfff"  # what a JSON "\ud800" escape gives
    assert tok.decode(tok.encode(text)) == gpt2.decode(gpt2.encode(text)) == "a\ufffdb \ufffd"
    assert tok.encode_batch([text, "ok"]) == [tok.encode(text), tok.encode("ok")]
    assert train_bpe([text] * 3, 260).vocab_size == 260


def test_decode_refuses_ids_outside(tok):
    with pytest.raises(GptforgeError, match=f"token id {VOCAB} is outside"):
        tok.decode([1, VOCAB])
    first_of_three = json.loads(tok.file_bytes())["model"]["vocab"][BYTE_CHARS[0xE4]]
    assert tok.decode([first_of_three]) == "\ufffd"  # a character cut short, as tiktoken shows it


# -----------------------------------------------------------------------------
# GPT-2's split: our pipeline with GPT-2's own vocabulary is tiktoken, id for id


def gpt2_in_our_pipeline(tok: BPETokenizer) -> BPETokenizer:
    vocab_bpe, encoder_json = gpt2_vocab_files()
    spec = json.loads(tok.file_bytes())
    spec["model"]["vocab"] = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:]
    spec["model"]["merges"] = [line.split(" ") for line in lines if line]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] == "<|endoftext|>"]
    spec["added_tokens"][0]["id"] = 50256  # GPT-2's own: no ChatML tokens
    return BPETokenizer(json.dumps(spec).encode(), "gpt2-in-bpe")


@pytest.fixture(scope="module")
def gpt2_as_bpe(tok) -> BPETokenizer:
    return gpt2_in_our_pipeline(tok)


# Hugging Face's ByteLevel with its built-in regex: OpenAI's original spelling of GPT-2's split,
# which a loaded tokenizer.json may use instead of our Split by the possessive spelling.
BUILT_IN = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def assert_splits_as_gpt2(tok: BPETokenizer, ours: BPETokenizer, gpt2: GPT2Tokenizer, text: str):
    assert ours.encode(text) == gpt2.encode(text)
    assert BUILT_IN.pre_tokenize_str(text) == tok._hf.pre_tokenizer.pre_tokenize_str(text)


def test_gpt2_split_matches_tiktoken(tok, gpt2_as_bpe, gpt2, docs):
    assert gpt2_as_bpe.vocab_size == 50257 and gpt2_as_bpe.eot_id == 50256
    for text in [MIXED, docs[0], "it's  they'll  I'D  'S  x  \n  \n\n y  "]:
        assert_splits_as_gpt2(tok, gpt2_as_bpe, gpt2, text)
    assert (gpt2_as_bpe.token_bytes() == gpt2.token_bytes()).all()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
       | st.text(alphabet=" \t\n\r\x0b\x0c\x1c\x85\u00a0\u2028\u3000'sdlvmtre1.a中🤖", max_size=40))
def test_gpt2_split_matches_tiktoken_on_any_text(tok, gpt2_as_bpe, gpt2, text):
    assert_splits_as_gpt2(tok, gpt2_as_bpe, gpt2, text)


# -----------------------------------------------------------------------------
# determinism


SMALL = dict(n_docs=120, vocab=700)  # the determinism runs: small, as four trainings are made


def train_in_subprocess(env: dict[str, str]) -> str:
    """sha256 of a training run in a fresh process (the thread pool's size is fixed at its first
    use). The package's __init__ (torch) is skipped: only the tokenizer is imported."""
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('gptforge'); pkg.__path__ = [{str(SRC / 'gptforge')!r}]\n"
        "sys.modules['gptforge'] = pkg\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_bpe import corpus, SMALL\n"
        "from gptforge.tokenizer.bpe import train_bpe\n"
        "print(train_bpe(corpus(SMALL['n_docs']), SMALL['vocab']).sha256)\n"
    )
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RAYON_RS_NUM_THREADS", "RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_training_is_deterministic_whatever_the_threads(monkeypatch):
    docs = corpus(SMALL["n_docs"])
    first = train_bpe(docs, SMALL["vocab"])  # this process's pool: one thread per core
    assert train_bpe(docs, SMALL["vocab"]).file_bytes() == first.file_bytes()  # new hash keys
    # Only how often each piece of text occurs matters, not the order of the documents.
    assert train_bpe(docs[::-1], SMALL["vocab"]).sha256 == first.sha256
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # read at each call: serial
    assert train_bpe(docs, SMALL["vocab"]).sha256 == first.sha256
    assert train_in_subprocess({"RAYON_RS_NUM_THREADS": "1"}) == first.sha256
    assert train_in_subprocess({"RAYON_RS_NUM_THREADS": "4"}) == first.sha256


# -----------------------------------------------------------------------------
# the vocabulary's range


@pytest.mark.parametrize("size", [0, 258, MAX_VOCAB_SIZE + 1, 10**9, 1000.0, True])
def test_vocab_size_out_of_range(size):
    with pytest.raises(GptforgeError, match=r"259 \(the 256 bytes, <\|im_start\|>, <\|im_end\|> and "
                                            r"<\|endoftext\|>\) to 131,072"):
        train_bpe(["some text"], size)


def test_smallest_vocabulary_is_the_bytes():
    tok = train_bpe(["hello hello hello"], 259)
    assert tok.vocab_size == 259 and tok.eot_id == 258
    assert tok.encode("hello") == [ord(c) - ord("!") for c in "hello"]  # printable ASCII: '!'..'~'


def test_corpus_too_small():
    with pytest.raises(GptforgeError) as e:
        train_bpe(["the cat sat on the mat", "the cat"], 5000)
    msg = str(e.value)
    assert "5,000" in msg and "stopped at 264" in msg and "more text" in msg
    assert "vocabulary size of 264 or less" in msg
    assert train_bpe(["the cat sat on the mat", "the cat"], 264).vocab_size == 264


def wide_tokenizer_file(directory: Path) -> dict[str, int]:
    """A vocabulary of every 2-byte token (65,536 merges + 256 bytes + eot) written as
    directory/tokenizer.json: ids that need uint32, built directly (training one that large
    takes seconds, see BENCHMARKS.md). Pairs starting with "e" are merged last, so "ex" gets an
    id above 65,535. Returns the vocabulary."""
    spec = json.loads(train_bpe(["x"], 259).file_bytes())
    vocab = dict(spec["model"]["vocab"])
    firsts = [c for c in BYTE_CHARS if c != "e"] + ["e"]
    merges = [[a, b] for a in firsts for b in BYTE_CHARS]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    spec["model"]["vocab"], spec["model"]["merges"] = vocab, merges
    for i, added in enumerate(spec["added_tokens"]):  # the ChatML tokens, then eot, after them
        added["id"] = len(vocab) + i
    (directory / BPE_FILE).write_text(json.dumps(spec), encoding="utf-8")
    return vocab


def test_ids_above_65535(tmp_path):
    vocab = wide_tokenizer_file(tmp_path)
    wide = load_bpe(tmp_path)
    assert wide.vocab_size == 256 + 65536 + 3 and wide.eot_id == 65794
    text = "ex: " + MIXED
    ids = wide.encode(text)
    assert ids[0] == vocab["ex"] > 65535 and wide.encode_array(text)[0] == ids[0]
    assert wide.decode(ids) == text
    assert int(wide.token_bytes()[ids].sum()) == len(text.encode())


# -----------------------------------------------------------------------------
# files: loading, bad files, the saved record


def hf_file(tmp_path: Path, tok: HFTokenizer) -> Path:
    path = tmp_path / "other.json"
    tok.save(str(path))
    return path


def test_load_file_and_directory(tok, tmp_path):
    (tmp_path / BPE_FILE).write_bytes(tok.file_bytes())
    for where in (tmp_path, tmp_path / BPE_FILE, str(tmp_path)):
        again = load_bpe(where)
        assert again.sha256 == tok.sha256 and again.encode(MIXED) == tok.encode(MIXED)


def bad_files(tok: BPETokenizer, tmp_path: Path) -> list[tuple[Path, str]]:
    good = json.loads(tok.file_bytes())
    cases = []

    def write(name: str, data: bytes | str, why: str) -> None:
        path = tmp_path / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        cases.append((path, why))

    def variant(name: str, why: str, **changes) -> None:
        spec = json.loads(json.dumps(good))
        for key, value in changes.items():
            spec[key] = value
        write(name, json.dumps(spec), why)

    write("truncated.json", tok.file_bytes()[:1000], "invalid JSON")
    write("empty.json", b"", "is empty")
    write("binary.json", b"\x80\x81\xfe\xff" * 10, "not UTF-8")
    write("list.json", "[1, 2, 3]", "not a tokenizer")
    write("config.json", json.dumps({"vocab_size": 50257, "n_layer": 12}), "not a tokenizer")
    wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    cases.append((hf_file(tmp_path, wordpiece), "model is 'WordPiece'"))
    variant("nfc.json", "normalizer (NFC)", normalizer={"type": "NFC"})
    variant("prefix.json", "pre-tokenizer", pre_tokenizer={
        "type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True})
    variant("gpt4split.json", "pre-tokenizer", pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}| ?\p{L}+|\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]})
    variant("noeot.json", "no special <|endoftext|>", added_tokens=[])
    variant("template.json", "adds tokens to every text", post_processor={
        "type": "TemplateProcessing", "single": [], "pair": [], "special_tokens": {}})
    variant("metaspace.json", "decoder", decoder={"type": "Metaspace", "replacement": "▁",
                                                  "prepend_scheme": "always", "split": True})
    broken = json.loads(json.dumps(good))
    del broken["model"]["vocab"][BYTE_CHARS[0]]
    write("nobyte.json", json.dumps(broken), "no token for byte 0")
    broken = json.loads(json.dumps(good))
    broken["model"]["vocab"][next(iter(broken["model"]["vocab"].keys().__reversed__()))] = 99999
    write("gap.json", json.dumps(broken), "without gaps")
    broken = json.loads(json.dumps(good))
    broken["added_tokens"][0]["special"] = False
    write("notspecial.json", json.dumps(broken), "non-special token")
    return cases


def test_bad_files_are_refused_in_one_line(tok, tmp_path):
    for path, why in bad_files(tok, tmp_path):
        with pytest.raises(GptforgeError) as e:
            load_bpe(path)
        msg = str(e.value)
        assert str(path) in msg and why in msg and "\n" not in msg, (path.name, msg)
    with pytest.raises(GptforgeError, match="holds no tokenizer.json"):
        load_bpe(tmp_path)
    with pytest.raises(GptforgeError, match="does not exist"):
        load_bpe(tmp_path / "missing.json")


def test_record_round_trip(tok, tmp_path):
    record = json.loads(json.dumps(tok.to_dict()))
    assert record == {"name": "bpe", "vocab_size": VOCAB, "eot_id": VOCAB - 1,
                      "file": BPE_FILE, "sha256": tok.sha256, "chat_template": CHATML_TEMPLATE}
    from hashlib import sha256
    assert sha256(tok.file_bytes()).hexdigest() == tok.sha256
    assert tokenizer_from_dict(record, data=tok.file_bytes()).encode(MIXED) == tok.encode(MIXED)
    (tmp_path / BPE_FILE).write_bytes(tok.file_bytes())
    assert tokenizer_from_dict(record, directory=tmp_path).sha256 == tok.sha256
    # a tokenizer this process has read is rebuilt from its record alone; another needs its file
    assert tokenizer_from_dict(record) is tok
    with pytest.raises(GptforgeError, match="in its tokenizer.json"):
        tokenizer_from_dict({**record, "sha256": "0" * 64})
    other = train_bpe(corpus(50, seed=1), 300)
    (tmp_path / BPE_FILE).write_bytes(other.file_bytes())
    with pytest.raises(GptforgeError, match="is not the tokenizer recorded"):
        tokenizer_from_dict(record, directory=tmp_path)
    with pytest.raises(GptforgeError, match="no file name or sha256"):
        tokenizer_from_dict({"name": "bpe"}, data=tok.file_bytes())


def test_pickles_as_its_file(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.sha256 == tok.sha256 and again.encode(MIXED) == tok.encode(MIXED)


def _encode_in_child(tok: BPETokenizer, out) -> None:
    out.put(tok.encode_batch([MIXED] * 64)[0])


def test_forked_workers_do_not_deadlock(tok, monkeypatch):
    """A child forked after the Rust thread pool started cannot use it. The library turns it off
    only where TOKENIZERS_PARALLELISM is unset; gptforge turns it off in any case."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    tok.encode_batch([MIXED] * 64)  # the pool runs in this process
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_encode_in_child, args=(tok, out))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child deadlocked in the tokenizer's thread pool")
    assert child.exitcode == 0 and out.get(timeout=5) == tok.encode(MIXED)


# -----------------------------------------------------------------------------
# Hugging Face


def test_autotokenizer_gives_the_same_ids(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    for name, data in hf_tokenizer_files(tok, model_max_length=256).items():
        (tmp_path / name).write_bytes(data)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(MIXED) == tok.encode(MIXED)
    assert hf.decode(tok.encode(MIXED)) == MIXED
    assert hf.eos_token_id == hf.bos_token_id == tok.eot_id
    assert len(hf) == tok.vocab_size and hf.model_max_length == 256
