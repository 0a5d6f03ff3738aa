"""Dot-product steps of a reduced-precision matmul, as tensor intrinsics.

One step multiplies ``depth`` consecutive activations (k .. k+depth) by ``lanes`` columns of a
weight panel stored ``[lanes, depth]`` and adds the sums to ``lanes`` accumulators::

    C[j] += Σ_p  A[p] · B[j, p]                     j < lanes, p < depth

- bf16 (``depth`` 2, fp32 accumulators): AVX512_BF16's ``vdpbf16ps``, Armv8.6's ``bfdot``.
  bf16 values are stored as their upper 16 bits (``uint16``; ``pack_bf16.widen`` reads one as
  fp32).
- int8 (``depth`` 4, int32 accumulators; ``pack_int8``): ``u8s8``, unsigned activations by
  signed weights, on AVX512_VNNI's ``vpdpbusd`` or, without VNNI, AVX2's ``vpmaddubsw`` +
  ``vpmaddwd``; or ``s8s8``, signed by signed, on AArch64's ``sdot`` or, without the dot
  product, NEON's ``smull`` + ``saddlp`` + ``addp``.

``lanes`` is 16 (512-bit vectors), 8 (256-bit, on CPUs that split 512-bit operations) or 4
(AArch64's 128-bit). Each does 2 (bf16) or 4 (int8) multiply-adds per lane in one instruction,
where fp32 FMA does one.

bf16: TVM 0.27 cannot emit ``vdpbf16ps`` or ``bfdot`` directly: its ``bfloat16`` values are
legalized to fp32 before code generation, and LLVM 22's intrinsics for them take
``<N x bfloat>``. So the step calls a tiny LLVM IR function (``_bf16_llvm_ir``, linked into the
kernel by the ``pragma_import_llvm`` annotation ``prepare_loop`` puts on a loop) that bitcasts
integer vectors to bfloat ones and calls the intrinsic; LLVM inlines it. Either way the kernel
must keep its accumulators in a stack buffer (under 1 KiB in TVM 0.27) for LLVM to hold them
in registers across the steps.
"""

from __future__ import annotations

from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

from mbcompile import tvmscript

tvmscript.install()  # this module parses TVMScript: without the slow frame walk

_BF16_STEP = "mbc_{instruction}_{lanes}"
_BF16_INTRINSICS = {"vdpbf16ps": "@llvm.x86.avx512bf16.dpbf16ps.{bits}",
                    "bfdot": "@llvm.aarch64.neon.bfdot.v{lanes}f32.v{pairs}bf16"}


def _bf16_llvm_ir(instruction: str, lanes: int) -> str:
    bits, pairs = 32 * lanes, 2 * lanes
    name = _BF16_STEP.format(instruction=instruction, lanes=lanes)
    intrinsic = _BF16_INTRINSICS[instruction].format(bits=bits, lanes=lanes, pairs=pairs)
    acc, ints, bf = f"<{lanes} x float>", f"<{lanes} x i32>", f"<{pairs} x bfloat>"
    return f"""
declare {acc} {intrinsic}({acc}, {bf}, {bf})
define internal {acc} @{name}({acc} %c, {ints} %a, {ints} %b) alwaysinline {{
  %av = bitcast {ints} %a to {bf}
  %bv = bitcast {ints} %b to {bf}
  %r = call {acc} {intrinsic}({acc} %c, {bf} %av, {bf} %bv)
  ret {acc} %r
}}
"""


