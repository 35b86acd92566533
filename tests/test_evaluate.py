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
from gptforge.evaluate import evaluate
from gptforge.hf import write_hf_dir
from gptforge.tokenizer import GPT2Tokenizer


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
