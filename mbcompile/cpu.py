"""What the compiler needs to know about a CPU target: vector width, vector registers, cores.

One answer for every stage that sizes code for a CPU: ``FuseAttention`` sizes its attention
kernel's register tiles with it (``mbcompile.passes``), the schedules their register tiles and
packed weight panels (``mbcompile.targets.schedules``). Rank 0 of the layout: imports only tvm
and ``mbcompile.errors``.

``tvm.target.codegen.llvm_get_vector_width`` answers 512 for every x86-64 CPU in TVM 0.27
(znver3 and haswell included), so the width is derived from the target's features instead;
a CPU that splits 512-bit operations in two (Zen 4) counts as a 256-bit one.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.target import codegen

from mbcompile.errors import TargetError

# CPUs with AVX-512 whose cores execute a 512-bit vector operation as two 256-bit halves
# (AMD Zen 4): 512-bit vectors bring no more FLOPs per cycle there, only panels twice as wide.
# Measured on a 2-core Zen 4 (EPYC, znver4), the encoder at seq 128, 2 threads: schedules with
# 256-bit vectors 27.4–28.8 ms against 30.7–32.1 with 512-bit ones.
SPLIT_512_BIT_CPUS = frozenset({"znver4"})


@dataclass(frozen=True)
class CPUInfo:
    """SIMD facts of one target."""

    vector_bits: int
    num_vector_registers: int
    num_cores: int  # the target's ``num-cores``; 0 when it does not say
    # FMA by a vector lane (AArch64 ``fmla v.4s, v.4s, v.s[i]``): a matmul loads a row's next
    # k values with one vector load and multiplies by each lane, instead of one scalar load per
    # k value. x86 has no such form; it broadcasts from memory instead.
    fma_by_lane: bool = False
    # The bf16 pair dot product a bf16 build's matmuls run on, into fp32 lanes: "vdpbf16ps"
    # (AVX512_BF16), "bfdot" (Armv8.6 BF16), or "" for none (``targets/schedules/dense_dot.py``).
    bf16_dot: str = ""
    # The byte dot product an int8 build's matmuls run on, into int32 lanes: "vpdpbusd"
    # (AVX512_VNNI, unsigned activations × signed weights), "vpmaddubsw" (AVX2 without VNNI,
    # the same through int16 pairs), "sdot" (AArch64 dot product, signed × signed), "smull"
    # (NEON without it: byte products widened and summed pairwise), or "".
    int8_dot: str = ""
    # What the matmuls can run on matrix tiles (Intel AMX, ``targets/schedules/dense_tiles.py``):
    # "bf16" (AMX-BF16's ``tdpbf16ps``), "u8s8" (AMX-INT8's ``tdpbusd``). Empty elsewhere.
    tile_kinds: tuple[str, ...] = ()
    # The vector width and register count of the bf16 and int8 dot-product kernels
    # (``dense_dot.py``), when they are not ``vector_bits`` and ``num_vector_registers``: 512
    # and AVX-512's 32 on Zen 4 (below). 0: the same as the fp32 kernels'.
    dot_vector_bits: int = 0
    dot_vector_registers: int = 0

    def lanes(self, dtype: str = "float32") -> int:
        """Elements of ``dtype`` in one vector register (at least 1)."""
        return max(self.vector_bits // tvm.DataType(dtype).bits, 1)

    def dot_lanes(self) -> int:
        """The fp32 (or int32) accumulator lanes of one dot-product instruction."""
        return max((self.dot_vector_bits or self.vector_bits) // 32, 1)

    def dot_registers(self) -> int:
        """The vector registers a dot-product tile may use."""
        return self.dot_vector_registers or self.num_vector_registers


# No target, or not an llvm one: 8 fp32 lanes (AVX2's), which any CPU runs correctly (LLVM splits
# or pads vectors); only the register tiles may spill.
DEFAULT_CPU = CPUInfo(vector_bits=256, num_vector_registers=16, num_cores=0)

TargetLike = tvm.target.Target | dict | str


def _as_target(target: TargetLike) -> tvm.target.Target:
    """A ``tvm.target.Target`` from itself, a dict (``{"kind": "llvm", "mcpu": "znver3"}``) or a
    target string."""
    if isinstance(target, tvm.target.Target):
        return target
    try:
        return tvm.target.Target(target)
    except (ValueError, TypeError, RuntimeError) as err:  # TVM's FFI raises builtin errors
        raise TargetError(
            f"Cannot read {target!r} as a TVM target ({err}); give a tvm.target.Target or a dict "
            "such as {'kind': 'llvm', 'mtriple': 'x86_64-linux-gnu', 'mcpu': 'znver3'}"
        ) from err


def splits_512_bit_vectors(target: TargetLike) -> bool:
    """Whether ``target``'s CPU runs 512-bit vector operations at half width (see above)."""
    return str(_as_target(target).attrs.get("mcpu", "")) in SPLIT_512_BIT_CPUS


