"""Matrix-tile steps of a reduced-precision matmul on Intel AMX, as tensor intrinsics.

One step computes a whole ``rows × nb`` output block over all of K, in the tile registers::

    C[i, j] = Σ_k  A[i, k] · B[k // d, j, k % d]        i < rows ≤ 64, j < nb ∈ {16, 32}

with ``B`` a ``K/d × nb × d`` panel of the packed weight (``pack_bf16``, ``pack_int8``: the
layout the dot-product steps read, which is also AMX's "VNNI" B layout). TIR sees a zeroing of
``C`` (``zeroing``: no code) and ``C += Σ ...``; the step starts from zeroed tiles, so the
zeroing costs nothing.

- bf16 (``d`` = 2, fp32 ``C``): ``tdpbf16ps``;
- u8s8 (``d`` = 4, int32 ``C``): ``tdpbusd``, unsigned activations by signed weights.

The step is a small function in LLVM IR (``_llvm_ir``, linked into the kernel by the
``pragma_import_llvm`` annotation and inlined) over the eight tile registers: up to 2×2 16×16
accumulator tiles, two A tiles (16 rows × 64 bytes of K) and two B tiles (16 rows of
``d``-groups × 16 columns), loaded and multiplied once per 64 bytes of K, stored to ``C`` at the
end. It configures the tiles (``ldtilecfg``) on entry and releases them on exit, so a thread
owns no tile state between calls. Each kernel asks Linux once for the AMX state
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``; without it the first tile
instruction kills the process), so a process that never imported mbcompile (a tuning worker,
a C++ host) runs it too.

Inside the model the weights come cold from memory (50 MB of bf16 weights per forward, which
stream at about 12 GB/s on one core here), so each step also prefetches, at each of its steps,
the same slice of the next panel of the weight into L2 (``prefetcht1``), as the fp32 kernels do
(``prefetch.py``): the default encoder at 128 tokens in bf16, 1 thread, went from 14.1 to
12.5 ms. Every row block of a panel prefetches all of the next one. That costs a kernel timed
warm and alone (128×512·512×384: 1.05 → 0.89 TFLOP/s), but it is what the model wants: giving
each row block a share instead (block ``i`` of ``n`` at the steps ``k ≡ i mod n``, as
``prefetch.py`` does) brought the warm kernel back to 0.98–1.07 TFLOP/s and made the encoder
slower (128 tokens, bf16, 1 thread: 17.3 ms against 14.3, medians of 3 × 20 calls on a
noisy afternoon): the later row blocks' shares start too late for the next panel.

Scalars computed at run time go to the step as ``i32``: TVM narrows an ``int64`` cast of a
small value back to ``int32``, and a call whose types differ from the function's is not inlined
(the library then fails to load with an undefined ``mbc_amx_*`` symbol).

K must be a multiple of 64 bytes (32 bf16, 64 int8): the packing pads it with zeros on targets
with AMX (``k_multiple``). Rows come in two tiles of up to 16: a block of 24 rows is a 16-row
and an 8-row tile.

Measured on a 2-core Xeon with AMX (LLVM calls it rocketlake), 1 thread, warm, before the
prefetch: bf16 384×512·512×128 at 1.1 TFLOP/s in 64-row steps, against 110 GFLOP/s for the
``vdpbf16ps`` steps (``dot_intrinsics.py``) and a torch.mm fp32 roof of about 175; the tile
instructions alone peak at 3.2 TFLOP/s (a C loop).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from mbcompile import tvmscript
from mbcompile.targets.registry import ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL, XFEATURE_XTILEDATA
from mbcompile.targets.schedules.free_zeroing import free_zeroing

tvmscript.install()  # this module parses TVMScript: without the slow frame walk

CACHE_LINE = 64
TILE_BYTES = 64  # a tile row: 16 fp32/int32 accumulators, 32 bf16 or 64 int8 values of K
TILE_ROWS = 16
BLOCK_ROWS = 2 * TILE_ROWS  # rows of one block: two row tiles
MOST_ROWS = 2 * BLOCK_ROWS  # rows of one step: blocks of 32 one after the other

# kind → (instruction, k values per group d, activation dtype, weight dtype, accumulator dtype)
_KINDS = {
    "bf16": ("tdpbf16ps", 2, "uint16", "uint16", "float32"),
    "u8s8": ("tdpbusd", 4, "uint8", "int8", "int32"),
}



def k_multiple(kind: str) -> int:
    """K values per tile row: the packing pads K to a multiple of this on AMX targets."""
    _, depth, a_dtype, _, _ = _KINDS[kind]
    return TILE_BYTES * 8 // {"uint16": 16, "uint8": 8}[a_dtype]


def _function_name(kind: str, m_tiles: int, n_tiles: int) -> str:
    return f"mbc_amx_{_KINDS[kind][0]}_{m_tiles}x{n_tiles}"


def _llvm_ir(kind: str, m_tiles: int, n_tiles: int) -> str:
    """``@mbc_amx_<instruction>_<m>x<n>(c, ldc, a, lda, b, ldb, steps, rows0, rows1, blocks,
    next, prefetch, astep, bstep, cstep)``: the step of the module doc over ``m`` row tiles and
    ``n`` column tiles, for ``blocks`` blocks one after the other (the tiles are configured
    once), block ``i`` at ``a + i·astep``, ``b + i·bstep``, ``c + i·cstep``: the next rows of a
    matmul (``astep``, ``cstep`` 32 rows), or its next columns (``bstep`` a panel, ``cstep``
    ``nb`` columns). Strides in bytes; ``steps`` tile rows of K; ``rows0``/``rows1`` the rows of
    each row tile; ``prefetch`` non-zero: each step prefetches ``next``'s slice of K."""
    instruction = _KINDS[kind][0]
    name = _function_name(kind, m_tiles, n_tiles)
    c_tile = {(m, n): m * n_tiles + n for m in range(m_tiles) for n in range(n_tiles)}
    a_tile = {m: 4 + m for m in range(m_tiles)}
    b_tile = {n: 6 + n for n in range(n_tiles)}
    rows = {**{c_tile[m, n]: f"%r{m}" for (m, n) in c_tile},
            **{a_tile[m]: f"%r{m}" for m in a_tile}, **{b_tile[n]: str(TILE_ROWS) for n in b_tile}}
    config = [
        f"  %cols{t} = getelementptr i8, ptr %cfg, i64 {16 + 2 * t}\n"
        f"  store i16 {TILE_BYTES}, ptr %cols{t}\n"
        f"  %height{t} = getelementptr i8, ptr %cfg, i64 {48 + t}\n"
        f"  store i8 {r}, ptr %height{t}"
        for t, r in sorted(rows.items())
    ]
    zero = [f"  call void @llvm.x86.tilezero(i8 {t})" for t in sorted(c_tile.values())]
    loads = [
        f"  %pa{m} = getelementptr i8, ptr %a{m}, i64 %ao\n"
        f"  call void @llvm.x86.tileloadd64(i8 {a_tile[m]}, ptr %pa{m}, i64 %lda)"
        for m in a_tile
    ] + [
        f"  %pb{n} = getelementptr i8, ptr %bblock, i64 %bo{n}\n"
        f"  call void @llvm.x86.tileloadd64(i8 {b_tile[n]}, ptr %pb{n}, i64 %ldb)"
        for n in b_tile
    ]
    products = [
        f"  call void @llvm.x86.{instruction}(i8 {c_tile[m, n]}, i8 {a_tile[m]}, i8 {b_tile[n]})"
        for (m, n) in c_tile
    ]
    stores = [
        f"  %cr{m}n{n} = mul i64 %ldc, {TILE_ROWS * m}\n"
        f"  %co{m}n{n} = add i64 %cr{m}n{n}, {TILE_BYTES * n}\n"
        f"  %cm{m}n{n} = getelementptr i8, ptr %cblock, i64 %co{m}n{n}\n"
        f"  call void @llvm.x86.tilestored64(i8 {c_tile[m, n]}, ptr %cm{m}n{n}, i64 %ldc)"
        for (m, n) in c_tile
    ]
    b_offsets = [f"  %bo{n} = add i64 %bk, {TILE_BYTES * n}" for n in b_tile]
    # the same step's slice of the next panel: TILE_ROWS rows of n_tiles · 64 bytes
    prefetches = [
        f"  %pf{line} = getelementptr i8, ptr %nextk, i64 {CACHE_LINE * line}\n"
        f"  call void @llvm.prefetch.p0(ptr %pf{line}, i32 0, i32 2, i32 1)"
        for line in range(TILE_ROWS * n_tiles * TILE_BYTES // CACHE_LINE)
    ]
    nl = "\n"
    return f"""
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilerelease()
declare void @llvm.x86.tilezero(i8 immarg)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
declare void @llvm.x86.{instruction}(i8 immarg, i8 immarg, i8 immarg)
@{name}_permitted = internal global i32 0

declare void @llvm.prefetch.p0(ptr, i32 immarg, i32 immarg, i32 immarg)

define internal i32 @{name}(ptr %c, i64 %ldc, ptr %a, i64 %lda, ptr %b, i64 %ldb, i64 %steps,
                             i32 %rows0, i32 %rows1, i64 %blocks, ptr %next,
                             i32 %prefetch, i64 %astep, i64 %bstep,
                             i64 %cstep) alwaysinline {{
entry:
  %cfg = alloca [64 x i8], align 64
  %permitted = load atomic i32, ptr @{name}_permitted monotonic, align 4
  %known = icmp ne i32 %permitted, 0
  br i1 %known, label %configure, label %ask
ask:
  %answer = call i64 asm sideeffect "syscall",
      "={{rax}},{{rax}},{{rdi}},{{rsi}},~{{rcx}},~{{r11}},~{{memory}}"
      (i64 {SYS_ARCH_PRCTL}, i64 {ARCH_REQ_XCOMP_PERM}, i64 {XFEATURE_XTILEDATA})
  store atomic i32 1, ptr @{name}_permitted monotonic, align 4
  br label %configure
configure:
  store <16 x i32> zeroinitializer, ptr %cfg, align 64
  store i8 1, ptr %cfg
  %r0 = trunc i32 %rows0 to i8
  %r1 = trunc i32 %rows1 to i8
{nl.join(config)}
  call void @llvm.x86.ldtilecfg(ptr %cfg)
  %lda16 = mul i64 %lda, {TILE_ROWS}
  %ldb16 = mul i64 %ldb, {TILE_ROWS}
  br label %block
block:
  %blk = phi i64 [0, %configure], [%nextblk, %done]
  %ablock = mul i64 %blk, %astep
  %a0 = getelementptr i8, ptr %a, i64 %ablock
  %a1 = getelementptr i8, ptr %a0, i64 %lda16
  %bblockoff = mul i64 %blk, %bstep
  %bblock = getelementptr i8, ptr %b, i64 %bblockoff
  %cblockoff = mul i64 %blk, %cstep
  %cblock = getelementptr i8, ptr %c, i64 %cblockoff
{nl.join(zero)}
  br label %loop
loop:
  %k = phi i64 [0, %block], [%nextstep, %stepped]
  %ao = mul i64 %k, {TILE_BYTES}
  %bk = mul i64 %k, %ldb16
{nl.join(b_offsets)}
{nl.join(loads)}
{nl.join(products)}
  %wanted = icmp ne i32 %prefetch, 0
  br i1 %wanted, label %ahead, label %stepped
ahead:
  %nextk = getelementptr i8, ptr %next, i64 %bk
{nl.join(prefetches)}
  br label %stepped
stepped:
  %nextstep = add i64 %k, 1
  %more = icmp ult i64 %nextstep, %steps
  br i1 %more, label %loop, label %done
done:
{nl.join(stores)}
  %nextblk = add i64 %blk, 1
  %moreblk = icmp ult i64 %nextblk, %blocks
  br i1 %moreblk, label %block, label %exit
exit:
  call void @llvm.x86.tilerelease()
  ret i32 0
}}
"""


def _widen(kind: str):
    if kind == "bf16":
        return lambda v: T.reinterpret(T.shift_left(T.Cast("uint32", v), T.uint32(16)), dtype="float32")
    return lambda v: T.Cast("int32", v)


def _make(kind: str, rows: int, nb: int, k_groups: int, panels: int):
    """(desc, impl) of the step; ``panels``: the weight's panels, the last of which has no next
    panel to prefetch."""
    _, depth, a_dtype, b_dtype, acc = _KINDS[kind]
    k = k_groups * depth
    a_bytes, acc_bytes = {"uint16": 2, "uint8": 1}[a_dtype], 4
    b_row_bytes = nb * depth * a_bytes
    panel = k_groups * nb * depth  # elements
    widen = _widen(kind)
    m_tiles, n_tiles = _m_tiles(rows), nb // TILE_ROWS
    blocks = max(rows // BLOCK_ROWS, 1)
    rows0, rows1 = min(rows, TILE_ROWS), min(max(rows - TILE_ROWS, 0), TILE_ROWS)
    steps = k * a_bytes // TILE_BYTES

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (rows, k), a_dtype, strides=(sa, 1), offset_factor=1)
        B = T.match_buffer(b, (k_groups, nb, depth), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (rows, nb), acc, strides=(sc, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:nb], A[0:rows, 0:k], B[0:k_groups, 0:nb, 0:depth])
            T.writes(C[0:rows, 0:nb])
            for i, j, r in T.grid(rows, nb, k):
                with T.sblock("update"):
                    vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                    T.reads(C[vi, vj], A[vi, vr], B[vr // depth, vj, vr % depth])
                    T.writes(C[vi, vj])
                    C[vi, vj] = C[vi, vj] + widen(A[vi, vr]) * widen(B[vr // depth, vj, vr % depth])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (rows, k), a_dtype, strides=(sa, 1), offset_factor=1)
        B = T.match_buffer(b, (k_groups, nb, depth), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (rows, nb), acc, strides=(sc, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:nb], A[0:rows, 0:k], B[0:k_groups, 0:nb, 0:depth])
            T.writes(C[0:rows, 0:nb])
            T.evaluate(T.call_extern(
                "int32", _function_name(kind, m_tiles, n_tiles),
                C.access_ptr("w"), T.Cast("int64", sc) * acc_bytes,
                A.access_ptr("r"), T.Cast("int64", sa) * a_bytes,
                B.access_ptr("r"), T.int64(b_row_bytes), T.int64(steps),
                rows0, rows1, T.int64(blocks),
                B.access_ptr("r", offset=panel),
                T.Cast("int32", B.elem_offset // panel + 1 < panels),
                T.Cast("int64", sa) * (a_bytes * BLOCK_ROWS), T.int64(0),
                T.Cast("int64", sc) * (acc_bytes * BLOCK_ROWS),
            ))

    return desc, impl


def _m_tiles(rows: int) -> int:
    return 1 if rows <= TILE_ROWS else 2


def fits(kind: str, rows: int, nb: int, k: int) -> bool:
    """Whether one step covers a ``rows × nb`` block over ``k`` values of K: up to 32 rows, or
    whole blocks of 32 up to ``MOST_ROWS``."""
    row_ok = 1 <= rows <= BLOCK_ROWS or (rows <= MOST_ROWS and rows % BLOCK_ROWS == 0)
    return (kind in _KINDS and row_ok and nb in (TILE_ROWS, 2 * TILE_ROWS)
            and k > 0 and k % k_multiple(kind) == 0)


def intrinsic(kind: str, rows: int, nb: int, k: int, panels: int) -> str:
    """The name of the step for a ``rows × nb`` block over ``k`` values of a weight of
    ``panels`` panels, registered on first use (shapes vary with the model: they cannot all be
    registered up front)."""
    name = f"mbcompile_amx_{kind}_{rows}x{nb}x{k}_of_{panels}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_make(kind, rows, nb, k // _KINDS[kind][1], panels))
    return name


def zeroing(kind: str, rows: int, nb: int) -> str:
    """The name of the zeroing that goes with a step: nothing to run, the step starts from
    zeroed tiles (``tilezero``) and overwrites the whole block (``free_zeroing``)."""
    return free_zeroing(_KINDS[kind][4], rows, nb)


def function_name(kind: str, rows: int, nb: int) -> str:
    """The LLVM function of ``rows × nb`` steps (``llvm_ir``), for a kernel that calls it
    directly (``T.call_extern``; the arguments are ``_llvm_ir``'s)."""
    return _function_name(kind, _m_tiles(rows), nb // TILE_ROWS)


def llvm_ir(kind: str, rows: int, nb: int) -> str:
    """The IR a kernel of ``rows × nb`` steps links (``pragma_import_llvm``)."""
    return _llvm_ir(kind, _m_tiles(rows), nb // TILE_ROWS)
