"""Writing files safely, in one place: a temporary name, rename into place, clean up on failure.

Every file or directory gptforge writes appears under its name either whole or not at all. The
content goes to a temporary name beside the target (same directory, so the rename is atomic on a
POSIX filesystem) and is renamed onto the target only once it is complete; a failure (an
exception, a full disk) removes the temporary and leaves the target as it was.

Two strengths, chosen per writer:

- ``durable=True`` for what a later command resumes from (checkpoints, ``latest``, ``best``,
  prepare's state, shards and meta.json): the file, or every file of a directory, is fsynced
  before the rename and the parent directory after it, so after a power loss the name points at
  complete data or at the previous version, never at zeros.
- plain atomic (the default) for the rest (config.toml, run.json, ``--json`` outputs, exports,
  plots): a crash never leaves a half-written file, but the newest version may be lost with the
  page cache. An fsync per write there would cost more than the file is worth.

``file_sha256`` lives here too: the integrity of a written file is checked by the layers above
(checkpoint manifests, shard lists) and none of them should import another for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]


def temp_path(path: PathLike) -> str:
    """A fresh hidden name beside ``path``: ``.NAME.PID.RANDOM.tmp`` in the same directory."""
    head, base = os.path.split(os.fspath(path))
    return os.path.join(head, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: PathLike) -> None:
    """Make a directory's entries (a rename into it) durable. Best effort: some filesystems
    cannot open or sync a directory, and there is nothing more to do on them."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove(path: PathLike) -> None:
    """Remove a file or a directory tree, if it is there."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _sync_tree(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.iterdir()):
            _sync_tree(child)
        fsync_dir(path)
    else:
        fsync_file(path)


def publish(tmp: PathLike, path: PathLike, durable: bool = False, old: PathLike | None = None) -> None:
    """Rename the finished ``tmp`` (a file or a directory) onto ``path``.

    ``durable``: ``tmp`` (every file in it, for a directory) is synced first and ``path``'s
    directory after. A directory already at ``path`` is first renamed to ``old`` (by default a
    fresh temporary name), then removed once the new one is in place; if the new one cannot be
    put in place the old one is put back. So ``path`` is at every moment the old version or the
    new one, and a kill mid-way leaves at most a temporary name to clean up.
    """
    tmp, path = Path(tmp), Path(path)
    if durable:
        _sync_tree(tmp)
    moved = None
    if tmp.is_dir() and path.is_dir() and not path.is_symlink():
        moved = Path(old) if old is not None else Path(temp_path(path))
        remove(moved)
        os.replace(path, moved)
    try:
        os.replace(tmp, path)
    except BaseException:
        if moved is not None and not path.exists():
            os.replace(moved, path)
        raise
    if durable:
        fsync_dir(path.parent if str(path.parent) else ".")
    if moved is not None:
        remove(moved)


@contextlib.contextmanager
def replacing(path: PathLike, durable: bool = False, tmp: PathLike | None = None,
              directory: bool = False, old: PathLike | None = None) -> Iterator[Path]:
    """Write ``path`` through a temporary: yields the temporary's path (for ``directory=True``
    an empty directory there) to be filled; on a clean exit it is published onto ``path``
    (see ``publish``), on any exception removed, and ``path`` stays as it was.

    ``tmp`` names the temporary (default: ``temp_path(path)``), for writers whose leftovers are
    recognised by name (a checkpoint's ``.tmp-step_*``).
    """
    t = Path(tmp) if tmp is not None else Path(temp_path(path))
    remove(t)  # a leftover of a killed process with the same pid
    if directory:
        t.mkdir()
    try:
        yield t
        publish(t, path, durable=durable, old=old)
    except BaseException:
        remove(t)
        raise


def write_bytes(path: PathLike, data: bytes, durable: bool = False, tmp: PathLike | None = None) -> None:
    """``path`` holds ``data``, atomically (and with ``durable``, synced)."""
    with replacing(path, durable=durable, tmp=tmp) as t:
        with open(t, "wb") as f:
            f.write(data)


def write_text(path: PathLike, text: str, durable: bool = False, tmp: PathLike | None = None) -> None:
    """``path`` holds ``text`` as UTF-8, atomically (and with ``durable``, synced)."""
    write_bytes(path, text.encode("utf-8"), durable=durable, tmp=tmp)