def _has(feature: str, target: tvm.target.Target) -> bool:
    try:
        return bool(codegen.target_has_features(feature, target))
    except (ValueError, RuntimeError):  # TVM 0.27 has no tvm.TVMError: FFI errors are builtins
        return False


def _tile_kinds(target: tvm.target.Target) -> tuple[str, ...]:
    if not _has("amx-tile", target):
        return ()
    return tuple(kind for kind, feature in (("bf16", "amx-bf16"), ("u8s8", "amx-int8"))
                 if _has(feature, target))


# str(target) → its CPUInfo: the schedule rules ask for every kernel they look at, and each
# feature query goes through LLVM (about 0.3 ms; 22,000 queries in an 8-length compile).
_KNOWN: dict[str, CPUInfo] = {}


def cpu_info(target: TargetLike | None) -> CPUInfo:
    """The vector width, vector register count and core count of ``target``.

    ``None`` or a target that is not ``llvm`` gives :data:`DEFAULT_CPU` (8 fp32 lanes). The
    ambient ``tvm.target.Target.current`` is never consulted: callers pass the target.
    """
    if target is None:
        return DEFAULT_CPU
    target = _as_target(target)
    if target.kind.name != "llvm":
        return DEFAULT_CPU
    key = str(target)
    info = _KNOWN.get(key)
    if info is None:
        info = _KNOWN[key] = _llvm_cpu_info(target)
    return info


def _llvm_cpu_info(target: tvm.target.Target) -> CPUInfo:
    num_cores = int(target.attrs.get("num-cores", 0) or 0)
    if _has("avx512f", target):
        vnni = _has("avx512vnni", target) and _has("avx512vl", target)
        dots = {
            "bf16_dot": "vdpbf16ps" if _has("avx512bf16", target) and _has("avx512vl", target) else "",
            "int8_dot": "vpdpbusd" if vnni else "vpmaddubsw" if _has("avx512bw", target) else "",
            "tile_kinds": _tile_kinds(target),
        }
        if splits_512_bit_vectors(target):
            # Zen 4: AVX2's tiles (16 registers' worth) measured at least as fast as 32-register
            # 256-bit tiles (8 rows × 16) in the whole encoder, and faster than 512-bit ones.
            # The dot products are the other way round: each row's activation pair (or quad) is
            # broadcast into a vector, and on Zen 4 that broadcast takes a slot of the pipes the
            # dot products run on. Measured alone on one core (a tile of rows × 2 vectors, K
            # 512, in L1): 256-bit vdpbf16ps at 0.19-0.24 ns per 8-lane dot product, 512-bit
            # at 0.14-0.15 (the rate of dot products with no loads at all), the broadcasts
            # halved per multiply-add.
            return CPUInfo(256, 16, num_cores, dot_vector_bits=512, dot_vector_registers=32,
                           **dots)
        return CPUInfo(512, 32, num_cores, **dots)
    if _has("avx", target):
        return CPUInfo(256, 16, num_cores, int8_dot="vpmaddubsw" if _has("avx2", target) else "")
    if _has("neon", target) or _has("asimd", target):
        dot = "sdot" if _has("dotprod", target) else "smull"
        bf16 = "bfdot" if _has("bf16", target) else ""
        return CPUInfo(128, 32, num_cores, fma_by_lane=True, bf16_dot=bf16, int8_dot=dot)
    # SSE, RISC-V without V, or an unknown CPU: a 128-bit guess keeps the code valid everywhere.
    return CPUInfo(128, 16, num_cores)


# precision → (CPUInfo flag, what a target needs for it)
_PRECISION_NEEDS = {
    "bf16": ("bf16_dot", "bf16 dot products: x86 AVX512_BF16 (the avx512bf16 feature: AMD Zen 4, "
             "Intel Cooper Lake, Sapphire Rapids and later) or Armv8.6 BF16 (the bf16 feature: "
             "target aarch64-armv9)"),
    "int8": ("int8_dot", "int8 multiply-adds: x86 AVX2 (the avx2 feature; AVX512_VNNI, avx512vnni, "
             "where there is one) or ARM NEON (the dotprod feature where there is one)"),
}


def check_precision(precision: str, target: TargetLike, name: str) -> None:
    """TargetError unless target ``name`` can run ``precision`` natively (fp32: any)."""
    if precision not in _PRECISION_NEEDS:
        return
    flag, needs = _PRECISION_NEEDS[precision]
    if getattr(cpu_info(target), flag):
        return
    mcpu = str(_as_target(target).attrs.get("mcpu", "?"))
    raise TargetError(
        f"precision={precision!r} needs a CPU with {needs}; target {name!r} (LLVM cpu {mcpu}) "
        "has none. Compile with precision='fp32' for it."
    )
