"""Small scratch buffers of a parallel loop's body on the stack: a TIR pass run after TVM's
lowering (in ``tir_pipeline``), before TVM lowers allocations to calls.

TVM 0.27 gives a CPU allocation a stack slot only when it is under 1 KiB; anything larger, in
a parallel loop's body too, becomes a ``TVMBackendAllocWorkspace`` call (and a free) in every
iteration, and LLVM cannot keep a tile behind such a pointer in registers. The reduced-precision
matmuls' accumulator panel is 8 rows × 32 fp32 = exactly 1 KiB, the fp32 kernels' padded tiles
1.5 KiB, the attention's score rows a few KiB. This pass marks every allocation of a constant
size from 1 KiB in a parallel loop's body for the stack, as long as the body's stack buffers
(TVM's own included) stay within ``STACK_BYTES`` in all, with the annotation TVM's
``LowerTVMBuiltin`` honours::

    for task in parallel(48):                 for task in parallel(48):
        acc = T.alloc_buffer((256,))     →       acc = T.alloc_buffer((256,),
        ...                                             annotations={"disable_lower_builtin": 1})
                                                  ...

LLVM then holds a panel's accumulators in registers from the dot products through the
epilogue (the stack slot itself disappears). Alone on one Zen 5 core, interleaved minimums, the
bf16 panel kernels: 384 × 128 → 512 111.6 → 106.5 µs (451 → 473 GFLOP/s), 384 × 512 → 128
470 → 482 GFLOP/s, 384 × 512 → 384 442 → 459. The default encoder on that Zen 5, saved
artifacts, medians of interleaved calls after a 0.2 s pause (minimums): bf16 at 384 tokens 58.3
→ 54.8 ms on 1 thread (48.9 → 47.8), 36.1 → 33.5 on 2; fp32 at 384 114.1 → 101.1 (96.8 →
89.7: its padded tiles are 1.5 KiB); int8 at 128 15.1 → 14.4; bf16 at 128 20.0 → 19.9 (17.4 →
16.3).

Allocations outside a parallel loop, of a size known only at run time, of another scope, or
past ``STACK_BYTES`` are left to TVM (a worker thread's stack is the platform's default: 8 MiB
on glibc, 128 KiB on musl).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

STACK_BYTES = 16 * 1024
TVM_STACK_BYTES = 1024  # TVM's own limit (runtime::kMaxStackAlloca): under it, already the stack
ON_STACK = "disable_lower_builtin"  # tirx::transform::kDisableLowerTVMBuiltin


def size_in_bytes(alloc: tirx.AllocBuffer) -> int | None:
    """The allocation's bytes, or None when its shape is not constant."""
    count = 1
    for extent in alloc.buffer.shape:
        if not isinstance(extent, tirx.IntImm):
            return None
        count *= int(extent)
    dtype = tvm.runtime.DataType(alloc.buffer.dtype)
    return count * dtype.bits * dtype.lanes // 8


def _parallel_body(loop: tirx.For) -> tirx.For:
    """``loop`` with its body's allocations from 1 KiB marked for the stack, in the order they
    come, while all of the body's stack buffers (TVM's own under 1 KiB included) stay within
    ``STACK_BYTES``."""
    if loop.kind != tirx.ForKind.PARALLEL:
        return loop
    used = [0]

    def on_stack(alloc: tirx.AllocBuffer) -> tirx.AllocBuffer:
        size = size_in_bytes(alloc)
        if size is None or alloc.buffer.scope() != "global":
            return alloc
        if size < TVM_STACK_BYTES or ON_STACK in alloc.annotations:
            used[0] += size
            return alloc
        if used[0] + size > STACK_BYTES:
            return alloc
        used[0] += size
        return tirx.AllocBuffer(alloc.buffer, annotations={**alloc.annotations,
                                                           ON_STACK: tirx.IntImm("bool", 1)})

    body = tvm_ffi.structural_map(loop.body, (tirx.AllocBuffer, on_stack), order="pre")
    if body.same_as(loop.body):
        return loop
    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding,
                    loop.annotations, loop.step, loop.span)


def rewrite(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The module doc's marking, on one lowered PrimFunc."""
    body = tvm_ffi.structural_map(func.body, (tirx.For, _parallel_body))
    return func if body.same_as(func.body) else func.with_body(body)


@tirx.transform.prim_func_pass(opt_level=0, name="mbcompile.TilesOnStack")
def TilesOnStack(func, mod, ctx):  # noqa: N802 (a pass, named as TVM's are)
    """The module doc's marking, on every PrimFunc."""
    return rewrite(func)
