"""The ``mbcompile`` command: parse into a dataclass, call the API.

Each module registers its sub-commands: ``build`` (compile, tune, info, targets, add-tokenizer,
demo), ``run`` (run an artifact; the pipeline tasks), ``devices`` (the emulated device and a
tracker). ``options`` makes the compile flags from :class:`mbcompile.options.CompileOptions`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from mbcompile import interrupts
from mbcompile.cli import build, devices, run
from mbcompile.errors import MbcompileError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mbcompile", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    build.register(sub)
    run.register(sub)
    devices.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error ends as one line on stderr, never a traceback: exit 2 for a
    mistake in what was asked (bad option, input, file, device), 130 for Ctrl-C, 1 for anything
    else (``MBCOMPILE_DEBUG=1`` shows its traceback)."""
    ns = parser().parse_args(argv)
    previous = signal.getsignal(signal.SIGINT)
    interrupts.clear()
    interrupts.install()
    try:
        code = ns.handler(ns)
        interrupts.raise_if_received()  # a Ctrl-C that a finalizer swallowed still ends it: 130
        return code
    except MbcompileError as err:
        return _fail(err, 2)
    except KeyboardInterrupt as err:  # tune says where it stopped and how to resume
        print(f"mbcompile: {_one_line(err) if err.args else 'interrupted'}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as err:  # a mistake in what was asked, as Python saw it
        if os.environ.get("MBCOMPILE_DEBUG"):
            raise
        return _fail(err, 2)
    except Exception as err:  # noqa: BLE001 - the CLI's promise: one line, no traceback
        if os.environ.get("MBCOMPILE_DEBUG"):
            raise
        print(
            f"mbcompile: internal error: {type(err).__name__}: {_one_line(err)} "
            f"(set MBCOMPILE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 2000 else text[:2000] + " …"


def _fail(err: BaseException, code: int) -> int:
    print(f"mbcompile: error: {_one_line(err)}", file=sys.stderr)
    return code
