"""Evaluation: exact loss over every token, known answers, the CLI, and bad input in one line."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import run_cli, shakespeare_head

from gptforge import GPT, GPTConfig
from gptforge.data import load_split, prepare
from gptforge.evaluate import HeldOut, evaluate, heldout_loss
from gptforge.hf import write_hf_dir
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer, train_bpe


def tiny(vocab: int, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("gpt2-tiny", vocab_size=vocab, **kw)).eval()


def test_uniform_logits_give_ln_v():
    model = tiny(50, pad_vocab_multiple=64)  # padded rows must not dilute the distribution
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution over 50 tokens
    tokens = np.random.default_rng(0).integers(0, 50, size=203)
    r = evaluate(model, tokens, seq_len=16, batch_size=3)
    assert r.loss == pytest.approx(math.log(50), abs=1e-6)
    assert r.perplexity == pytest.approx(50.0, rel=1e-5)
    assert (r.tokens, r.windows, r.tail) == (202, 12, 10)  # 12 x 16 + 10 = every token but the first


def test_equals_the_mean_over_the_same_windows_by_hand():
    model = tiny(50)
    tokens = np.random.default_rng(1).integers(0, 50, size=100)
    r = evaluate(model, tokens, seq_len=16, batch_size=4)
    t = torch.from_numpy(tokens)
    nats = []
    with torch.no_grad():
        for a in list(range(0, 96, 16)) + [96]:  # 6 windows of 16, then the 3 left over
            b = min(a + 16, 99)
            logits, _ = model(t[a:b][None])
            nats.append(F.cross_entropy(logits[0], t[a + 1:b + 1], reduction="none"))
    expected = torch.cat(nats).double().mean().item()
    assert torch.cat(nats).numel() == 99
    assert r.loss == pytest.approx(expected, rel=1e-6)
    # Batching does not change the answer.
    assert evaluate(model, tokens, 16, batch_size=1).loss == pytest.approx(r.loss, rel=1e-6)


def test_bits_per_byte_known_answer():
    """Uniform over 4 ids: every prediction costs ln 4 nats = exactly 2 bits. The targets 1, 3, 2,
    0, 1 decode to 2 + 4 + 0 + 1 + 2 = 9 bytes (id 2 stands for a separator, 0 bytes: its 2 bits
    stay in the sum), so bpb = 5 x 2 / 9."""
    model = tiny(4, pad_vocab_multiple=64)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    token_bytes = np.array([1, 2, 0, 4], dtype=np.int32)
    r = evaluate(model, np.array([0, 1, 3, 2, 0, 1]), seq_len=4, batch_size=1, token_bytes=token_bytes)
    assert (r.tokens, r.bytes) == (5, 9)
    assert r.loss == pytest.approx(math.log(4), abs=1e-6)
    assert r.bits_per_byte == pytest.approx(10 / 9, abs=1e-6)
    assert evaluate(model, np.array([0, 1, 3]), seq_len=4).bits_per_byte is None  # no table given
    # Arithmetic on the sums alone, by hand: 9 nats over 3 bytes is 3 / ln 2 bits per byte.
    assert HeldOut(9.0, 4, 3).bits_per_byte == pytest.approx(3 / math.log(2))
    assert HeldOut(1.0, 1, None).bits_per_byte is None and math.isnan(HeldOut(1.0, 1, 0).bits_per_byte)


def test_bits_per_byte_shards_add_up_to_one_process():
    model = tiny(50)
    tokens = torch.from_numpy(np.random.default_rng(2).integers(0, 50, size=(6, 9)))
    batches = [(t[None, :-1], t[None, 1:]) for t in tokens]
    table = np.random.default_rng(3).integers(0, 5, size=50)
    whole = heldout_loss(model, batches, "cpu", token_bytes=table)
    parts = [heldout_loss(model, batches, "cpu", shard=(r, 2), token_bytes=table) for r in (0, 1)]
    assert whole.bytes == sum(p.bytes for p in parts) == int(table[tokens[:, 1:].numpy()].sum())
    assert whole.nats == pytest.approx(sum(p.nats for p in parts), rel=1e-9)


@pytest.fixture(scope="module")
def mixed_text() -> str:
    """Multi-byte characters of 2, 3 and 4 bytes, so a token's bytes are not its characters."""
    return shakespeare_head(1_500) + "\nnaïve café — 東京 🙂 Ελληνικά\n" * 3


