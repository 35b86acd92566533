"""Damaged data is caught before training on it: shard sizes always, every shard's sha256
(recorded in meta.json) at the start of a run and before eval scores a prepared split."""

import json

import pytest
from test_train import run_cli

from gptforge.data import load_meta, load_split, prepare


def one_line(err: str, command: str) -> str:
    assert err.count("\n") == 1 and err.startswith(f"gptforge {command}: error: "), err
    return err


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A char directory with one byte of its train shard flipped (size unchanged)."""
    root = tmp_path_factory.mktemp("damaged")
    (root / "in.txt").write_text("To be, or not to be, that is the question. " * 200)
    prepare([str(root / "in.txt")], root / "data", tokenizer="char", progress=False)
    shard = root / "data" / load_meta(root / "data")["shards"]["train"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[64 + 100] ^= 0x40  # a token id, past the 64-byte header
    shard.write_bytes(bytes(raw))
    return root, shard


def test_train_refuses_a_damaged_shard_before_it_starts(damaged, capsys):
    root, shard = damaged
    assert run_cli("train", "--data", str(root / "data"), "--out", str(root / "run"),
                   "--preset", "gpt2-tiny", "--set", "train.device=cpu") == 2
    err = one_line(capsys.readouterr().err, "train")
    assert str(shard) in err and "sha256" in err and "--force" in err
    assert not (root / "run").exists()


def test_sizes_only_skips_the_hash_and_a_bad_value_is_refused(damaged, capsys):
    root, shard = damaged
    assert len(load_split(root / "data", "train", verify="sizes")) > 0
    with pytest.raises(Exception, match="is damaged"):
        load_split(root / "data", "train", verify="sha256")
    assert run_cli("train", "--data", str(root / "data"), "--out", str(root / "run"),
                   "--preset", "gpt2-tiny", "--set", "data.verify=md5") == 2
    assert "data.verify" in one_line(capsys.readouterr().err, "train")


def test_a_truncated_shard_is_caught_by_its_size(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("abcdefgh " * 300)
    prepare([str(tmp_path / "in.txt")], tmp_path / "data", tokenizer="char", progress=False)
    meta = load_meta(tmp_path / "data")
    shard = tmp_path / "data" / meta["shards"]["val"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    assert run_cli("train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                   "--preset", "gpt2-tiny", "--set", "data.verify=sizes") == 2
    assert str(shard) in one_line(capsys.readouterr().err, "train")
    assert json.loads((tmp_path / "data" / "meta.json").read_text()) == meta
