"""TVMScript parsing with the quick frame walk (``mbcompile.tvmscript``): the same frames as
``inspect`` gives, the same parsed functions, and no scan of ``sys.modules`` per frame."""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest
import tvm
from tvm.script import tirx as T

from mbcompile import tvmscript

tvmscript.install()


def _kernel(n: int):
    """A prim_func that expands a macro: both of the parser's frame walks run."""

    @T.macro
    def double(buf, i):
        buf[i] = buf[i] * T.float32(2)

    @T.prim_func(s_tir=True)
    def kernel(a: T.Buffer((n,), "float32")):
        for i in range(n):
            double(a, i)

    return kernel


def _with_original_inspect(monkeypatch):
    for name in tvmscript.PARSER_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "inspect"):
            monkeypatch.setattr(module, "inspect", inspect)


def test_the_parser_modules_get_the_quick_inspect_and_nothing_else_does():
    for name in tvmscript.PARSER_MODULES:
        module = importlib.import_module(name)
        assert module.inspect.stack is tvmscript.stack, name
        assert module.inspect.getouterframes is tvmscript.getouterframes, name
        assert module.inspect.signature is inspect.signature  # the rest is inspect's own
    assert inspect.stack is not tvmscript.stack
    tvmscript.install()  # idempotent
    assert importlib.import_module(tvmscript.PARSER_MODULES[0]).inspect.stack is tvmscript.stack


def test_frames_match_inspects_where_the_source_exists():
    def here():
        return tvmscript.stack(), inspect.stack()

    quick, slow = here()
    assert len(quick) == len(slow)
    for q, s in zip(quick, slow):
        assert (q.frame, q.filename, q.lineno, q.function) == (s.frame, s.filename, s.lineno,
                                                               s.function)
        if s.code_context is not None and q.code_context is not None:
            assert q.code_context == s.code_context
    assert quick[0].code_context == slow[0].code_context  # this file's line
    assert quick[0].function == "here"


def test_parsed_functions_are_the_same_as_with_inspect(monkeypatch):
    quick = _kernel(16)
    _with_original_inspect(monkeypatch)
    slow = _kernel(16)
    tvm.ir.assert_structural_equal(quick, slow)
    assert "a[i] * T.float32(2.0)" in quick.script()


def test_no_module_scan_per_frame(monkeypatch):
    """inspect.getmodule scans sys.modules for a frame whose file does not exist; the quick
    walk never asks for it, inspect's asks once per such frame (the parser's eval'd code)."""
    calls = []
    real = inspect.getmodule

    def counting(obj, filename=None):
        calls.append(obj)
        return real(obj, filename)

    monkeypatch.setattr(inspect, "getmodule", counting)
    _kernel(8)
    quick = len(calls)
    calls.clear()
    _with_original_inspect(monkeypatch)
    _kernel(8)
    assert quick <= 10 and len(calls) > 5 * quick, (quick, len(calls))


def test_a_missing_parser_module_is_skipped(monkeypatch):
    monkeypatch.setattr(tvmscript, "_installed", False)
    monkeypatch.setattr(tvmscript, "PARSER_MODULES", ("tvm.no_such_module",
                                                       *tvmscript.PARSER_MODULES))
    tvmscript.install()
    assert tvmscript._installed
    assert "tvm.no_such_module" not in sys.modules


@pytest.mark.parametrize("depth", [0, 50])
def test_getouterframes_walks_to_the_outermost_frame(depth):
    def nest(k):
        return nest(k - 1) if k else tvmscript.getouterframes(inspect.currentframe())

    frames = nest(depth)
    assert frames[0].function == "nest"
    assert sum(f.function == "nest" for f in frames) == depth + 1
    assert frames[-1].frame.f_back is None
