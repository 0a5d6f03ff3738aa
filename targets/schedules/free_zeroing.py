"""The zeroing of an accumulator block before a step that starts from zeros itself, as a tensor
intrinsic that runs nothing.

A matmul step written in LLVM IR (``tile_intrinsics``: AMX's ``tilezero``; ``neon_intrinsics``:
the first k multiplies) overwrites its whole ``rows × cols`` block. TIR still has the reduction's
zeroing block before it (``decompose_reduction``); tensorized with this, it costs nothing::

    for i, j in grid(rows, cols):  C[i, j] = 0        →        (no code)

A step is always scheduled right after its zeroing, so the pair computes exactly what the two
blocks say. One row (``rows == 1``) has no row loop in the block.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from mbcompile import tvmscript

tvmscript.install()  # this module parses TVMScript: without the slow frame walk


def _make(acc: str, rows: int, cols: int):
    zero = T.float32(0) if acc == "float32" else T.int32(0)

    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        sc = T.int32()
        C = T.match_buffer(c, (rows, cols), acc, strides=(sc, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0:cols])
            for i, j in T.grid(rows, cols):
                with T.sblock("zero"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    T.reads()
                    T.writes(C[vi, vj])
                    C[vi, vj] = zero

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        sc = T.int32()
        C = T.match_buffer(c, (rows, cols), acc, strides=(sc, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0:cols])
            T.evaluate(0)

    return desc, impl


def _make_row(acc: str, cols: int):
    zero = T.float32(0) if acc == "float32" else T.int32(0)

    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        C = T.match_buffer(c, (1, cols), acc, offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0, 0:cols])
            for j in T.serial(cols):
                with T.sblock("zero"):
                    vj = T.axis.remap("S", [j])
                    T.reads()
                    T.writes(C[0, vj])
                    C[0, vj] = zero

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        C = T.match_buffer(c, (1, cols), acc, offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0, 0:cols])
            T.evaluate(0)

    return desc, impl


def free_zeroing(acc: str, rows: int, cols: int) -> str:
    """The name of the zeroing of a ``rows × cols`` block of ``acc`` (``"float32"``,
    ``"int32"``), registered on first use."""
    name = f"mbcompile_free_zero_{acc}_{rows}x{cols}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        made = _make_row(acc, cols) if rows == 1 else _make(acc, rows, cols)
        TensorIntrin.register(name, *made)
    return name
