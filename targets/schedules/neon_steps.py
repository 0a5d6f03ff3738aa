"""The fp32 matmul step of AArch64 targets, in LLVM IR: a ``rows × 16`` output block over all
of K in NEON registers, its weights loaded 16 at a time (``neon_intrinsics`` makes it a tensor
intrinsic for the dense kernels; ``neon_attention`` calls it directly).

One step computes::

    C[i, j] = Σ_k  A[i, k] · B[k, j]        i < rows ∈ {1, 2, 4}, j < 16

with ``B`` one ``K × 16`` panel of the packed weight (``pack_weights``: ``nb`` = 16 on targets
with FMA by lane), or any K rows of 16 floats a fixed stride apart. The step's first k
multiplies instead of accumulating onto zeros.

The step is a small function in LLVM IR (``llvm_ir``, linked by ``pragma_import_llvm`` and
inlined), unrolled by 8 k values, for a K known when it is built (``Step``)::

    for each 8 k:                                # a decrement and a branch
        a[r] = A[r, k : k + 8]                   # ldp q, post-indexed: one per row
        for each k of the 8:
            b = B[k, 0:16]                       # ld1 {v24-v27 or v28-v31}: 16 weights
            acc[r][v] += b[v] · a[r][k % 8]      # fmla v.4s, v.4s, v.s[lane]

Per 8 k and 4 rows: 128 FMLA, 4 A loads, 8 weight loads and 2 loop instructions, 1.11
instructions per FMLA in the loop, 1.12-1.16 per kernel with its epilogue (counted on the
emulated device; the register tile of ``gemm_tile``, 8 rows × 8 columns with the weights in
``ldp q`` pairs, executed 1.23-1.28). The 16 accumulators, 8 A vectors and two sets of 4 weight
vectors fill the 32 registers; ``a_depth=4`` (one ``ldr q`` of 4 k per row) leaves 4 to a
caller that holds values across the step (``neon_attention``).

Every load is inline asm with a post-indexed address (``_llvm_ir``): LLVM's loop strength
reduction rewrote plain loads' pointer chains into one base plus offsets, which ``ld1`` cannot
encode and ``ldp q`` only up to 1008 bytes, each offset then costing an add. The weights go to
fixed registers, alternating between two sets, so that the next k's load can issue while the
last FMLA of this one read theirs; with one set, LLVM copied a register per k instead.

``ld1`` of four registers moves 64 bytes in one instruction; on a Cortex-A76 it occupies the
load pipes for two cycles, as two ``ldp q`` do, so it saves instructions and issue slots, not
load bandwidth (the cycle models of ``devices/emulator/cycle_models.py`` count instructions
per pipe, and so are optimistic by those cycles where loads bound a kernel; the dense kernels
are bound by their FMLA).

Scalars computed at run time go to the step as ``i32`` (see ``tile_intrinsics``).
"""

from __future__ import annotations

from dataclasses import dataclass

COLUMNS = 16  # one step's columns: four 4-lane vectors, one ld1 of 64 bytes per k
LANES = 4
# k values per loop iteration (16 spilled the accumulators: 1.25-1.43 instructions per FMLA)
UNROLL = 8
V4 = "<4 x float>"


@dataclass(frozen=True)
class Step:
    """A step's variant: ``rows`` of A over ``k``; B's rows of 16 floats ``b_stride`` bytes
    apart (64: a contiguous packed panel); A's rows read ``a_depth`` k at a time (8: one ``ldp
    q`` per row, 8 registers; 4: one ``ldr q``, 4 registers, for a caller that keeps values of
    its own in registers across the step)."""

    rows: int
    k: int
    b_stride: int = COLUMNS * 4
    a_depth: int = 2 * LANES

    @property
    def name(self) -> str:
        tail = "" if self.b_stride == COLUMNS * 4 else f"_ldb{self.b_stride}"
        tail += "" if self.a_depth == 2 * LANES else f"_a{self.a_depth}"
        return f"mbc_neon_fmla_{self.rows}x{COLUMNS}_k{self.k}{tail}"


