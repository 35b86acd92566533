"""atomic.py: a file or directory appears whole or not at all; durable writes are synced."""

import os

import pytest

from gptforge import atomic


class Boom(Exception):
    pass


@pytest.fixture
def fsyncs(monkeypatch):
    """The paths fsynced, by their open descriptors."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_a_file_is_replaced_whole_and_a_failure_leaves_the_old_one(tmp_path):
    path = tmp_path / "config.toml"
    atomic.write_text(path, "first\n")
    assert path.read_text() == "first\n"
    with pytest.raises(Boom):
        with atomic.replacing(path) as tmp:
            tmp.write_text("half of the seco")
            raise Boom
    assert path.read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]  # no temporary left
    atomic.write_bytes(path, b"second\n")
    assert path.read_bytes() == b"second\n"


def test_a_directory_is_replaced_whole_and_a_failure_leaves_the_old_one(tmp_path):
    out = tmp_path / "export"
    with atomic.replacing(out, directory=True) as tmp:
        (tmp / "a.json").write_text("1")
    assert [p.name for p in out.iterdir()] == ["a.json"]
    with pytest.raises(Boom):
        with atomic.replacing(out, directory=True) as tmp:
            (tmp / "b.json").write_text("2")
            raise Boom
    assert [p.name for p in out.iterdir()] == ["a.json"]
    with atomic.replacing(out, directory=True, old=tmp_path / ".old") as tmp:
        (tmp / "c.json").write_text("3")
    assert [p.name for p in out.iterdir()] == ["c.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_named_temporary_and_a_leftover_of_it(tmp_path):
    path = tmp_path / "run.json"
    tmp = tmp_path / "run.json.tmp"
    tmp.write_text("left by a killed process")
    atomic.write_text(path, "{}", tmp=tmp)
    assert path.read_text() == "{}" and not tmp.exists()


def test_durable_syncs_the_file_or_every_file_and_the_directory(tmp_path, fsyncs):
    atomic.write_text(tmp_path / "plain.json", "{}")
    assert fsyncs == []  # plain atomic: no fsync at all
    atomic.write_text(tmp_path / "state.json", "{}", durable=True, tmp=tmp_path / "state.json.tmp")
    assert fsyncs == [str(tmp_path / "state.json.tmp"), str(tmp_path)]  # the data, then the rename
    fsyncs.clear()
    with atomic.replacing(tmp_path / "ckpt", durable=True, directory=True, tmp=tmp_path / ".tmp-ckpt") as t:
        (t / "model.safetensors").write_bytes(b"x")
        (t / "manifest.json").write_text("{}")
    assert sorted(fsyncs) == sorted([str(tmp_path / ".tmp-ckpt" / "manifest.json"),
                                     str(tmp_path / ".tmp-ckpt" / "model.safetensors"),
                                     str(tmp_path / ".tmp-ckpt"), str(tmp_path)])
    assert fsyncs[-1] == str(tmp_path)  # the parent last: after the rename


def test_temp_names_are_hidden_unique_and_beside_the_target(tmp_path):
    a, b = atomic.temp_path(tmp_path / "x.bin"), atomic.temp_path(tmp_path / "x.bin")
    assert a != b and os.path.dirname(a) == str(tmp_path) and os.path.basename(a).startswith(".x.bin.")


def test_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert atomic.file_sha256(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
