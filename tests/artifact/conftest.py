"""Fixtures for the artifact tests; ``crafting.py`` beside this builds artifacts byte by byte."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import crafting  # noqa: E402 - after the sys.path entry


@pytest.fixture
def small_artifact(tmp_path) -> Path:
    """A valid artifact with a 4 kB stand-in library and two tokenizer files (never loaded)."""
    return crafting.write_artifact(tmp_path / "small.mbc", tokenizer=crafting.TOKENIZER)
