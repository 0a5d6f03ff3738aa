"""TVMScript parsing without ``inspect``'s slow walk over the caller's frames.

TVM's script parser asks ``inspect`` for the whole call stack each time it parses a function
(``T.prim_func`` calls ``inspect.stack()``) or expands a macro (``T.macro``: the parser object is
found by ``inspect.getouterframes``). Both build a ``FrameInfo`` per frame with one line of
source, and for each frame whose file does not exist (the parser's own ``eval``'d code, many
per parse) ``inspect.getmodule`` scans every module in ``sys.modules``: thousands once torch
is imported. The kernels mbcompile writes in TVMScript (the fused attention, the tensor
intrinsics) were parsed in about 2 s each inside a compile; the default model's 8-length compile
spent 14 of its 141 s there (measured on a 2-core Xeon, FuseAttention 18.2 → 4.5 s).

:func:`install` gives TVM's parser modules an ``inspect`` whose ``stack`` and
``getouterframes`` build the same ``FrameInfo`` from the frame itself: the file name from the
code object, the line from ``linecache`` (what ``inspect`` reads too, for files that exist), no
module scan. The parser uses only the frames, their names and line numbers and one line of
context. Nothing else in the process changes: ``inspect`` itself is left alone.
"""

from __future__ import annotations

import importlib
import inspect
import linecache
import sys
import threading
import types

# TVM 0.27's modules that call inspect.stack / inspect.getouterframes while parsing.
PARSER_MODULES = (
    "tvm.tirx.script.parser.entry",
    "tvm.tirx.script.builder.ir",
    "tvm.script.parser.core.parser",
    "tvm.script.parser.ir.entry",
    "tvm.relax.script.parser.entry",
)

_lock = threading.Lock()
_installed = False


def _frame_info(frame: types.FrameType) -> inspect.FrameInfo:
    code = frame.f_code
    filename, lineno = code.co_filename, frame.f_lineno
    line = linecache.getline(filename, lineno, frame.f_globals)
    return inspect.FrameInfo(
        frame, filename, lineno, code.co_name, [line] if line else None, 0 if line else None,
        positions=None,
    )


def getouterframes(frame: types.FrameType | None, context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.getouterframes`` with at most one line of context and no module scan."""
    frames = []
    while frame is not None:
        frames.append(_frame_info(frame))
        frame = frame.f_back
    return frames


def stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack``: the caller's frame and those above it (see :func:`getouterframes`)."""
    return getouterframes(sys._getframe(1), context)


def _quick_inspect() -> types.ModuleType:
    module = types.ModuleType("inspect", inspect.__doc__)
    module.__dict__.update(inspect.__dict__)
    module.stack = stack
    module.getouterframes = getouterframes
    return module


def install() -> None:
    """Give TVM's script parser the quick ``inspect`` (once per process; idempotent). A parser
    module that is missing or does not use ``inspect`` (another TVM version) is left as it is."""
    global _installed
    with _lock:
        if _installed:
            return
        quick = _quick_inspect()
        for name in PARSER_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if getattr(module, "inspect", None) is inspect:
                module.inspect = quick
        _installed = True
