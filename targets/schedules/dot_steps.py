"""bf16 matmul steps on AVX512_BF16 vectors (``vdpbf16ps``), for a kernel that calls them directly
(and the same steps on AVX512_VNNI's ``vpdpbusd`` for int8, ``panel_intrinsics``).

The fused attention in reduced precision (``bf16_attention.py``) multiplies small blocks it
packs itself: the scores ``q · kᵀ`` and the context ``p · v``. Where the CPU has AMX it calls
``tile_intrinsics``' step; where it has AVX512_BF16 but no tiles (AMD Zen 4, Intel Cooper Lake)
it calls this one, over the same packed operands::

    for blk in range(blocks):                           # panels one after the other
        for each group of up to 8 rows r:
            acc[r, 0:32] = 0                            # 2 vectors of 16 fp32 per row
            for k2 in range(pairs):
                b0, b1 = B[blk][k2, 0:16], B[blk][k2, 16:32]        # 32 columns of bf16 pairs
                x = broadcast(A[r, 2·k2 : 2·k2 + 2])                # one uint32 per row
                acc[r, 0:16] += vdpbf16ps(x, b0);  acc[r, 16:32] += vdpbf16ps(x, b1)
            C[blk][r, 0:32] = acc[r]

``A``: rows of bf16 (``lda`` bytes apart); ``B``: rows of 32 uint32 pairs, ``(k = 2·k2, 2·k2 + 1)``
in the low and high half (``ldb`` bytes apart), block ``i`` at ``b + i·bstep``; ``C``: fp32
rows (``ldc`` bytes apart), block ``i`` at ``c + i·cstep``. This is AMX's B layout too, so the
attention packs K and V once for either step.

Eight rows × 2 vectors are 16 accumulators of AVX-512's 32 registers, beside the two B vectors
and the broadcasts: LLVM keeps them all in registers. 512-bit steps, as ``dense_dot.py`` uses on
Zen 4: there, a broadcast takes a slot of the dot-product pipes, and a 512-bit step halves the
broadcasts per multiply-add (``mbcompile/cpu.py``).
"""

from __future__ import annotations

GROUP_ROWS = 8  # rows whose accumulators stay in registers together
COLUMNS = 32  # output columns of a step: two vectors of 16 fp32
VECTOR_BYTES = 64


# instruction → (accumulator vector, operand vector, LLVM intrinsic). vpdpbusd (AVX512_VNNI)
# is the same step on int8: a row's 4 unsigned bytes broadcast, 32 columns of 4 signed bytes
# (``pack_int8``'s layout: 128 bytes a row of B too), int32 sums.
_STEPS = {
    "vdpbf16ps": ("<16 x float>", "<32 x bfloat>", "@llvm.x86.avx512bf16.dpbf16ps.512"),
    "vpdpbusd": ("<16 x i32>", "<64 x i8>", "@llvm.x86.avx512.vpdpbusd.512"),
}


def function_name(rows: int, accumulate: bool = False, instruction: str = "vdpbf16ps") -> str:
    """The LLVM function of ``rows × 32`` steps (``llvm_ir``)."""
    return f"mbc_{instruction}_{rows}x{COLUMNS}{'_acc' if accumulate else ''}"


