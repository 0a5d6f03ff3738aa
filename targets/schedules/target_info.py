"""What the schedules need to know about a CPU target: SIMD width and register count.

``tvm.target.codegen.llvm_get_vector_width`` answers 512 for every x86-64 CPU in TVM 0.27
(znver3 and haswell included), so the width is derived from the target's features instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.target import codegen


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
        return CPUInfo(512, 32, num_cores)
    if _has("avx", target):
        return CPUInfo(256, 16, num_cores)
    if _has("neon", target) or _has("asimd", target):
        return CPUInfo(128, 32, num_cores)
    # SSE, RISC-V without V, or an unknown CPU: a 128-bit guess keeps the code valid everywhere.
    return CPUInfo(128, 16, num_cores)
