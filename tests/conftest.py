import os

import pytest
from shared_data import SHAKESPEARE


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"Tiny Shakespeare is not at {SHAKESPEARE}")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()
