"""The fp32 matmul step of AArch64 targets, as a tensor intrinsic: a ``rows × 16`` output block
over all of K in NEON registers, its weights loaded 16 at a time.

One step computes::

    C[i, j] = Σ_k  A[i, k] · B[k, j]        i < rows ∈ {1, 2, 4}, j < 16

with ``B`` one ``K × 16`` panel of the packed weight (``pack_weights``: ``nb`` = 16 on targets
with FMA by lane). TIR sees a zeroing of ``C`` (``zeroing``: no code) and ``C += Σ ...``; the
step's first k multiplies instead of accumulating, so the zeroing costs nothing.

The step is a small function in LLVM IR (``llvm_ir``, linked by ``pragma_import_llvm`` and
inlined), fully unrolled by 8 k values, for a K known when it is built::

    for each 8 k:                                # pointer increments, compare, branch
        a[r] = A[r, k : k + 4]                   # ldr q: one per row and 4 k
        b    = B[k, 0:16]                        # ld1 {v0.4s - v3.4s}: one load, 16 weights
        acc[r][v] += b[v] · a[r][k % 4]          # fmla v.4s, v.4s, v.s[lane]

Per 8 k and 4 rows: 128 FMLA, 8 A loads, 8 weight loads and 4 loop instructions, 1.16
instructions per FMLA (the register tile of ``gemm_tile``, 8 rows × 8 columns with the weights
in ``ldp q`` pairs, executes 24 loads per 128 FMLA: 1.22). The 16 accumulators, 8 A vectors
and 4 weight vectors fit the 32 registers.

``ld1`` of four registers moves 64 bytes in one instruction; on a Cortex-A76 it occupies the
load pipes for two cycles, as two ``ldp q`` do, so it saves instructions and issue slots, not
load bandwidth (the cycle models of ``devices/emulator/cycle_models.py`` count instructions
per pipe, and so are optimistic by those cycles where loads bound a kernel; the dense kernels
are bound by their FMLA).

Scalars computed at run time go to the step as ``i32`` (see ``tile_intrinsics``).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

COLUMNS = 16  # one step's columns: four 4-lane vectors, one ld1 of 64 bytes per k
LANES = 4
ROWS = (4, 2, 1)  # rows of a step, most first
UNROLL = 8  # k values per loop iteration (16 spilled the accumulators: 1.25-1.43 instructions per FMLA)


def block_rows(m: int) -> int:
    """Rows per step for an M-row matmul: the most of ``ROWS`` that divides M."""
    return next(r for r in ROWS if m % r == 0)


def _function_name(rows: int, k: int, b_stride: int = COLUMNS * 4) -> str:
    tail = "" if b_stride == COLUMNS * 4 else f"_ldb{b_stride}"
    return f"mbc_neon_fmla_{rows}x{COLUMNS}_k{k}{tail}"


class _Writer:
    """SSA names for the unrolled body."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0
        self.b = "%b"  # the current k's weights
        self.b_stride = COLUMNS * 4  # bytes from one k's weights to the next's
        self.a: list[str] = []  # each row's pointer at the next k

    def fresh(self, stem: str) -> str:
        self.n += 1
        return f"%{stem}{self.n}"

    def emit(self, line: str) -> None:
        self.lines.append("  " + line)