def llvm_ir(rows: int, accumulate: bool = False, instruction: str = "vdpbf16ps") -> str:
    """``i32 @mbc_vdpbf16ps_<rows>x32(a, lda, b, ldb, c, ldc, pairs, blocks, bstep, cstep)``:
    the module doc's step for ``rows`` rows (strides in bytes, counts as ``i64``), linked into a
    kernel by its ``pragma_import_llvm`` annotation and inlined. ``accumulate``: the
    accumulators start from C's values instead of zero (``C += A·B``, the ``_acc`` function:
    a matmul's K in chunks, ``panel_intrinsics``). ``instruction="vpdpbusd"``: the int8 step
    (``pairs`` then counts groups of 4 k values)."""
    if rows < 1:
        raise ValueError(f"a step needs at least one row, got {rows}")
    v, vb, intrinsic = _STEPS[instruction]
    vi = "<16 x i32>"
    name = function_name(rows, accumulate, instruction)
    groups = [(g, min(GROUP_ROWS, rows - g)) for g in range(0, rows, GROUP_ROWS)]
    rows_ptrs = "\n".join(
        f"  %ao{r} = mul i64 %lda, {r}\n  %arow{r} = getelementptr i8, ptr %a, i64 %ao{r}"
        for r in range(rows)
    )
    blocks = []
    for index, (g0, count) in enumerate(groups):
        g = f"g{index}"
        entry = f"{g}init"
        accs = [(r, n) for r in range(g0, g0 + count) for n in (0, 1)]
        starts = []  # the accumulators' first values: C's (accumulate) or zero
        for r, n in accs:
            if accumulate:
                starts += [
                    f"  %{g}io{r}_{n} = add i64 %crow{r}, {n * VECTOR_BYTES}",
                    f"  %{g}pi{r}_{n} = getelementptr i8, ptr %cb, i64 %{g}io{r}_{n}",
                    f"  %{g}c{r}_{n} = load {v}, ptr %{g}pi{r}_{n}, align 4",
                ]
        phis = [
            f"  %{g}acc{r}_{n} = phi {v} [{f'%{g}c{r}_{n}' if accumulate else 'zeroinitializer'},"
            f" %{entry}], [%{g}sum{r}_{n}, %{g}loop]"
            for r, n in accs
        ]
        steps = []
        for r in range(g0, g0 + count):
            steps += [
                f"  %{g}pa{r} = getelementptr i8, ptr %arow{r}, i64 %{g}ao",
                f"  %{g}x{r} = load i32, ptr %{g}pa{r}, align 4",
                f"  %{g}i{r} = insertelement {vi} poison, i32 %{g}x{r}, i64 0",
                f"  %{g}s{r} = shufflevector {vi} %{g}i{r}, {vi} poison, <16 x i32> zeroinitializer",
                f"  %{g}bc{r} = bitcast {vi} %{g}s{r} to {vb}",
            ] + [
                f"  %{g}sum{r}_{n} = call {v} {intrinsic}("
                f"{v} %{g}acc{r}_{n}, {vb} %{g}bc{r}, {vb} %{g}b{n})"
                for n in (0, 1)
            ]
        stores = []
        for r, n in accs:
            stores += [
                f"  %{g}co{r}_{n} = add i64 %crow{r}, {n * VECTOR_BYTES}",
                f"  %{g}pc{r}_{n} = getelementptr i8, ptr %cb, i64 %{g}co{r}_{n}",
                f"  store {v} %{g}sum{r}_{n}, ptr %{g}pc{r}_{n}, align 4",
            ]
        after = f"g{index + 1}init" if index + 1 < len(groups) else "blockdone"
        blocks.append("\n".join([
            f"{entry}:",
            *starts,
            f"  br label %{g}loop",
            f"{g}loop:",
            f"  %{g}k = phi i64 [0, %{entry}], [%{g}knext, %{g}loop]",
            *phis,
            f"  %{g}bo = mul i64 %{g}k, %ldb",
            f"  %{g}pb0 = getelementptr i8, ptr %bb, i64 %{g}bo",
            f"  %{g}b0 = load {vb}, ptr %{g}pb0, align 4",
            f"  %{g}pb1 = getelementptr i8, ptr %{g}pb0, i64 {VECTOR_BYTES}",
            f"  %{g}b1 = load {vb}, ptr %{g}pb1, align 4",
            f"  %{g}ao = shl i64 %{g}k, 2",
            *steps,
            f"  %{g}knext = add i64 %{g}k, 1",
            f"  %{g}more = icmp ult i64 %{g}knext, %pairs",
            f"  br i1 %{g}more, label %{g}loop, label %{g}done",
            f"{g}done:",
            *stores,
            f"  br label %{after}",
        ]))
    c_rows = "\n".join(f"  %crow{r} = mul i64 %ldc, {r}" for r in range(rows))
    nl = "\n"
    return f"""
declare {v} {intrinsic}({v}, {vb}, {vb})

define internal i32 @{name}(ptr %a, i64 %lda, ptr %b, i64 %ldb, ptr %c, i64 %ldc, i64 %pairs,
                             i64 %blocks, i64 %bstep, i64 %cstep) alwaysinline {{
entry:
{rows_ptrs}
{c_rows}
  br label %block
block:
  %blk = phi i64 [0, %entry], [%nextblk, %blockdone]
  %boff = mul i64 %blk, %bstep
  %bb = getelementptr i8, ptr %b, i64 %boff
  %coff = mul i64 %blk, %cstep
  %cb = getelementptr i8, ptr %c, i64 %coff
  br label %g0init
{nl.join(blocks)}
blockdone:
  %nextblk = add i64 %blk, 1
  %moreblk = icmp ult i64 %nextblk, %blocks
  br i1 %moreblk, label %block, label %exit
exit:
  ret i32 0
}}
"""