class _Writer:
    """SSA names and pointer chains for the unrolled body."""

    def __init__(self, step: Step) -> None:
        self.step = step
        self.lines: list[str] = []
        self.n = 0
        self.b = "%b"  # the current k's weights
        self.a: list[str] = []  # each row's pointer at the next k

    def fresh(self, stem: str) -> str:
        self.n += 1
        return f"%{stem}{self.n}"

    def emit(self, line: str) -> None:
        self.lines.append("  " + line)

    def load_a(self, r: int, depth: int) -> list[str]:
        """Row ``r``'s next ``depth`` (8 or 4) values as vectors of 4, its pointer stepped."""
        ptr, self.a[r] = self.a[r], self.fresh("ap")
        if depth == 2 * LANES:
            asm, types = f"ldp ${{0:q}}, ${{1:q}}, [$2], #{4 * depth}", "=w,=w,=r,2"
        else:
            asm, types = f"ldr ${{0:q}}, [$1], #{4 * depth}", "=w,=r,1"
        parts = depth // LANES
        vt = "{ " + ", ".join([V4] * parts + ["ptr"]) + " }"
        loaded = self.fresh("aload")
        self.emit(f'{loaded} = call {vt} asm "{asm}", "{types}"(ptr {ptr})')
        self.emit(f"{self.a[r]} = extractvalue {vt} {loaded}, {parts}")
        vectors = []
        for part in range(parts):
            vectors.append(self.fresh("a"))
            self.emit(f"{vectors[-1]} = extractvalue {vt} {loaded}, {part}")
        return vectors

    def load_b(self, k: int) -> list[str]:
        """The 16 weights of ``k`` (into v24-v27 or v28-v31, alternating), the pointer stepped."""
        ptr, self.b = self.b, self.fresh("bp")
        first = 28 - 4 * (k % 2)
        outs = ",".join(f"={{v{first + v}}}" for v in range(4))
        stride = self.step.b_stride
        step, constraint, operand = (
            ("#64", "", "") if stride == COLUMNS * 4 else ("$6", ",r", f", i64 {stride}"))
        vt = f"{{ {V4}, {V4}, {V4}, {V4}, ptr }}"
        loaded = self.fresh("bload")
        self.emit(f'{loaded} = call {vt} asm "ld1 {{v{first}.4s-v{first + 3}.4s}}, [$4], {step}", '
                  f'"{outs},=r,4{constraint},~{{memory}}"(ptr {ptr}{operand})')
        self.emit(f"{self.b} = extractvalue {vt} {loaded}, 4")
        vectors = []
        for v in range(4):
            vectors.append(self.fresh("bv"))
            self.emit(f"{vectors[-1]} = extractvalue {vt} {loaded}, {v}")
        return vectors