def _desc(lanes: int, depth: int, a_dtype: str, b_dtype: str, acc_dtype: str, widen):
    """What a step computes: ``C[j] += Σ_p widen(A[p]) · widen(B[j, p])``."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((depth,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, depth), b_dtype, offset_factor=1),
        C: T.Buffer((lanes,), acc_dtype, offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes, 0:depth])
            T.writes(C[0:lanes])
            for j in T.serial(0, lanes):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vj, vk = T.axis.remap("SR", [j, k])
                        C[vj] = C[vj] + widen(A[vk]) * widen(B[vj, vk])

    return desc


def _widen_int(value):
    return T.Cast("int32", value)


def _widen_bf16(value):
    return T.reinterpret(T.shift_left(T.Cast("uint32", value), T.uint32(16)), dtype="float32")


def _bf16(lanes: int, instruction: str = "vdpbf16ps"):
    f32 = f"float32x{lanes}"

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
                _BF16_STEP.format(instruction=instruction, lanes=lanes),
                C.vload([0], dtype=f32),
                T.broadcast(T.reinterpret(A.vload([0], "uint16x2"), dtype="int32"), lanes),
                T.reinterpret(B.vload([0, 0], dtype=f"uint16x{2 * lanes}"), dtype=f"int32x{lanes}"),
            )

    return _desc(lanes, 2, "uint16", "uint16", "float32", _widen_bf16), impl


def _u8s8(lanes: int):
    i32 = f"int32x{lanes}"
    intrinsic = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic),
                C.vload([0], dtype=i32),
                # LLVM 22 takes the bytes as <4·lanes x i8> (TVM's own VNNI intrinsic predates it)
                T.reinterpret(
                    T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                    dtype=f"int8x{4 * lanes}",
                ),
                B.vload([0, 0], dtype=f"int8x{4 * lanes}"),
                dtype=i32,
            )

    return _desc(lanes, 4, "uint8", "int8", "int32", _widen_int), impl


def _u8s8_maddubs(lanes: int):
    """The same step without VNNI: ``vpmaddubsw`` (byte pairs into saturating int16) then
    ``vpmaddwd`` by ones (int16 pairs into int32). A pair saturates past 32767, so the
    weights take 7 bits (``pack_int8.weight_qmax``): 2·255·63 fits."""
    i32, i16, i8 = f"int32x{lanes}", f"int16x{2 * lanes}", f"int8x{4 * lanes}"
    maddubs, maddwd = (
        ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd")
        if lanes == 8
        else ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512")
    )

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=i32) + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(maddwd),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(maddubs),
                    T.reinterpret(
                        T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                        dtype=i8,
                    ),
                    B.vload([0, 0], dtype=i8),
                    dtype=i16,
                ),
                T.broadcast(T.int16(1), 2 * lanes),
                dtype=i32,
            )

    return _desc(lanes, 4, "uint8", "int8", "int32", _widen_int), impl


def _s8s8(lanes: int):
    i32, i8 = f"int32x{lanes}", f"int8x{4 * lanes}"
    intrinsic = f"llvm.aarch64.neon.sdot.v{lanes}i32.v{4 * lanes}i8"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            # the broadcast activations second: LLVM then multiplies by a vector lane (the
            # indexed sdot) where they come from a register, as staged rows do
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic),
                C.vload([0], dtype=i32),
                B.vload([0, 0], dtype=i8),
                T.reinterpret(
                    T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), lanes),
                    dtype=i8,
                ),
                dtype=i32,
            )

    return _desc(lanes, 4, "int8", "int8", "int32", _widen_int), impl


def _s8s8_smull(lanes: int):
    """The step on plain ARMv8 NEON, without the dot product: ``smull`` of the activations'
    4 bytes (twice, 8 lanes) by each half of the weight panel (int16 products), ``saddlp``
    (adjacent products into int32), ``addp`` (the two halves' pairs into one sum per column).
    (TVM's ``tensor_intrin.arm_cpu`` has the same sequence, but importing it imports the GPU
    intrinsics too: seconds at every start.)"""
    smull = "llvm.aarch64.neon.smull.v8i16"
    saddlp = "llvm.aarch64.neon.saddlp.v4i32.v8i16"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((4,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            C[T.ramp(T.int32(0), 1, 4)] = C.vload([0], dtype="int32x4") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(saddlp),
                    T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(smull),
                        T.reinterpret(
                            T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 2),
                            dtype="int8x8",
                        ),
                        T.vectorlow(B.vload([0, 0], dtype="int8x16"), dtype="int8x8"),
                        dtype="int16x8",
                    ),
                    dtype="int32x4",
                ),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(saddlp),
                    T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(smull),
                        T.reinterpret(
                            T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 2),
                            dtype="int8x8",
                        ),
                        T.vectorhigh(B.vload([0, 0], dtype="int8x16"), dtype="int8x8"),
                        dtype="int16x8",
                    ),
                    dtype="int32x4",
                ),
                dtype="int32x4",
            )

    return _desc(lanes, 4, "int8", "int8", "int32", _widen_int), impl


# instruction → (kind, its maker, the lane counts it exists for). The kind is what the matmul
# computes (``dense_dot`` reads it from the kernel); the instruction, what the CPU has
# (``CPUInfo.bf16_dot``, ``CPUInfo.int8_dot``).
_STEPS = {
    "vdpbf16ps": ("bf16", _bf16, (8, 16)),
    "bfdot": ("bf16", lambda lanes: _bf16(lanes, "bfdot"), (4,)),
    "vpdpbusd": ("u8s8", _u8s8, (8, 16)),
    "vpmaddubsw": ("u8s8", _u8s8_maddubs, (8, 16)),
    "sdot": ("s8s8", _s8s8, (4,)),
    "smull": ("s8s8", _s8s8_smull, (4,)),
}


def depth(kind: str) -> int:
    """k values per step: 2 for bf16, 4 for the int8 kinds."""
    return 2 if kind == "bf16" else 4


def kind_of(instruction: str) -> str:
    """What ``instruction`` computes: "bf16", "u8s8" or "s8s8"."""
    return _STEPS[instruction][0]


def intrinsic_name(instruction: str, lanes: int) -> str:
    """The registered tensor intrinsic of ``instruction`` for ``lanes`` accumulators."""
    return f"mbcompile_dot_{lanes}x{depth(kind_of(instruction))}_{instruction}"


def available(instruction: str, lanes: int) -> bool:
    """Whether ``instruction`` has an intrinsic for ``lanes``."""
    return instruction in _STEPS and lanes in _STEPS[instruction][2]


# Registered on import, before any tuning database is read: its records name them.
for _instruction, (_, _make, _widths) in _STEPS.items():
    for _lanes in _widths:
        if TensorIntrin.get(intrinsic_name(_instruction, _lanes), allow_missing=True) is None:
            TensorIntrin.register(intrinsic_name(_instruction, _lanes), *_make(_lanes))


def prepare_loop(sch: Schedule, loop, instruction: str, lanes: int) -> None:
    """What a kernel of ``instruction`` steps needs on an outer loop of them: bf16 links its
    step function (``pragma_import_llvm``); the int8 ones need nothing."""
    if kind_of(instruction) == "bf16":
        sch.annotate(loop, "pragma_import_llvm", _bf16_llvm_ir(instruction, lanes))
