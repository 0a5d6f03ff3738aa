"""The NEON step (``neon_steps``) as a tensor intrinsic, for the fp32 dense kernels of AArch64
targets (``dense_neon``).

TIR sees a zeroing of ``C`` (``zeroing``: no code) and ``C[i, j] += A[i, k] · B[k, j]`` over a
``rows × 16`` block (``intrinsic``); the step's first k multiplies instead of accumulating, so
the zeroing costs nothing. A step is always scheduled right after its zeroing, so the pair
computes exactly what the two blocks say.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from mbcompile import tvmscript
from mbcompile.targets.schedules.free_zeroing import free_zeroing
from mbcompile.targets.schedules.neon_steps import COLUMNS, Step

tvmscript.install()  # this module parses TVMScript: without the slow frame walk

ROWS = (4, 2, 1)  # rows of a step, most first


def block_rows(m: int) -> int:
    """Rows per step for an M-row matmul: the most of ``ROWS`` that divides M."""
    return next(r for r in ROWS if m % r == 0)


def _make(rows: int, k: int):
    if rows == 1:
        return _make_row(k)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (rows, k), "float32", strides=(sa, 1), offset_factor=1)
        B = T.match_buffer(b, (k, COLUMNS), "float32", offset_factor=1)
        C = T.match_buffer(c, (rows, COLUMNS), "float32", strides=(sc, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:COLUMNS], A[0:rows, 0:k], B[0:k, 0:COLUMNS])
            T.writes(C[0:rows, 0:COLUMNS])
            for i, j, r in T.grid(rows, COLUMNS, k):
                with T.sblock("update"):
                    vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                    T.reads(C[vi, vj], A[vi, vr], B[vr, vj])
                    T.writes(C[vi, vj])
                    C[vi, vj] = C[vi, vj] + A[vi, vr] * B[vr, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (rows, k), "float32", strides=(sa, 1), offset_factor=1)
        B = T.match_buffer(b, (k, COLUMNS), "float32", offset_factor=1)
        C = T.match_buffer(c, (rows, COLUMNS), "float32", strides=(sc, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:COLUMNS], A[0:rows, 0:k], B[0:k, 0:COLUMNS])
            T.writes(C[0:rows, 0:COLUMNS])
            T.evaluate(T.call_extern(
                "int32", Step(rows, k).name,
                C.access_ptr("w"), T.Cast("int32", sc),
                A.access_ptr("r"), T.Cast("int32", sa),
                B.access_ptr("r"),
            ))

    return desc, impl


def _make_row(k: int):
    """``_make`` for one row (a matrix-vector product): the block has no row loop."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (1, k), "float32", offset_factor=1)
        B = T.match_buffer(b, (k, COLUMNS), "float32", offset_factor=1)
        C = T.match_buffer(c, (1, COLUMNS), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0, 0:COLUMNS], A[0, 0:k], B[0:k, 0:COLUMNS])
            T.writes(C[0, 0:COLUMNS])
            for j, r in T.grid(COLUMNS, k):
                with T.sblock("update"):
                    vj, vr = T.axis.remap("SR", [j, r])
                    T.reads(C[0, vj], A[0, vr], B[vr, vj])
                    T.writes(C[0, vj])
                    C[0, vj] = C[0, vj] + A[0, vr] * B[vr, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (1, k), "float32", offset_factor=1)
        B = T.match_buffer(b, (k, COLUMNS), "float32", offset_factor=1)
        C = T.match_buffer(c, (1, COLUMNS), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0, 0:COLUMNS], A[0, 0:k], B[0:k, 0:COLUMNS])
            T.writes(C[0, 0:COLUMNS])
            T.evaluate(T.call_extern(
                "int32", Step(1, k).name,
                C.access_ptr("w"), T.int32(COLUMNS), A.access_ptr("r"), T.int32(k),
                B.access_ptr("r"),
            ))

    return desc, impl


def intrinsic(rows: int, k: int) -> str:
    """The name of the step for a ``rows × 16`` block over ``k`` values of K, registered on
    first use."""
    name = f"mbcompile_neon_fmla_{rows}x{COLUMNS}x{k}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_make(rows, k))
    return name


def zeroing(rows: int) -> str:
    """The name of the zeroing that goes with a step: nothing to run, the step's first k
    multiplies and it overwrites the whole block (``free_zeroing``)."""
    return free_zeroing("float32", rows, COLUMNS)
