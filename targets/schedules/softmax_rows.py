"""The bf16 attention's softmax, one row of scores at a time, as LLVM IR functions that
``bf16_attention.py``'s kernel calls (``pragma_import_llvm``; LLVM inlines them).

For a row of scores ``s`` (fp32, a multiple of 32 keys) and the block's bias row ``bias``
(the mask, -inf past the keys)::

    m  = max_row(s, bias)                 # max(s + bias), the biased scores not written back
    Σ  = exp_row(s, bias, pb, -m·log2e)   # pb = bf16(exp(s + bias - m)); Σ of the rounded pb

In IR rather than TIR because the exponential wants AVX-512's ``vscalefps`` (2^n with no
integer steps) and the rounding wants ``vcvtne2ps2bf16`` (two vectors in one instruction),
and the sum of the rounded values one ``vdpbf16ps`` by ones per 32 scores. Both need
AVX512_BF16 (``bf16_attention_steps`` checks the target has it).
"""

from __future__ import annotations

import struct

import numpy as np

from mbcompile.passes.attention_kernel import LOG2E

LANES = 16  # fp32 lanes of AVX-512, which every CPU with AVX512_BF16 has
# 2^f ≈ 1 + f·(c1 + f·(c2 + f·c3)) on |f| <= 1/2: relative error 1.0e-4, well under the 2^-9
# of the bf16 rounding that follows (attention_kernel's degree-5 polynomial is for fp32).
EXP2_POLY3 = (0.69328293, 0.24221097, 0.05500893)
LOW = -126.0  # exp's argument in base 2 is clamped here: -inf (a masked key) gives 2^-126
BF16_ONE = "0xR3F80"  # 1.0 as LLVM IR writes a bfloat


def _float(value: float) -> str:
    """An fp32 constant as LLVM IR writes it (the double of the same value, in hex)."""
    bits = struct.unpack("<Q", struct.pack("<d", float(np.float32(value))))[0]
    return f"0x{bits:016X}"


def exp_row_name(keys: int) -> str:
    return f"mbc_bf16_softmax_exp_{keys}"


def max_row_name(keys: int) -> str:
    return f"mbc_bf16_softmax_max_{keys}"


def _splat(value: float) -> str:
    return "<" + ", ".join([f"float {_float(value)}"] * LANES) + ">"


def max_row_ir(keys: int) -> str:
    """``float @mbc_bf16_softmax_max_<keys>(ptr s, ptr bias)``: the max of ``s[k] + bias[k]``
    over a row of ``keys`` scores (a multiple of 32), two vectors of partial maxima::

        m0 = max(m0, s[k : k + 16] + bias[k : k + 16]);  m1 = ... [k + 16 : k + 32]
        return reduce_max(max(m0, m1))

    The biased scores are not stored: ``exp_row_ir`` adds the bias again as it reads them."""
    v = f"<{LANES} x float>"
    name = max_row_name(keys)
    return f"""
declare {v} @llvm.maxnum.v16f32({v}, {v})
declare float @llvm.vector.reduce.fmax.v16f32({v})

define internal float @{name}(ptr %s, ptr %b) {{
entry:
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%inext, %loop]
  %m0 = phi {v} [{_splat(float("-inf"))}, %entry], [%m0n, %loop]
  %m1 = phi {v} [{_splat(float("-inf"))}, %entry], [%m1n, %loop]
  %ps0 = getelementptr float, ptr %s, i64 %i
  %pb0 = getelementptr float, ptr %b, i64 %i
  %ps1 = getelementptr float, ptr %ps0, i64 {LANES}
  %pb1 = getelementptr float, ptr %pb0, i64 {LANES}
  %s0 = load {v}, ptr %ps0, align 4
  %b0 = load {v}, ptr %pb0, align 4
  %s1 = load {v}, ptr %ps1, align 4
  %b1 = load {v}, ptr %pb1, align 4
  %x0 = fadd {v} %s0, %b0
  %x1 = fadd {v} %s1, %b1
  %m0n = call nnan {v} @llvm.maxnum.v16f32({v} %m0, {v} %x0)
  %m1n = call nnan {v} @llvm.maxnum.v16f32({v} %m1, {v} %x1)
  %inext = add i64 %i, {2 * LANES}
  %more = icmp ult i64 %inext, {keys}
  br i1 %more, label %loop, label %done
done:
  %m = call nnan {v} @llvm.maxnum.v16f32({v} %m0n, {v} %m1n)
  %r = call nnan float @llvm.vector.reduce.fmax.v16f32({v} %m)
  ret float %r
}}
"""