def _steps(w: _Writer, rows: int, k_values: list[int], acc: list[list[str | None]]
           ) -> list[list[str]]:
    """Code for the consecutive k values ``k_values`` (the pointers of ``w`` are at the first);
    ``acc[r][v]`` is the accumulator so far, None before the first k (which then multiplies)."""
    v4 = "<4 x float>"
    a_vectors: dict[int, list[str]] = {}
    for k in k_values:
        group = k - k % LANES
        whole = group + LANES <= k_values[-1] + 1 and group >= k_values[0]
        if whole and group not in a_vectors:
            # 8 k of a row at once (an ldp q) where the 8 are in this call's k values
            pair = group % (2 * LANES) == 0 and group + 2 * LANES <= k_values[-1] + 1
            a_vectors[group] = []
            if pair:
                a_vectors[group + LANES] = []
            for r in range(rows):
                ptr = w.a[r]
                w.a[r] = w.fresh("ap")  # each row's pointer chain: post-indexed loads
                vec = w.fresh("a")
                if not pair:
                    w.emit(f"{w.a[r]} = getelementptr i8, ptr {ptr}, i64 {4 * LANES}")
                    w.emit(f"{vec} = load {v4}, ptr {ptr}, align 4")
                    a_vectors[group].append(vec)
                    continue
                w.emit(f"{w.a[r]} = getelementptr i8, ptr {ptr}, i64 %astride{r}")
                w.emit(f"{vec} = call {{ {v4}, {v4} }} @llvm.aarch64.neon.ld1x2.v4f32.p0(ptr {ptr})")
                for half in range(2):
                    part = w.fresh("a")
                    w.emit(f"{part} = extractvalue {{ {v4}, {v4} }} {vec}, {half}")
                    a_vectors[group + half * LANES].append(part)
        # The weights of k: 16 floats into v24-v27 or v28-v31 (alternating), one ld1 that
        # steps the pointer. In inline asm: as the intrinsic, loop strength reduction turned the
        # chain of 8 post-indexed loads into an induction variable and a second pointer (two more
        # instructions an iteration), and ld1 has no immediate offset to fold them into.
        bptr = w.b
        w.b = w.fresh("bp")
        b4 = w.fresh("b")
        first = 24 + 4 * (k % 2)
        outs = ",".join(f"={{v{first + v}}}" for v in range(4))
        vt = f"{{ {v4}, {v4}, {v4}, {v4}, ptr }}"
        step, constraint, operand = (
            ("#64", "", "") if w.b_stride == COLUMNS * 4 else ("$5", ",r", f", i64 {w.b_stride}"))
        w.emit(f'{b4} = call {vt} asm "ld1 {{v{first}.4s-v{first + 3}.4s}}, [$4], {step}", '
               f'"{outs},=r,4{constraint},~{{memory}}"(ptr {bptr}{operand})')
        w.emit(f"{w.b} = extractvalue {vt} {b4}, 4")
        bv = []
        for v in range(4):
            name = w.fresh("bv")
            w.emit(f"{name} = extractvalue {vt} {b4}, {v}")
            bv.append(name)
        for r in range(rows):
            if whole:
                source, lane = a_vectors[group][r], k % LANES
            else:  # a k outside a whole group of 4 (K not a multiple of 4): one scalar
                ptr = w.a[r]
                w.a[r] = w.fresh("ap")
                w.emit(f"{w.a[r]} = getelementptr i8, ptr {ptr}, i64 4")
                scalar = w.fresh("as")
                w.emit(f"{scalar} = load float, ptr {ptr}, align 4")
                source = w.fresh("av")
                w.emit(f"{source} = insertelement {v4} poison, float {scalar}, i64 0")
                lane = 0
            splat = w.fresh("s")
            w.emit(f"{splat} = shufflevector {v4} {source}, {v4} poison, "
                   f"<4 x i32> <i32 {lane}, i32 {lane}, i32 {lane}, i32 {lane}>")
            for v in range(4):
                out = w.fresh("c")
                if acc[r][v] is None:
                    w.emit(f"{out} = fmul {v4} {bv[v]}, {splat}")
                else:
                    w.emit(f"{out} = call {v4} @llvm.fma.v4f32({v4} {bv[v]}, {v4} {splat}, "
                           f"{v4} {acc[r][v]})")
                acc[r][v] = out
    return acc


