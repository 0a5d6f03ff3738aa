"""fp32 → bf16 rounding as one ``vcvtneps2bf16`` where the CPU has AVX512_BF16: a TIR pass run
after TVM's lowering, in the TIR pipeline that ``codegen`` builds every kernel with
(``tir_pipeline``).

``pack_bf16.round_bf16`` rounds to nearest even with integer steps, which every target can run;
vectorised by 16 lanes it is six vector instructions (two shifts, an and, two adds, a narrowing
``vpmovdw``)::

    Cast("uint16x16", (u + 0x7FFF + ((u >> 16) & 1)) >> 16)      u = reinterpret("uint32x16", x)
        →  call_extern("uint16x16", "mbc_round_bf16x16", reinterpret("float32x16", u))

and ``mbc_round_bf16x16`` (LLVM IR, imported into the kernel by a ``pragma_import_llvm``
attribute around its body, inlined) is one ``vcvtneps2bf16``. Only the 16-lane form is
rewritten (TVM's vectorised loops of the epilogues and rounding kernels); anything else keeps
the integer steps. Alone on one Zen 5 core, a 384 × 128 → 512 bf16 matmul whose epilogue
(bias, relu) rounds its output to bf16 took 126.5 µs with the integer steps and 118.8 with a
truncation in their place.

MetaSchedule's builder times tuning candidates with TVM's default pipeline, without this
rewrite: a candidate's epilogue rounding costs it the same few percent whatever its schedule.

Numbers: the same nearest-even rounding for every normal value, infinity and zero; a NaN
stays a NaN (the integer steps turn a NaN whose payload is in the low half into infinity); an
fp32 denormal (below 1.2e-38 in magnitude) becomes a signed zero, where the integer steps
keep its top bits.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir import StringImm
from tvm.ir.expr import Call

from mbcompile.cpu import cpu_info

FUNCTION = "mbc_round_bf16x16"
LANES = 16
IR = f"""
declare <16 x bfloat> @llvm.x86.avx512bf16.cvtneps2bf16.512(<16 x float>)
define internal <16 x i16> @{FUNCTION}(<16 x float> %x) alwaysinline {{
  %r = call <16 x bfloat> @llvm.x86.avx512bf16.cvtneps2bf16.512(<16 x float> %x)
  %b = bitcast <16 x bfloat> %r to <16 x i16>
  ret <16 x i16> %b
}}
"""


def _const(expr) -> int | None:
    """The value of ``expr``, an integer or a broadcast of one, else None."""
    if isinstance(expr, tirx.Broadcast):
        expr = expr.value
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def _operands(expr, node: type, call: str):
    """(a, b) of a binary ``node`` (``a >> b``, ``a & b``) or of the same op as a ``call``,
    else None."""
    if isinstance(expr, node):
        return expr.a, expr.b
    if isinstance(expr, Call) and getattr(expr.op, "name", "") == call:
        return tuple(expr.args)
    return None


def _shift_right(expr):
    return _operands(expr, tirx.RShift, "tirx.shift_right")


def _bitwise_and(expr):
    return _operands(expr, tirx.BitwiseAnd, "tirx.bitwise_and")


def _terms(expr) -> list:
    """The terms of a sum (nested ``Add`` in any association)."""
    if isinstance(expr, tirx.Add):
        return _terms(expr.a) + _terms(expr.b)
    return [expr]


def _rounded_bits(cast) -> tirx.PrimExpr | None:
    """``u`` of the module doc's pattern, else None."""
    if str(cast.ty) != f"uint16x{LANES}":
        return None
    shifted = _shift_right(cast.value)
    if shifted is None or _const(shifted[1]) != 16:
        return None
    terms = _terms(shifted[0])
    if len(terms) != 3:
        return None
    bias = [t for t in terms if _const(t) == 0x7FFF]
    lsb = [t for t in terms if _bitwise_and(t) is not None]
    if len(bias) != 1 or len(lsb) != 1:
        return None
    (u,) = [t for t in terms if t is not bias[0] and t is not lsb[0]]
    if str(u.ty) != f"uint32x{LANES}":
        return None
    if isinstance(u, Call) and not (getattr(u.op, "name", "") == "tirx.reinterpret"
                                    and str(u.args[0].ty) == f"float32x{LANES}"):
        return None  # integer bits that are not an fp32 value's (a let-bound value may be)
    x, one = _bitwise_and(lsb[0])
    if _const(x) == 1:
        x, one = one, x
    inner = _shift_right(x)
    if _const(one) != 1 or inner is None or _const(inner[1]) != 16:
        return None
    return u if tvm_ffi.structural_equal(inner[0], u) else None


def rewrite(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every 16-lane rounding as the instruction (and its IR imported), or as it
    was if it has none."""
    found = []

    def replace(cast):
        u = _rounded_bits(cast)
        if u is None:
            return cast
        found.append(cast)
        return tirx.call_extern(f"uint16x{LANES}", FUNCTION,
                                tirx.reinterpret(f"float32x{LANES}", u))

    body = tvm_ffi.structural_map(func.body, (tirx.Cast, replace))
    if not found:
        return func
    body = tirx.AttrStmt(StringImm("default"), "pragma_import_llvm", StringImm(IR), body)
    return func.with_body(body)


def has_instruction(target: tvm.target.Target | None) -> bool:
    """Whether ``target`` has ``vcvtneps2bf16`` (AVX512_BF16: every CPU with ``vdpbf16ps``)."""
    return target is not None and cpu_info(target).bf16_dot == "vdpbf16ps"


@tirx.transform.prim_func_pass(opt_level=0, name="mbcompile.RoundWithInstruction")
def RoundWithInstruction(func, mod, ctx):  # noqa: N802 (a pass, named as TVM's are)
    """The module doc's rewrite, on PrimFuncs whose target has the instruction."""
    target = func.attrs.get("target") if func.attrs is not None else None
    return rewrite(func) if has_instruction(target) else func

