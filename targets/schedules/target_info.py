"""What the schedules need to know about a CPU target: SIMD width and register count.

``tvm.target.codegen.llvm_get_vector_width`` answers 512 for every x86-64 CPU in TVM 0.27
(znver3 and haswell included), so the width is derived from the target's features instead;
a CPU that splits 512-bit operations in two (Zen 4) is scheduled with 256-bit vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.target import codegen

from ...passes.attention_kernel import splits_512_bit_vectors


@dataclass(frozen=True)
class CPUInfo:
    """SIMD facts of one target."""

    vector_bits: int
    num_vector_registers: int
    num_cores: int

    def lanes(self, dtype: str) -> int:
        """Elements of ``dtype`` in one vector register (at least 1)."""
        return max(self.vector_bits // tvm.DataType(dtype).bits, 1)


def _has(feature: str, target: tvm.target.Target) -> bool:
    try:
        return bool(codegen.target_has_features(feature, target))
    except tvm.TVMError:
        return False


def cpu_info(target: tvm.target.Target) -> CPUInfo:
    """The SIMD width and vector register count of an ``llvm`` target."""
    num_cores = int(target.attrs.get("num-cores", 0) or 0)
    if _has("avx512f", target):
        if splits_512_bit_vectors(target):
            # Zen 4: AVX2's tiles (16 registers' worth) measured at least as fast as 32-register
            # 256-bit tiles (8 rows × 16) in the whole encoder, and faster than 512-bit ones.
            return CPUInfo(256, 16, num_cores)
        return CPUInfo(512, 32, num_cores)
    if _has("avx", target):
        return CPUInfo(256, 16, num_cores)
    if _has("neon", target) or _has("asimd", target):
        return CPUInfo(128, 32, num_cores)
    # SSE, RISC-V without V, or an unknown CPU: a 128-bit guess keeps the code valid everywhere.
    return CPUInfo(128, 16, num_cores)