def _steps(w: _Writer, k_values: list[int], acc: list[list[str | None]]) -> list[list[str]]:
    """Code for the consecutive k values ``k_values`` (the pointers of ``w`` are at the first);
    ``acc[r][v]`` is the accumulator so far, None before the first k (which then multiplies)."""
    rows, depth = w.step.rows, w.step.a_depth
    if not k_values:
        return acc
    end = k_values[-1] + 1
    a_vectors: dict[int, list[str]] = {}
    for k in k_values:
        group = k - k % LANES
        whole = group >= k_values[0] and group + LANES <= end
        if whole and group not in a_vectors:
            # a row's next 8 k at once where the 8 are in this call's k values, else 4
            load = depth if group % depth == 0 and group + depth <= end else LANES
            loaded = [w.load_a(r, load) for r in range(rows)]
            for part in range(load // LANES):
                a_vectors[group + part * LANES] = [vectors[part] for vectors in loaded]
        bv = w.load_b(k)
        for r in range(rows):
            if whole:
                source, lane = a_vectors[group][r], k % LANES
            else:  # a k outside a whole group of 4 (K not a multiple of 4): one scalar
                ptr, w.a[r] = w.a[r], w.fresh("ap")
                w.emit(f"{w.a[r]} = getelementptr i8, ptr {ptr}, i64 4")
                scalar = w.fresh("as")
                w.emit(f"{scalar} = load float, ptr {ptr}, align 4")
                source = w.fresh("av")
                w.emit(f"{source} = insertelement {V4} poison, float {scalar}, i64 0")
                lane = 0
            splat = w.fresh("s")
            w.emit(f"{splat} = shufflevector {V4} {source}, {V4} poison, "
                   f"<4 x i32> <i32 {lane}, i32 {lane}, i32 {lane}, i32 {lane}>")
            for v in range(4):
                out = w.fresh("c")
                if acc[r][v] is None:
                    w.emit(f"{out} = fmul {V4} {bv[v]}, {splat}")
                else:
                    w.emit(f"{out} = call {V4} @llvm.fma.v4f32({V4} {bv[v]}, {V4} {splat}, "
                           f"{V4} {acc[r][v]})")
                acc[r][v] = out
    return acc


def _llvm_ir(step: Step) -> str:
    """``@<step.name>(c, ldc, a, lda, b)``: the step of the module doc; ``ldc``, ``lda`` in
    elements (i32), ``b`` the first of K rows of 16 floats ``step.b_stride`` bytes apart.

    Every load is inline asm with a post-indexed address: as plain loads or ``ld1``
    intrinsics, loop strength reduction turned the pointer chains into one induction variable
    plus offsets, which ``ld1`` cannot take (it has no immediate offset) and ``ldp q`` can only
    up to 1008 bytes (a row of A is further), each then costing an add."""
    rows, k = step.rows, step.k
    w = _Writer(step)
    for r in range(rows):
        w.emit(f"%row{r} = mul i64 %lda64, {4 * r}")
        w.emit(f"%arow{r} = getelementptr i8, ptr %a, i64 %row{r}")
    w.a = [f"%arow{r}" for r in range(rows)]
    first = list(range(min(k, UNROLL)))
    acc: list[list[str | None]] = [[None] * 4 for _ in range(rows)]
    acc = _steps(w, first, acc)
    iterations = (k - len(first)) // UNROLL
    tail_start = len(first) + iterations * UNROLL
    entry = w.lines
    loop: list[str] = []
    if iterations:
        w.lines = []
        phis = [[w.fresh("p") for _ in range(4)] for _ in range(rows)]
        entry_b, entry_a = w.b, list(w.a)
        w.b, w.a = "%bl", [f"%al{r}" for r in range(rows)]
        body_acc = _steps(w, list(range(UNROLL)), [list(p) for p in phis])
        loop = ["loop:", "  %kb = phi i64 [0, %entry], [%kn, %loop]",
                f"  %bl = phi ptr [{entry_b}, %entry], [{w.b}, %loop]"]
        loop += [f"  %al{r} = phi ptr [{entry_a[r]}, %entry], [{w.a[r]}, %loop]"
                 for r in range(rows)]
        loop += [f"  {phis[r][v]} = phi {V4} [{acc[r][v]}, %entry], [{body_acc[r][v]}, %loop]"
                 for r in range(rows) for v in range(4)]
        loop += w.lines
        # (ending the loop on the weights' pointer instead of a counter let the scheduler
        # hoist the weight loads until the accumulators spilled)
        loop += ["  %kn = add i64 %kb, 1",
                 f"  %more = icmp ult i64 %kn, {iterations}",
                 "  br i1 %more, label %loop, label %tail"]
        acc = body_acc  # after the loop: the last iteration's values
    w.lines = []
    acc = _steps(w, list(range(tail_start, k)), acc)
    for r in range(rows):
        w.emit(f"%crow{r} = mul i64 %ldc64, {r}")
        for v in range(4):
            off = w.fresh("co")
            w.emit(f"{off} = add i64 %crow{r}, {v * LANES}")
            ptr = w.fresh("cp")
            w.emit(f"{ptr} = getelementptr float, ptr %c, i64 {off}")
            w.emit(f"store {V4} {acc[r][v]}, ptr {ptr}, align 4")
    nl = "\n"
    return f"""
declare {V4} @llvm.fma.v4f32({V4}, {V4}, {V4})

define internal i32 @{step.name}(ptr noalias %c, i32 %ldc, ptr noalias %a, i32 %lda,
                                  ptr noalias %b) alwaysinline {{
entry:
  %lda64 = sext i32 %lda to i64
  %ldc64 = sext i32 %ldc to i64
{nl.join(entry)}
  br label %{"loop" if iterations else "tail"}
{nl.join(loop)}
tail:
{nl.join(w.lines)}
  ret i32 0
}}
"""


def llvm_ir(step: Step) -> str:
    """The IR a kernel of ``step`` links (``pragma_import_llvm``); it calls ``step.name``
    (``T.call_extern``, arguments ``c, ldc, a, lda, b``: ``ldc``, ``lda`` int32 elements)."""
    return _llvm_ir(step)


def _row_name(step: Step, chunks: int, bias_stride: int | None) -> str:
    bias = "" if bias_stride is None else f"_bias{bias_stride}"
    return f"{step.name}_x{chunks}{bias}"


def _llvm_ir_row(step: Step, chunks: int, bias_stride: int | None) -> str:
    """``@<step>_x<chunks>[_bias<S>](c, ldc, a, lda, b, bias)``: ``chunks`` steps side by side,
    step ``i`` on the 16 columns ``16·i`` of ``c`` and ``b``; with ``bias_stride``, each adds
    ``bias[r, 16·i : 16·i + 16]`` to its block as it stores it (rows ``bias_stride`` bytes
    apart: 0 for one row for all, loaded once)."""
    adds = []
    if bias_stride is not None:
        for r in range(step.rows):
            adds.append(f"  %br{r} = getelementptr i8, ptr %bi, i64 {r * bias_stride}")
            adds.append(f"  %cr{r} = mul i64 %ldc64, {4 * r}")
            adds.append(f"  %crp{r} = getelementptr i8, ptr %ci, i64 %cr{r}")
            for v in range(4):
                adds += [
                    f"  %bp{r}_{v} = getelementptr i8, ptr %br{r}, i64 {16 * v}",
                    f"  %bv{r}_{v} = load {V4}, ptr %bp{r}_{v}, align 4",
                    f"  %cp{r}_{v} = getelementptr i8, ptr %crp{r}, i64 {16 * v}",
                    f"  %cv{r}_{v} = load {V4}, ptr %cp{r}_{v}, align 4",
                    f"  %sum{r}_{v} = fadd {V4} %cv{r}_{v}, %bv{r}_{v}",
                    f"  store {V4} %sum{r}_{v}, ptr %cp{r}_{v}, align 4",
                ]
    nl = "\n"
    return f"""
define internal i32 @{_row_name(step, chunks, bias_stride)}(ptr noalias %c, i32 %ldc,
    ptr noalias %a, i32 %lda, ptr noalias %b, ptr noalias %bias) alwaysinline {{
entry:
  %ldc64 = sext i32 %ldc to i64
  br label %chunk
chunk:
  %i = phi i64 [0, %entry], [%next, %chunk]
  %off = mul i64 %i, {COLUMNS * 4}
  %ci = getelementptr i8, ptr %c, i64 %off
  %bi = getelementptr i8, ptr %bias, i64 %off
  %bc = getelementptr i8, ptr %b, i64 %off
  %done = call i32 @{step.name}(ptr %ci, i32 %ldc, ptr %a, i32 %lda, ptr %bc)
{nl.join(adds)}
  %next = add i64 %i, 1
  %more = icmp ult i64 %next, {chunks}
  br i1 %more, label %chunk, label %exit
exit:
  ret i32 0
}}
"""


def row_function_name(step: Step, chunks: int, bias_stride: int | None = None) -> str:
    """The LLVM function of ``chunks`` steps side by side (``row_llvm_ir``), for a kernel that
    calls it (``T.call_extern``, arguments ``c, ldc, a, lda, b, bias``: ``ldc``, ``lda`` int32
    elements, ``bias`` any pointer when ``bias_stride`` is None)."""
    return _row_name(step, chunks, bias_stride)


def row_llvm_ir(step: Step, chunks: int, bias_stride: int | None = None) -> str:
    """The IR of ``row_function_name``'s function, which calls ``step``'s (``llvm_ir``: the
    kernel links it once, however many rows use it)."""
    return _llvm_ir_row(step, chunks, bias_stride)
