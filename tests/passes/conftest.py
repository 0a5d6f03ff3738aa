"""Fixtures for the pass tests; the fluent helper ``Tester`` lives in ``tester.py`` beside this."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from tester import Tester, tiny_model  # noqa: E402 - after the sys.path entry


@pytest.fixture(scope="session")
def tiny_base() -> Tester:
    """A tiny default-shaped MobileBertModel (NoNorm, trigram, shared QK bottleneck), captured
    once; tests call ``.fresh()`` on it."""
    return Tester.from_model(tiny_model("MobileBertModel"))
