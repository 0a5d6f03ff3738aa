"""A block of a bf16 or int8 matmul as one tensor intrinsic: ``rows`` rows × 32 columns × 128 k
values on AVX512_BF16 (``vdpbf16ps``) or AVX512_VNNI (``vpdpbusd``: unsigned activation bytes
by signed weight bytes, int32 sums), the accumulators in registers for the whole block
(``dot_steps``' function).

``dot_intrinsics``' steps are one instruction each, and the kernel around them must keep its
accumulator tile in a stack buffer for LLVM to hold it in registers: TVM 0.27 keeps a buffer on
the stack only under 1 KiB, which caps a tile of 32 fp32 columns at 7 rows (6 or 4 where the
rows must divide M). A panel step holds its accumulators itself::

    C[0:rows, 0:32] += A[0:rows, 0:128] · B[0:64, 0:32, 0:2]      (bf16 pairs, fp32 C)

(``A``: bf16 rows, any row stride; ``B``: one 32-column panel of ``pack_bf16``'s weights,
k pairs outer; ``C``: fp32 rows, any row stride), so C can be any buffer. Measured alone on one
core of a Zen 5 (``vdpbf16ps`` from registers, K 256 in L1): 8 rows × 2 vectors 447 GFLOP/s,
6 × 2 409, 4 × 2 318 (``dense_dot`` picks 4 rows at 128 tokens).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from mbcompile import tvmscript
from mbcompile.targets.schedules import dot_steps

tvmscript.install()

COLUMNS = dot_steps.COLUMNS  # 32: two 16-lane vectors
CHUNK = 128  # k values per step: a matmul's K runs in chunks, C loaded and stored per chunk
# The row counts registered (the rows of a block: the largest that divides M; parsing each
# intrinsic's TVMScript costs about 15 ms at import). 8 × 2 accumulators + B + broadcasts: 20
# of AVX-512's 32 registers.
ROWS = (2, 4, 8)


def _widen_bf16(value):
    return T.reinterpret(T.shift_left(T.Cast("uint32", value), T.uint32(16)), dtype="float32")


def _widen_int(value):
    return T.Cast("int32", value)


# instruction → (k values per B row, A dtype, B dtype, C dtype, widening, A bytes per value)
_KINDS = {
    "vdpbf16ps": (2, "uint16", "uint16", "float32", _widen_bf16, 2),
    "vpdpbusd": (4, "uint8", "int8", "int32", _widen_int, 1),
}


def _intrinsic(rows: int, instruction: str):
    depth, a_dtype, b_dtype, c_dtype, widen, a_bytes = _KINDS[instruction]
    groups = CHUNK // depth
    step = dot_steps.function_name(rows, accumulate=True, instruction=instruction)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int64()
        sc = T.int64()
        A = T.match_buffer(a, (rows, CHUNK), a_dtype, strides=[sa, 1], offset_factor=1)
        B = T.match_buffer(b, (groups, COLUMNS, depth), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (rows, COLUMNS), c_dtype, strides=[sc, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:COLUMNS], A[0:rows, 0:CHUNK], B[0:groups, 0:COLUMNS, 0:depth])
            T.writes(C[0:rows, 0:COLUMNS])
            for i, j, k in T.grid(rows, COLUMNS, CHUNK):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + widen(A[vi, vk]) * widen(
                        B[vk // depth, vj, vk % depth])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int64()
        sc = T.int64()
        A = T.match_buffer(a, (rows, CHUNK), a_dtype, strides=[sa, 1], offset_factor=1)
        B = T.match_buffer(b, (groups, COLUMNS, depth), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (rows, COLUMNS), c_dtype, strides=[sc, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:COLUMNS], A[0:rows, 0:CHUNK], B[0:groups, 0:COLUMNS, 0:depth])
            T.writes(C[0:rows, 0:COLUMNS])
            T.evaluate(T.call_extern(
                "int32", step,
                A.access_ptr("r"), T.Cast("int64", sa * a_bytes),
                B.access_ptr("r"), T.int64(COLUMNS * 4),
                C.access_ptr("rw"), T.Cast("int64", sc * 4),
                T.int64(groups), T.int64(1), T.int64(0), T.int64(0),
            ))  # fmt: skip

    return desc, impl


INSTRUCTIONS = tuple(_KINDS)


def intrinsic_name(rows: int, instruction: str = "vdpbf16ps") -> str:
    """The registered intrinsic of ``rows`` rows (one of ``ROWS``) on ``instruction``."""
    kind = "bf16" if instruction == "vdpbf16ps" else "u8s8"
    return f"mbcompile_{kind}_panel_{rows}x{COLUMNS}x{CHUNK}_{instruction}"


def llvm_ir(rows: int, instruction: str = "vdpbf16ps") -> str:
    """The step function the intrinsic of ``rows`` rows calls, for ``pragma_import_llvm``."""
    return dot_steps.llvm_ir(rows, accumulate=True, instruction=instruction)


# Registered on import, before any tuning database is read: its records name them.
for _instruction in INSTRUCTIONS:
    for _rows in ROWS:
        if TensorIntrin.get(intrinsic_name(_rows, _instruction), allow_missing=True) is None:
            TensorIntrin.register(intrinsic_name(_rows, _instruction),
                                  *_intrinsic(_rows, _instruction))
