import os
from pathlib import Path

import pytest
from corpus import SHAKESPEARE

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker, and for what the workers start: with one worker per core, torch's
    # default of one thread per core oversubscribes the machine, and small models' busy-waiting
    # threads then take minutes where seconds do (measured: a 550-step tiny run 184 s, not ~10).
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory) -> Path:
    """gptforge's cache directory for the whole session, shared by the xdist workers (their base
    temporary directories sit side by side): what train.dtype=auto measures on this CPU is
    measured once for the suite, not once per worker or per test, and ~/.cache is never written."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "gptforge-cache"
    cache.mkdir(exist_ok=True)
    os.environ["GPTFORGE_CACHE"] = str(cache)  # the processes tests start inherit it
    return cache


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """20,000 characters of Shakespeare, prepared char-level, 10% val: shared by
    every test that trains a tiny model and only reads its data."""
    from test_train import shakespeare_head

    from gptforge.data import prepare

    d = tmp_path_factory.mktemp("char-data")
    (d / "input.txt").write_text(shakespeare_head(20_000), encoding="utf-8")
    prepare([str(d / "input.txt")], str(d / "char"), tokenizer="char", val_fraction=0.1, progress=False)
    return d / "char"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked slow run first (otherwise in collection order): pytest-xdist hands tests
    out in this order, so the long ones start at once on every worker and the short ones fill the
    gaps, instead of one long test keeping a worker busy after the other has finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