def _llvm_ir(rows: int, k: int, b_stride: int = COLUMNS * 4) -> str:
    """``@mbc_neon_fmla_<rows>x16_k<K>[_ldb<S>](c, ldc, a, lda, b)``: the step of the module
    doc; ``ldc``, ``lda`` in elements, ``b`` K rows of 16 floats ``b_stride`` bytes apart (64:
    a contiguous panel)."""
    name = _function_name(rows, k, b_stride)
    v4 = "<4 x float>"
    w = _Writer()
    w.b_stride = b_stride
    for r in range(rows):
        w.emit(f"%row{r} = mul i64 %lda64, {4 * r}")
        w.emit(f"%arow{r} = getelementptr i8, ptr %a, i64 %row{r}")
    w.a = [f"%arow{r}" for r in range(rows)]
    first = list(range(min(k, UNROLL)))
    acc: list[list[str | None]] = [[None] * 4 for _ in range(rows)]
    acc = _steps(w, rows, first, acc)
    iterations = (k - len(first)) // UNROLL
    tail_start = len(first) + iterations * UNROLL
    entry = w.lines
    loop: list[str] = []
    if iterations:
        w.lines = []
        phis = [[w.fresh("p") for _ in range(4)] for _ in range(rows)]
        body_acc: list[list[str | None]] = [list(p) for p in phis]
        entry_b, entry_a = w.b, list(w.a)
        w.b, w.a = "%bl", [f"%al{r}" for r in range(rows)]
        body_acc = _steps(w, rows, list(range(UNROLL)), body_acc)
        body = w.lines
        loop = ["loop:", "  %kb = phi i64 [0, %entry], [%kn, %loop]",
                f"  %bl = phi ptr [{entry_b}, %entry], [{w.b}, %loop]"]
        loop += [f"  %al{r} = phi ptr [{entry_a[r]}, %entry], [{w.a[r]}, %loop]"
                 for r in range(rows)]
        for r in range(rows):
            for v in range(4):
                loop.append(f"  {phis[r][v]} = phi {v4} [{acc[r][v]}, %entry], "
                            f"[{body_acc[r][v]}, %loop]")
        loop += body
        # (ending the loop on the weights' pointer instead of a counter let the scheduler
        # hoist the weight loads until the accumulators spilled)
        loop += ["  %kn = add i64 %kb, 1",
                 f"  %more = icmp ult i64 %kn, {iterations}",
                 "  br i1 %more, label %loop, label %tail"]
        acc = body_acc  # after the loop: the last iteration's values
    w.lines = []
    acc = _steps(w, rows, list(range(tail_start, k)), acc)
    for r in range(rows):
        for v in range(4):
            off = w.fresh("co")
            w.emit(f"{off} = add i64 %crow{r}, {v * LANES}")
            ptr = w.fresh("cp")
            w.emit(f"{ptr} = getelementptr float, ptr %c, i64 {off}")
            w.emit(f"store {v4} {acc[r][v]}, ptr {ptr}, align 4")
    tail = w.lines
    crows = [f"  %crow{r} = mul i64 %ldc64, {r}" for r in range(rows)]
    # Each row's stride loaded from memory, each from its own word: as constants, loop strength
    # reduction folded the 4 rows' chains into one induction variable plus offsets, which ld1
    # cannot take (it has no immediate offset), each then costing an add.
    strides = [f"  %astridep{r} = getelementptr i64, ptr @{name}_strides, i64 {r}\n"
               f"  %astride{r} = load volatile i64, ptr %astridep{r}, align 8"
               for r in range(rows)]
    nl = "\n"
    jump = "  br label %loop" if iterations else "  br label %tail"
    return f"""
declare {v4} @llvm.fma.v4f32({v4}, {v4}, {v4})
declare {{ {v4}, {v4} }} @llvm.aarch64.neon.ld1x2.v4f32.p0(ptr)
@{name}_strides = internal global [{rows} x i64] [{", ".join([f"i64 {8 * LANES}"] * rows)}]

define internal i32 @{name}(ptr noalias %c, i32 %ldc, ptr noalias %a, i32 %lda,
                            ptr noalias %b) alwaysinline {{
entry:
{nl.join(strides)}
  %lda64 = sext i32 %lda to i64
  %ldc64 = sext i32 %ldc to i64
{nl.join(entry)}
{jump}
{nl.join(loop)}
tail:
{nl.join(crows)}
{nl.join(tail)}
  ret i32 0
}}
"""


def _make(rows: int, k: int):
    if rows == 1:
        return _make_row(k)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (rows, k), "float32", strides=(sa, 1), offset_factor=1)
        B = T.match_buffer(b, (k, COLUMNS), "float32", offset_factor=1)
        C = T.match_buffer(c, (rows, COLUMNS), "float32", strides=(sc, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:COLUMNS], A[0:rows, 0:k], B[0:k, 0:COLUMNS])
            T.writes(C[0:rows, 0:COLUMNS])
            for i, j, r in T.grid(rows, COLUMNS, k):
                with T.sblock("update"):
                    vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                    T.reads(C[vi, vj], A[vi, vr], B[vr, vj])
                    T.writes(C[vi, vj])
                    C[vi, vj] = C[vi, vj] + A[vi, vr] * B[vr, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (rows, k), "float32", strides=(sa, 1), offset_factor=1)
        B = T.match_buffer(b, (k, COLUMNS), "float32", offset_factor=1)
        C = T.match_buffer(c, (rows, COLUMNS), "float32", strides=(sc, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:COLUMNS], A[0:rows, 0:k], B[0:k, 0:COLUMNS])
            T.writes(C[0:rows, 0:COLUMNS])
            T.evaluate(T.call_extern(
                "int32", _function_name(rows, k),
                C.access_ptr("w"), T.Cast("int32", sc),
                A.access_ptr("r"), T.Cast("int32", sa),
                B.access_ptr("r"),
            ))

    return desc, impl


