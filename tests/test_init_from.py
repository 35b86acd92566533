"""train --init-from: fine-tuning from a Hugging Face GPT-2 directory or a gptforge run."""

from pathlib import Path

import pytest
import torch
from test_train import quiet, shakespeare_head, tiny_cfg

from gptforge.checkpoint import CheckpointError
from gptforge.data import TokenLoader, prepare, read_shard
from gptforge.metrics import read_metrics, read_run_record
from gptforge.train import train


def first_loss(run: Path) -> float:
    return next(r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r)


def test_init_from_a_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    (tmp_path / "t.txt").write_text(shakespeare_head(4000), encoding="utf-8")
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "data"), progress=False)
    cfg = tiny_cfg(tmp_path / "data", "train.max_steps=2", "train.log_interval=1",
                   "model.n_layer=7")  # shape keys come from the source, dropout (0) from the run
    train(cfg, tmp_path / "run", log=quiet, init_from=tmp_path / "hf")
    assert hf.config.resid_pdrop == 0.1
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size, cfg.model.dropout) == (2, 32, 64, 0.0)
    # The first step's loss is the Hugging Face model's loss on the first batch.
    loader = TokenLoader(read_shard(tmp_path / "data" / "train.bin"), 8, 32)
    x, y = (t.long() for t in loader.next_batch())  # int32 ids, as train widens them
    hf.eval()
    with torch.no_grad():
        expected = hf(input_ids=x, labels=None).logits
        expected = torch.nn.functional.cross_entropy(expected.reshape(-1, 50257), y.reshape(-1)).item()
    assert first_loss(tmp_path / "run") == pytest.approx(expected, abs=1e-4)
    assert read_run_record(tmp_path / "run")["init_from"] == str(tmp_path / "hf")


def test_init_from_a_gptforge_run_and_tokenizer_mismatch(tmp_path):
    (tmp_path / "t.txt").write_text(shakespeare_head(20_000), encoding="utf-8")
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "char"), tokenizer="char", progress=False)
    train(tiny_cfg(tmp_path / "char", "train.max_steps=150", "train.log_interval=1"),
          tmp_path / "base", log=quiet)
    base = read_metrics(tmp_path / "base" / "metrics.jsonl")
    train(tiny_cfg(tmp_path / "char", "train.max_steps=2", "train.log_interval=1", "train.seed=9"),
          tmp_path / "tuned", log=quiet, init_from=tmp_path / "base")
    # starts where the base run ended, far below a fresh model's ln(V) ~ 4.1
    assert first_loss(tmp_path / "tuned") < base[0]["loss"] - 0.5
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "bpe"), progress=False)
    with pytest.raises(CheckpointError, match="other than the data's"):
        train(tiny_cfg(tmp_path / "bpe", "train.max_steps=2"), tmp_path / "bad", log=quiet,
              init_from=tmp_path / "base")
    assert not (tmp_path / "bad").exists()
