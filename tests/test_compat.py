"""What a later gptforge must still read (docs/reference/compatibility.md): the checkpoint, the
prepared data and the config file of every version kept in tests/fixtures/compat/VERSION/ (made by
make_fixtures.py there), and what it must refuse in one line that says what to do."""

import json
import shutil
from pathlib import Path

import pytest

from gptforge import __version__
from gptforge.atomic import file_sha256
from gptforge.checkpoint import FORMAT_VERSION, load_checkpoint
from gptforge.data import load_meta
from gptforge.data.shards import DATA_FORMAT, READ_FORMATS, SHARD_VERSION, load_split
from gptforge.evaluate import evaluate_path
from gptforge.presets import resolve
from test_train import run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "compat"
KEPT = sorted(p for p in FIXTURES.iterdir() if p.is_dir())


def expected(fixture: Path) -> dict:
    return json.loads((fixture / "expected.json").read_text(encoding="utf-8"))


def test_the_formats_of_this_version_have_a_fixture():
    """A new checkpoint, data or shard format comes with fixtures of its own (make_fixtures.py),
    and the old ones stay: this version's formats are among those kept."""
    formats = {(e["checkpoint_format"], e["data_format"], e["shard_version"])
               for e in map(expected, KEPT)}
    assert (FORMAT_VERSION, DATA_FORMAT, SHARD_VERSION) in formats, (
        f"no fixture of this version's formats: run tests/fixtures/compat/make_fixtures.py "
        f"(gptforge {__version__})")


@pytest.mark.parametrize("fixture", KEPT, ids=lambda p: p.name)
def test_a_kept_checkpoint_data_and_config_still_load(fixture, tmp_path):
    kept = tmp_path / fixture.name
    shutil.copytree(fixture, kept)
    data, ckpt = kept / "data", kept / "checkpoint"
    assert load_meta(data)["format_version"] in READ_FORMATS
    assert len(load_split(data, "val", verify="sha256")) > 0
    assert load_checkpoint(ckpt, verify="sha256").step >= 1
    # the weights read as they were written: the same loss on the same tokens
    result, _ = evaluate_path(str(ckpt), str(data), split="val", batch_size=4, device="cpu")
    assert result.loss == pytest.approx(expected(fixture)["val_loss"], rel=1e-5)
    # a run continues from it: its optimizer and trainer state read too
    assert run_cli("train", "--data", str(data), "--out", str(tmp_path / "run"), "--resume",
                   str(ckpt), "--set", "train.max_steps=3") == 0
    assert load_checkpoint(tmp_path / "run").step == 3
    cfg = resolve(None, str(kept / "config.toml"), [])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.train.max_steps) == (1, 16, 2)


def rewrite_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **changes}),
                    encoding="utf-8")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_a_checkpoint_from_a_later_format_is_refused_in_one_line(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(KEPT[-1] / "checkpoint", ckpt)
    # as a later gptforge would write it: a new format number, with a manifest that matches
    rewrite_json(ckpt / "config.json", format_version=FORMAT_VERSION + 1, gptforge_version="99.0.0")
    manifest = json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"]["config.json"] = {"bytes": (ckpt / "config.json").stat().st_size,
                                        "sha256": file_sha256(ckpt / "config.json")}
    (ckpt / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert run_cli("sample", "--ckpt", str(ckpt), "--max-new-tokens", "2") == 2
    err = one_line_error(capsys)
    assert f"has format {FORMAT_VERSION + 1} (written by gptforge 99.0.0)" in err
    assert "upgrade gptforge (pip install --upgrade gptforge)" in err


def test_data_from_a_later_format_is_refused_in_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(KEPT[-1] / "data", data)
    rewrite_json(data / "meta.json", format_version=max(READ_FORMATS) + 1, gptforge_version="99.0.0")
    assert run_cli("eval", "--ckpt", str(KEPT[-1] / "checkpoint"), "--data", str(data)) == 2
    err = one_line_error(capsys)
    assert f"data format version {max(READ_FORMATS) + 1} (written by gptforge 99.0.0)" in err
    assert "upgrade gptforge" in err


def test_a_config_key_this_version_lacks_is_refused_in_one_line(tmp_path, capsys):
    config = tmp_path / "later.toml"
    config.write_text((KEPT[-1] / "config.toml").read_text(encoding="utf-8").replace(
        "[train]\n", "[train]\nkey_of_a_later_version = 1\n"), encoding="utf-8")
    assert run_cli("config", "--config", str(config)) == 2
    assert "unknown key 'train.key_of_a_later_version'" in one_line_error(capsys)
