"""The bf16 dot-product step of a matmul: AVX512_BF16's ``vdpbf16ps`` as a tensor intrinsic.

One step multiplies a pair of bf16 activations (k, k+1) by ``lanes`` columns of a bf16 weight
pair panel and adds the products to ``lanes`` fp32 accumulators::

    C[j] += f32(A[0]) · f32(B[j, 0]) + f32(A[1]) · f32(B[j, 1])      j < lanes

bf16 values are stored as their upper 16 bits (``uint16``; ``bf16.widen`` reads one as fp32).
``vdpbf16ps`` does 2 multiply-adds per fp32 lane in one instruction, where fp32 FMA does one.

TVM 0.27 cannot emit the instruction directly: its ``bfloat16`` values are legalized to fp32
before code generation, and LLVM 22's ``llvm.x86.avx512bf16.dpbf16ps`` takes ``<N x bfloat>``.
So the step calls a tiny LLVM IR function (``DOT_LLVM``, linked into the kernel through the
``pragma_import_llvm`` annotation ``annotate`` puts on a loop) that bitcasts integer vectors to
bfloat ones and calls the intrinsic; LLVM inlines it. The kernel must keep its accumulators in
a stack buffer (under 1 KiB in TVM 0.27) for LLVM to hold them in registers across the calls.
"""

from __future__ import annotations

from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

# lanes → (intrinsic name, LLVM IR of the step function)
_STEP = "mbc_dpbf16ps_{lanes}"


def _llvm_ir(lanes: int) -> str:
    bits = 32 * lanes
    name = _STEP.format(lanes=lanes)
    return f"""
declare <{lanes} x float> @llvm.x86.avx512bf16.dpbf16ps.{bits}(<{lanes} x float>, <{2 * lanes} x bfloat>, <{2 * lanes} x bfloat>)
define internal <{lanes} x float> @{name}(<{lanes} x float> %c, <{lanes} x i32> %a, <{lanes} x i32> %b) alwaysinline {{
  %av = bitcast <{lanes} x i32> %a to <{2 * lanes} x bfloat>
  %bv = bitcast <{lanes} x i32> %b to <{2 * lanes} x bfloat>
  %r = call <{lanes} x float> @llvm.x86.avx512bf16.dpbf16ps.{bits}(<{lanes} x float> %c, <{2 * lanes} x bfloat> %av, <{2 * lanes} x bfloat> %bv)
  ret <{lanes} x float> %r
}}
"""


def _widen(value):
    return T.reinterpret(T.shift_left(T.Cast("uint32", value), T.uint32(16)), dtype="float32")


def _intrinsic(lanes: int):
    f32 = f"float32x{lanes}"

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((2,), "uint16", offset_factor=1),
        B: T.Buffer((lanes, 2), "uint16", offset_factor=1),
        C: T.Buffer((lanes,), "float32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            for j in T.serial(0, lanes):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vj, vk = T.axis.remap("SR", [j, k])
                        C[vj] = C[vj] + _widen(A[vk]) * _widen(B[vj, vk])

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((2,), "uint16", offset_factor=1),
        B: T.Buffer((lanes, 2), "uint16", offset_factor=1),
        C: T.Buffer((lanes,), "float32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            # One expression: a named intermediate would become a memory buffer.
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_pure_extern(
                f32,
                _STEP.format(lanes=lanes),
                C.vload([0], dtype=f32),
                T.broadcast(T.reinterpret(A.vload([0], "uint16x2"), dtype="int32"), lanes),
                T.reinterpret(B.vload([0, 0], dtype=f"uint16x{2 * lanes}"), dtype=f"int32x{lanes}"),
            )

    return desc, impl


def intrinsic_name(lanes: int) -> str:
    """The registered tensor intrinsic for ``lanes`` fp32 accumulators (8: 256-bit, 16: 512)."""
    name = f"mbcompile_dot_{lanes}x2_bf16"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_intrinsic(lanes))
    return name


def annotate(sch: Schedule, loop, lanes: int) -> None:
    """Link the step function into the kernel: a pragma on ``loop``, an outer loop of the
    tensorized steps."""
    sch.annotate(loop, "pragma_import_llvm", _llvm_ir(lanes))