def exp_row_ir(keys: int) -> str:
    """``float @mbc_bf16_softmax_exp_<keys>(ptr s, ptr bias, ptr pb, float shift)``: for a row
    of ``keys`` scores (a multiple of 32), ``pb[k] = bf16(2^((s[k] + bias[k])·log2e + shift))``
    and the sum of the rounded values, 32 scores per iteration::

        t = max((s + bias) · log2e + shift, -126);  n = roundeven(t);  f = t - n
        e = scalef(poly3(f), n)                        # vscalefps: e · 2^n, no integer steps
        pb[k : k + 32] = cvtne2ps2bf16(e[16:], e[:16]) # two vectors rounded in one instruction
        sum' += dpbf16ps(pb[k : k + 32], 1.0)          # the sum of the rounded values

    The sum alternates between two accumulators (``sum'`` is the one of two iterations back),
    so each dot product waits on the one before the last, not the last. Inlined into the
    kernel, where the row's bias stays in registers across the rows: LLVM broadcasts the
    polynomial's constants from memory in the loop (loads, not vector work)."""
    v = f"<{LANES} x float>"
    vb = f"<{2 * LANES} x bfloat>"
    ones = "<" + ", ".join([f"bfloat {BF16_ONE}"] * (2 * LANES)) + ">"
    c1, c2, c3 = EXP2_POLY3

    def exp(x: str, tag: str) -> list[str]:
        return [
            f"  %t0{tag} = call {v} @llvm.fma.v16f32({v} {x}, {v} {_splat(LOG2E)}, {v} %shiftv)",
            f"  %low{tag} = fcmp ogt {v} %t0{tag}, {_splat(LOW)}",
            f"  %t{tag} = select <{LANES} x i1> %low{tag}, {v} %t0{tag}, {v} {_splat(LOW)}",
            f"  %n{tag} = call {v} @llvm.roundeven.v16f32({v} %t{tag})",
            f"  %f{tag} = fsub {v} %t{tag}, %n{tag}",
            f"  %p3{tag} = call {v} @llvm.fma.v16f32({v} {_splat(c3)}, {v} %f{tag}, {v} {_splat(c2)})",
            f"  %p2{tag} = call {v} @llvm.fma.v16f32({v} %p3{tag}, {v} %f{tag}, {v} {_splat(c1)})",
            f"  %p1{tag} = call {v} @llvm.fma.v16f32({v} %p2{tag}, {v} %f{tag}, {v} {_splat(1.0)})",
            f"  %e{tag} = call {v} @llvm.x86.avx512.mask.scalef.ps.512({v} %p1{tag}, {v} %n{tag}, "
            f"{v} zeroinitializer, i16 -1, i32 4)",
        ]

    name = exp_row_name(keys)
    body = "\n".join(
        [
            "  %i = phi i64 [0, %entry], [%inext, %loop]",
            f"  %acc = phi {v} [zeroinitializer, %entry], [%other, %loop]",
            f"  %other = phi {v} [zeroinitializer, %entry], [%acc1, %loop]",
            "  %ps0 = getelementptr float, ptr %s, i64 %i",
            "  %pb0 = getelementptr float, ptr %b, i64 %i",
            f"  %ps1 = getelementptr float, ptr %ps0, i64 {LANES}",
            f"  %pb1 = getelementptr float, ptr %pb0, i64 {LANES}",
            f"  %s0 = load {v}, ptr %ps0, align 4",
            f"  %b0 = load {v}, ptr %pb0, align 4",
            f"  %s1 = load {v}, ptr %ps1, align 4",
            f"  %b1 = load {v}, ptr %pb1, align 4",
            f"  %x0 = fadd {v} %s0, %b0",
            f"  %x1 = fadd {v} %s1, %b1",
            *exp("%x0", "a"),
            *exp("%x1", "b"),
            f"  %bf = call {vb} @llvm.x86.avx512bf16.cvtne2ps2bf16.512({v} %eb, {v} %ea)",
            "  %q = getelementptr i16, ptr %pb, i64 %i",
            f"  store {vb} %bf, ptr %q, align 2",
            f"  %acc1 = call {v} @llvm.x86.avx512bf16.dpbf16ps.512({v} %acc, {vb} %bf, {vb} {ones})",
            f"  %inext = add i64 %i, {2 * LANES}",
            f"  %more = icmp ult i64 %inext, {keys}",
        ]
    )
    return f"""
declare {v} @llvm.fma.v16f32({v}, {v}, {v})
declare {v} @llvm.roundeven.v16f32({v})
declare {v} @llvm.x86.avx512.mask.scalef.ps.512({v}, {v}, {v}, i16, i32)
declare {vb} @llvm.x86.avx512bf16.cvtne2ps2bf16.512({v}, {v})
declare {v} @llvm.x86.avx512bf16.dpbf16ps.512({v}, {vb}, {vb})
declare float @llvm.vector.reduce.fadd.v16f32(float, {v})

define internal float @{name}(ptr %s, ptr %b, ptr %pb, float %shift) {{
entry:
  %shift1 = insertelement {v} poison, float %shift, i64 0
  %shiftv = shufflevector {v} %shift1, {v} poison, <{LANES} x i32> zeroinitializer
  br label %loop
loop:
{body}
  br i1 %more, label %loop, label %done
done:
  %both = fadd {v} %acc1, %other
  %sum = call reassoc float @llvm.vector.reduce.fadd.v16f32(float 0.0, {v} %both)
  ret float %sum
}}
"""
