"""A run on a trained BPE: every checkpoint carries its tokenizer.json, so sampling, evaluating,
exporting, reusing its vocabulary and resuming need no data directory; data made by another
tokenizer is refused in one line (by sha256)."""

import json
import shutil

import pytest
from test_train import quiet, run_cli, shakespeare_head, tiny_cfg

from gptforge.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from gptforge.data import load_meta, prepare
from gptforge.generate import sample
from gptforge.sampling import Sampling
from gptforge.tokenizer import BPE_FILE, tokenizer_from_dict, train_bpe
from gptforge.train import train

VOCAB = 320


def one_line(err: str, command: str) -> str:
    assert err.count("\n") == 1 and err.startswith(f"gptforge {command}: error: "), err
    return err


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """Tiny Shakespeare's head prepared with a trained BPE, a gpt2-tiny trained 3 steps on it,
    then the data directory deleted. Returns (root, the text)."""
    root = tmp_path_factory.mktemp("bperun")
    text = shakespeare_head(60_000)
    (root / "in.txt").write_text(text, encoding="utf-8")
    prepare([str(root / "in.txt")], root / "data", tokenizer="bpe", vocab_size=VOCAB,
            progress=False)
    (root / "tokenizer.json").write_bytes((root / "data" / BPE_FILE).read_bytes())
    train(tiny_cfg(root / "data", "train.max_steps=3", "train.log_interval=100"), root / "run",
          log=quiet)
    shutil.rmtree(root / "data")
    return root, text


def test_every_checkpoint_carries_the_tokenizer(bpe_run):
    root, _ = bpe_run
    ckpt = find_checkpoint(root / "run")
    assert (ckpt / BPE_FILE).read_bytes() == (root / "tokenizer.json").read_bytes()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert BPE_FILE in manifest["files"]
    record = load_checkpoint(root / "run").tokenizer
    assert record["name"] == "bpe" and record["vocab_size"] == VOCAB


def test_sample_and_eval_from_the_run_alone(bpe_run, capsys):
    root, text = bpe_run
    out = sample(str(root / "run"), "ROMEO:", Sampling(max_tokens=8), device="cpu")
    assert out[0].startswith("ROMEO:") and len(out[0]) > len("ROMEO:")
    (root / "held.txt").write_text(text[-3000:], encoding="utf-8")
    assert run_cli("eval", "--ckpt", str(root / "run"), "--data", str(root / "held.txt"),
                   "--device", "cpu") == 0
    assert "loss" in capsys.readouterr().out


def test_resume_with_data_prepared_from_the_run(bpe_run, tmp_path, capsys):
    root, _ = bpe_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    # the vocabulary of the run, for the same text in a new place
    prepare([str(root / "in.txt")], tmp_path / "again", tokenizer=str(run), progress=False)
    assert (tmp_path / "again" / BPE_FILE).read_bytes() == (root / "tokenizer.json").read_bytes()
    assert run_cli("train", "--resume", "--out", str(run), "--data", str(tmp_path / "again"),
                   "--set", "train.max_steps=4") == 0
    assert load_checkpoint(run).step == 4
    # data made by another BPE of the same size: refused in one line, by sha256
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / BPE_FILE).write_bytes(
        train_bpe([(root / "in.txt").read_text()[::-1]], VOCAB).file_bytes())
    prepare([str(root / "in.txt")], tmp_path / "otherdata", tokenizer=str(tmp_path / "other"),
            progress=False)
    capsys.readouterr()
    assert run_cli("train", "--resume", "--out", str(run), "--data",
                   str(tmp_path / "otherdata"), "--set", "train.max_steps=5") == 2
    err = one_line(capsys.readouterr().err, "train")
    sha = load_meta(tmp_path / "otherdata")["tokenizer"]["sha256"][:12]
    assert "different" not in err and sha in err and f"--tokenizer {run}" in err
    assert run_cli("eval", "--ckpt", str(run), "--data", str(tmp_path / "otherdata"),
                   "--device", "cpu") == 2
    assert sha in one_line(capsys.readouterr().err, "eval")


def test_a_damaged_tokenizer_in_a_checkpoint_is_one_line(bpe_run, tmp_path):
    root, _ = bpe_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    ckpt = find_checkpoint(run)
    data = (ckpt / BPE_FILE).read_bytes()
    (ckpt / BPE_FILE).write_bytes(data.replace(b'"merges"', b'"mergez"', 1))  # same size
    with pytest.raises(CheckpointError, match="is not the tokenizer recorded"):
        load_checkpoint(run)
    (ckpt / BPE_FILE).unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        load_checkpoint(run)


def test_hellaswag_with_a_trained_bpe(bpe_run, tmp_path, capsys):
    """A byte-level BPE encodes any text, so HellaSwag scores even text it never saw."""
    from gptforge import hellaswag as hs
    root, _ = bpe_run
    ex = {"ctx": "Ünïcödé 中文 🤖 then\t tabs.", "endings": ["a", " b  ", "ROMEO: 3.14", "🎉"],
          "label": 2}
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(ex) + "\n" + json.dumps({**ex, "label": 0}) + "\n")
    record = load_checkpoint(root / "run").tokenizer
    tok = tokenizer_from_dict(record)
    items, _ = hs.load_rendered(str(path), record, 64, what="the run")
    assert items[0].rows[2] == tuple(tok.encode(ex["ctx"]) + tok.encode(" ROMEO: 3.14"))
    assert run_cli("eval", "--task", "hellaswag", "--ckpt", str(root / "run"), "--data",
                   str(path), "--device", "cpu") == 0
    assert "acc" in capsys.readouterr().out
    assert run_cli("eval", "--task", "hellaswag", "--ckpt", str(root / "run"), "--data",
                   str(path), "--device", "cpu", "--weights-dtype", "bfloat16") == 0
    assert capsys.readouterr().out.rstrip().endswith("| weights in bfloat16 (--weights-dtype)")


MIXED = ("Hello,   world!\n\n\tIndented — naïve café. 中文字和标点。한국어. Русский. العربية. हिन्दी "
         "🤖🎉👍🏽👨‍👩‍👧 🇫🇷  \u3000\u00a0 trailing   ")


def test_export_loads_in_transformers_with_the_same_ids_text_and_logits(bpe_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf import assert_same_model

    import gptforge
    root, _ = bpe_run
    out = tmp_path / "hf"
    assert run_cli("export", "--ckpt", str(root / "run"), "--out", str(out)) == 0
    assert (out / BPE_FILE).read_bytes() == (root / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == VOCAB - 1
    ours = tokenizer_from_dict(load_checkpoint(root / "run").tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok(MIXED)["input_ids"]
    assert ids == ours.encode(MIXED) and max(ids) < VOCAB - 1
    assert hf_tok.decode(ids) == ours.decode(ids) == MIXED
    assert hf_tok.eos_token_id == VOCAB - 1 and len(hf_tok) == VOCAB
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    model = gptforge.load(root / "run")
    assert_same_model(model, theirs, VOCAB)
    # ... and gptforge reads the exported directory back, tokenizer included
    assert sample(str(out), "ROMEO:", Sampling(max_tokens=4), device="cpu")[0].startswith("ROMEO:")