def _make_row(k: int):
    """``_make`` for one row (a matrix-vector product): the block has no row loop."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (1, k), "float32", offset_factor=1)
        B = T.match_buffer(b, (k, COLUMNS), "float32", offset_factor=1)
        C = T.match_buffer(c, (1, COLUMNS), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0, 0:COLUMNS], A[0, 0:k], B[0:k, 0:COLUMNS])
            T.writes(C[0, 0:COLUMNS])
            for j, r in T.grid(COLUMNS, k):
                with T.sblock("update"):
                    vj, vr = T.axis.remap("SR", [j, r])
                    T.reads(C[0, vj], A[0, vr], B[vr, vj])
                    T.writes(C[0, vj])
                    C[0, vj] = C[0, vj] + A[0, vr] * B[vr, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (1, k), "float32", offset_factor=1)
        B = T.match_buffer(b, (k, COLUMNS), "float32", offset_factor=1)
        C = T.match_buffer(c, (1, COLUMNS), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0, 0:COLUMNS], A[0, 0:k], B[0:k, 0:COLUMNS])
            T.writes(C[0, 0:COLUMNS])
            T.evaluate(T.call_extern(
                "int32", _function_name(1, k),
                C.access_ptr("w"), T.int32(COLUMNS), A.access_ptr("r"), T.int32(k),
                B.access_ptr("r"),
            ))

    return desc, impl


def _make_zero(rows: int):
    """The accumulator's zeroing before a step: nothing to run, the step's first k multiplies
    and it overwrites the whole block. A step is always scheduled right after its zeroing
    (``dense_neon``), so the pair computes exactly what the two blocks say."""
    if rows == 1:
        return _make_zero_row()

    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        sc = T.int32()
        C = T.match_buffer(c, (rows, COLUMNS), "float32", strides=(sc, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0:COLUMNS])
            for i, j in T.grid(rows, COLUMNS):
                with T.sblock("zero"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    T.reads()
                    T.writes(C[vi, vj])
                    C[vi, vj] = T.float32(0)

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        sc = T.int32()
        C = T.match_buffer(c, (rows, COLUMNS), "float32", strides=(sc, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0:COLUMNS])
            T.evaluate(0)

    return desc, impl


def _make_zero_row():
    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        C = T.match_buffer(c, (1, COLUMNS), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0, 0:COLUMNS])
            for j in T.serial(COLUMNS):
                with T.sblock("zero"):
                    vj = T.axis.remap("S", [j])
                    T.reads()
                    T.writes(C[0, vj])
                    C[0, vj] = T.float32(0)

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        C = T.match_buffer(c, (1, COLUMNS), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0, 0:COLUMNS])
            T.evaluate(0)

    return desc, impl


def intrinsic(rows: int, k: int) -> str:
    """The name of the step for a ``rows × 16`` block over ``k`` values of K, registered on
    first use."""
    name = f"mbcompile_neon_fmla_{rows}x{COLUMNS}x{k}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_make(rows, k))
    return name


def zeroing(rows: int) -> str:
    """The name of the zeroing that goes with a step (``_make_zero``), registered on first use."""
    name = f"mbcompile_neon_zero_{rows}x{COLUMNS}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_make_zero(rows))
    return name


def function_name(rows: int, k: int, b_stride: int = COLUMNS * 4) -> str:
    """The LLVM function of the step (``llvm_ir``), for a kernel that calls it directly
    (``T.call_extern``, arguments ``c, ldc, a, lda, b``: ``ldc``, ``lda`` int32 elements)."""
    return _function_name(rows, k, b_stride)


def llvm_ir(rows: int, k: int, b_stride: int = COLUMNS * 4) -> str:
    """The IR a kernel of ``rows × 16`` steps over ``k`` links (``pragma_import_llvm``), the
    ``k`` rows of 16 weights ``b_stride`` bytes apart."""
    return _llvm_ir(rows, k, b_stride)