@pytest.mark.parametrize("kind", ["gpt2", "char", "bpe"])
def test_bits_per_byte_counts_the_texts_bytes_for_every_tokenizer(kind, mixed_text):
    """The predicted tokens decode to every byte of the text but the first token's."""
    tok = {"gpt2": GPT2Tokenizer, "char": lambda: CharTokenizer.from_text(mixed_text),
           "bpe": lambda: train_bpe([mixed_text], 300)}[kind]()
    ids = np.asarray(tok.encode(mixed_text))
    token_bytes = tok.token_bytes()
    assert len(token_bytes) == tok.vocab_size
    model = tiny(tok.vocab_size)
    r = evaluate(model, ids, seq_len=64, token_bytes=token_bytes)
    first = len(tok.decode([int(ids[0])]).encode("utf-8"))
    assert r.bytes == len(mixed_text.encode("utf-8")) - first
    assert r.bits_per_byte == pytest.approx(r.loss * r.tokens / math.log(2) / r.bytes, rel=1e-9)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A GPT-2-BPE model written as a HF directory (no training needed) and prepared data."""
    root = tmp_path_factory.mktemp("eval")
    model = tiny(50257)
    (root / "model").mkdir()
    write_hf_dir(root / "model", model, {"name": "gpt2"}, {})
    text = root / "input.txt"
    text.write_text(shakespeare_head(3_000), encoding="utf-8")
    prepare([str(text)], str(root / "data"), tokenizer="gpt2", val_fraction=0.2, progress=False)
    prepare([str(text)], str(root / "char"), tokenizer="char", val_fraction=0.2, progress=False)
    prepare([str(text)], str(root / "noval"), tokenizer="gpt2", val_fraction=0.0, progress=False)
    return root, model


def test_cli_eval_on_a_split_and_a_file(setup, capsys):
    root, model = setup
    out_json = root / "result.json"
    assert run_cli("eval", "--ckpt", str(root / "model"), "--data", str(root / "data"),
                   "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
                   "--json", str(out_json)) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "loss" in line and "perplexity" in line and "val split" in line
    result = json.loads(out_json.read_text())
    val = load_split(root / "data", "val")
    direct = evaluate(model, val, seq_len=32)
    assert result["loss"] == pytest.approx(direct.loss, rel=1e-6)
    assert result["tokens"] == len(val) - 1 and result["seq_len"] == 32
    assert f"loss {direct.loss:.4f}" in line
    # bits per byte: the val split's predicted tokens are its text's bytes
    tb = GPT2Tokenizer().token_bytes()
    assert result["bytes"] == int(tb[val[1:]].sum()) > result["tokens"]
    assert result["bits_per_byte"] == pytest.approx(
        direct.loss * result["tokens"] / math.log(2) / result["bytes"], rel=1e-6)
    assert f"bits/byte {result['bits_per_byte']:.4f}" in line

    # A text file is tokenized with the model's tokenizer and scored the same way.
    text = root / "input.txt"
    assert run_cli("eval", "--ckpt", str(root / "model"), "--data", str(text), "--json",
                   str(out_json)) == 0
    capsys.readouterr()
    ids = np.asarray(GPT2Tokenizer().encode(text.read_text(encoding="utf-8")))
    assert json.loads(out_json.read_text())["loss"] == pytest.approx(
        evaluate(model, ids, seq_len=64).loss, rel=1e-6)


@pytest.mark.parametrize("args, words", [
    (["--data", "char"], "char tokenizer"),
    (["--data", "noval"], "no val tokens"),
    (["--data", "missing.txt"], "does not exist"),
    (["--data", "data", "--seq-len", "65"], "--seq-len 65"),
    (["--data", "data", "--batch-size", "0"], "--batch-size 0"),
])
def test_cli_eval_bad_input_fails_in_one_line(setup, capsys, args, words):
    root, _ = setup
    args = [str(root / a) if i == 1 else a for i, a in enumerate(args)]
    assert run_cli("eval", "--ckpt", str(root / "model"), *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gptforge eval: error:") and words in err


def test_eval_refuses_non_utf8_text(setup, capsys, tmp_path):
    root, _ = setup
    bad = Path(tmp_path) / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert run_cli("eval", "--ckpt", str(root / "model"), "--data", str(bad)) == 2
    assert "not UTF-8" in capsys.readouterr().err
