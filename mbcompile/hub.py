"""Hugging Face hub ids: their form, and whether the hub may be asked (no torch, no network).

Rank 0 of the layout: the pipelines ask whether a name is a hub id without loading the capture
stage (which imports torch).
"""

from __future__ import annotations

import os
import re


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face hub model id (``name`` or ``owner/name``)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set: the hub cache only, no download."""
    return any(
        os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
