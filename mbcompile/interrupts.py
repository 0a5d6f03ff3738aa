"""Ctrl-C that is never lost: the command line's SIGINT handler remembers the interrupt as well as
raising it.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal is
handled. If that is a finalizer (``__del__``, a weakref callback: the ``regex`` module's
``Group.__del__`` has been seen), CPython prints "Exception ignored in ..." and drops the
exception, and the command runs on to the end as if Ctrl-C had never been pressed. With
:func:`install`, the interrupt is remembered; :func:`raise_if_received` (called by the CLI after
the command and by ``sigint_held`` as each stage of compile and tune begins) raises it again.

    before: SIGINT during a finalizer -> "Exception ignored ... KeyboardInterrupt"; exit 0
    after:  the same, then KeyboardInterrupt at the next stage (or at the end); exit 130
"""

from __future__ import annotations

import signal
import sys
import threading

_received = threading.Event()


def handler(signum, frame) -> None:
    """SIGINT: remember it, then raise KeyboardInterrupt as Python's own handler does."""
    _received.set()
    raise KeyboardInterrupt


def remember() -> None:
    """Note a Ctrl-C that a handler of its own took (``sigint_held``)."""
    _received.set()


def install() -> None:
    """Use :func:`handler` for SIGINT if it has Python's default handler (the main thread only;
    an ignored SIGINT stays ignored)."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, handler)


def is_python_handler(current) -> bool:
    """Whether SIGINT's handler raises KeyboardInterrupt (Python's own, or :func:`handler`)."""
    return current is signal.default_int_handler or current is handler


def received() -> bool:
    """Whether Ctrl-C was pressed since :func:`install` (or the last :func:`clear`)."""
    return _received.is_set()


def clear() -> None:
    _received.clear()


def raise_if_received() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C was received and none is being handled now (an
    ``except`` or ``finally`` block cleaning up after one must not be interrupted again)."""
    if _received.is_set() and sys.exc_info()[1] is None:
        raise KeyboardInterrupt
