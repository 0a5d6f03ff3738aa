"""A Ctrl-C is never lost: one that arrives while Python runs a finalizer (where CPython prints
"Exception ignored" and drops the KeyboardInterrupt) still stops the command, with status 130.

This happened in CI: SIGINT during ``regex``'s ``Group.__del__`` in ``mbcompile tune``, which
then tuned on and exited 0. Each case runs in a subprocess of its own (signal handlers are the
process's), with SIGINT sent while a ``__del__`` runs, so the race is hit every time.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from helpers import default_sigint

# An object whose finalizer sends this process SIGINT and runs on until the handler has run in it.
SWALLOWED = textwrap.dedent("""
    import os, signal, time

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            end = time.monotonic() + 5
            while time.monotonic() < end:  # the handler runs (and raises) in here
                pass

    def swallow_a_ctrl_c():
        Finalized()  # freed at once: __del__ runs, its KeyboardInterrupt is dropped
""")


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SWALLOWED + textwrap.dedent(script)],
        capture_output=True, text=True, timeout=120, preexec_fn=default_sigint,
    )


def test_python_alone_drops_a_ctrl_c_in_a_finalizer():
    """The race itself, without mbcompile's handler: the interrupt is lost (so the tests below
    would fail without it)."""
    done = _run("""
        swallow_a_ctrl_c()
        print("ran on")
    """)
    assert done.returncode == 0, done.stderr
    assert "ran on" in done.stdout
    assert "KeyboardInterrupt" in done.stderr  # "Exception ignored in: ... __del__"


def test_the_command_line_exits_130_after_a_ctrl_c_a_finalizer_swallowed():
    done = _run("""
        import argparse
        import mbcompile.cli as cli

        def command(ns):
            swallow_a_ctrl_c()
            print("command ran to its end")
            return 0

        def parser():
            p = argparse.ArgumentParser(prog="mbcompile")
            p.set_defaults(handler=command)
            return p

        cli.parser = parser
        raise SystemExit(cli.main([]))
    """)
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert "mbcompile: interrupted" in done.stderr


def test_the_next_stage_does_not_start_after_a_swallowed_ctrl_c():
    """``sigint_held`` opens every stage of compile and tune: it raises the remembered Ctrl-C
    instead of running the stage."""
    done = _run("""
        import signal
        from mbcompile import interrupts
        from mbcompile.targets.metaschedule import sigint_held

        interrupts.install()
        swallow_a_ctrl_c()
        try:
            with sigint_held():
                print("stage ran")
        except KeyboardInterrupt:
            print("stopped before the stage")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["stopped", "before", "the", "stage"]


def test_cleaning_up_after_a_ctrl_c_is_not_interrupted_again():
    """An ``except KeyboardInterrupt`` block that enters a held stage to clean up runs it."""
    done = _run("""
        import os, signal
        from mbcompile import interrupts
        from mbcompile.targets.metaschedule import sigint_held

        interrupts.install()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**8):
                pass
        except KeyboardInterrupt:
            with sigint_held():
                print("cleaned up")
    """)
    assert done.returncode == 0, done.stderr
    assert "cleaned up" in done.stdout


def test_a_ctrl_c_inside_a_held_stage_is_remembered_and_raised_at_its_end():
    done = _run("""
        import os, signal
        from mbcompile import interrupts
        from mbcompile.targets.metaschedule import sigint_held

        interrupts.install()
        try:
            with sigint_held():
                os.kill(os.getpid(), signal.SIGINT)
                print("stage finished")
        except KeyboardInterrupt:
            print("raised at its end", interrupts.received())
        print(signal.getsignal(signal.SIGINT) is interrupts.handler)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["stage finished", "raised at its end True", "True"]


def test_the_command_line_puts_back_the_sigint_handler_it_found():
    import mbcompile.cli as cli

    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["targets"]) == 0
    assert signal.getsignal(signal.SIGINT) is before
