"""Named datasets: a name on the command line that stands for a file, verified by its sha256:
shipped with the package (Tiny Shakespeare, see bundled/README.md) or fetched once and cached."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from gptforge.atomic import file_sha256, replacing
from gptforge.cachedir import default_cache_dir
from gptforge.errors import GptforgeError

DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class NamedDataset:
    url: str
    sha256: str
    filename: str  # name of the cached copy under the cache directory
    url_env: str  # environment variable that overrides url (a mirror)
    title: str
    bundled: str = ""  # a copy shipped in the package (data/bundled/): used unless a url is given


NAMED_DATASETS: dict[str, NamedDataset] = {
    "shakespeare": NamedDataset(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare/input.txt",
        url_env="GPTFORGE_SHAKESPEARE_URL",
        title="Tiny Shakespeare",
        bundled="tinyshakespeare.txt",  # 1.1 MB, public domain: offline, nothing is downloaded
    ),
}


BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")


def bundled_copy(ds: NamedDataset) -> str:
    """The copy of ``ds`` that ships with gptforge, checked against its sha256."""
    path = os.path.join(BUNDLED_DIR, ds.bundled)
    try:
        ok = file_sha256(path) == ds.sha256
    except OSError:
        ok = False
    if not ok:
        raise GptforgeError(
            f"the {ds.title} that ships with gptforge ({path}) is missing or damaged (its sha256 "
            f"is not {ds.sha256}): reinstall gptforge, or pass a copy of the file itself"
        )
    return path


def bundled_path(name: str) -> str:
    """The verified path of the copy of a named dataset that ships with gptforge (Tiny
    Shakespeare: ``bundled_path("shakespeare")``), whatever mirror the environment names: what the
    tests and benchmarks read, so that nothing outside the installed package is needed."""
    return bundled_copy(NAMED_DATASETS[name])


def fetch_named_dataset(
    name_or_ds: str | NamedDataset, url: str | None = None, cache_dir: str | None = None,
    hint: str | None = None,
) -> str:
    """Path of a verified local copy of a dataset (registered name or a ``NamedDataset``),
    downloading it once into the cache. ``hint`` ends a failure's message: how to get the file
    and pass it to the command at hand (default: to ``gptforge prepare``)."""
    ds = NAMED_DATASETS[name_or_ds] if isinstance(name_or_ds, str) else name_or_ds
    if ds.bundled and not (url or os.environ.get(ds.url_env)):
        return bundled_copy(ds)
    url = url or os.environ.get(ds.url_env) or ds.url
    path = os.path.join(cache_dir or default_cache_dir(), ds.filename)
    if os.path.isfile(path) and file_sha256(path) == ds.sha256:
        return path
    base = os.path.basename(ds.filename)
    hint = hint or f"download {base} yourself and pass the file: gptforge prepare {base} --out DIR"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise GptforgeError(
            f"cannot create cache directory {os.path.dirname(path)} ({e.strerror}): "
            "set GPTFORGE_CACHE to a writable directory"
        ) from None
    h = hashlib.sha256()
    with replacing(path) as tmp:  # the cache holds a verified copy or nothing
        with open(tmp, "xb") as f:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        h.update(block)
                        f.write(block)
            except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
                if isinstance(e, urllib.error.URLError) and not isinstance(
                    e, urllib.error.HTTPError
                ):
                    reason = str(e.reason)
                else:
                    reason = str(e) or type(e).__name__
                reason = " ".join(reason.split())  # one line, whatever the OS said
                raise GptforgeError(
                    f"could not download {ds.title} from {url} ({reason}): {hint}"
                ) from None
        if h.hexdigest() != ds.sha256:
            raise GptforgeError(
                f"the {ds.title} downloaded from {url} has sha256 {h.hexdigest()}, expected "
                f"{ds.sha256}: the mirror serves other data; {hint}"
            )
    return path
