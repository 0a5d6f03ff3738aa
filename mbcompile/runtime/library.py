"""The compiled library of a model: its bytes, and the module loaded from them once.

TVM 0.27 does not give back a loaded library: measured here, each ``tvm.runtime.load_module``
of a 31 MB ``lib.so`` (4 layers) added 62 MB of resident memory that ``del`` and garbage
collection never returned (the mapping and the VM constants copied out of it). So a library is
loaded once per process and shared by its content (SHA-256): loading the same artifact again,
as a service does in a load/run/close loop, maps nothing new. Different artifacts each stay
loaded until the process ends.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from mbcompile.artifact import LIB_MEMBER

# SHA-256 of a library's bytes → the TVM module loaded from them (see the module docstring).
_LOADED: dict[str, Any] = {}
_LOADED_LOCK = threading.Lock()


def _new_lock_after_fork() -> None:  # another thread of the parent may have held it
    global _LOADED_LOCK
    _LOADED_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


class Library:
    """A linked shared library (``lib.so``) as bytes; :meth:`module` loads it into this process
    the first time it is asked for (only for a library this machine can run)."""

    def __init__(self, lib_bytes: bytes):
        self.bytes = bytes(lib_bytes)
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.bytes).hexdigest()
        return self._sha256

    def module(self):
        """The TVM runtime module, loaded once per process for these bytes."""
        key = self.sha256
        with _LOADED_LOCK:
            module = _LOADED.get(key)
            if module is None:
                import tvm

                with tempfile.TemporaryDirectory(prefix="mbcompile-") as tmp:
                    path = os.path.join(tmp, LIB_MEMBER)
                    Path(path).write_bytes(self.bytes)
                    # dlopen keeps the mapping; the file and its folder go at once
                    module = _LOADED[key] = tvm.runtime.load_module(path)
            return module
