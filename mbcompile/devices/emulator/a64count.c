/* a64count: a QEMU TCG plugin counting the AArch64 instructions a guest executes, by class.
 *
 * Built by counting.py with the host's C compiler, loaded by Debian's dynamic qemu-aarch64
 * (`-plugin liba64count.so,out=FILE`). It needs no qemu-plugin.h: the few declarations of the
 * plugin API (version 1, QEMU 7.x and 8.x) it uses are below.
 *
 * Each translated block is classified once, at translation; each execution adds one to the
 * block's count. Totals are the sum of count × classes over the blocks, taken when the guest
 * asks: a guest marks a point of its run with close(MARK_BASE + label), a syscall that fails
 * with EBADF and does nothing else. Label 1 opens the kernel window, label 2 closes it: the
 * blocks executed between them are written with their counts, to be named by address.
 *
 * Output (JSON lines): {"mark": label, "<class>": n, ...} per mark, then
 * {"block": vaddr, "execs": n, "<class>": n, ...} per block executed in the window.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* -- the plugin API, version 1 ------------------------------------------------------------ */
typedef uint64_t qemu_plugin_id_t;
typedef struct {
    const char *target_name;
    struct { int min, cur; } version;
    bool system_emulation;
    union { struct { int smp_vcpus, max_vcpus; } system; };
} qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
typedef void (*tb_trans_cb)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*vcpu_udata_cb)(unsigned int vcpu, void *udata);
typedef void (*syscall_cb)(qemu_plugin_id_t, unsigned int vcpu, int64_t num, uint64_t a1,
                           uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                           uint64_t a7, uint64_t a8);
typedef void (*udata_cb)(qemu_plugin_id_t, void *);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, tb_trans_cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *, vcpu_udata_cb,
                                          enum qemu_plugin_cb_flags, void *);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t, syscall_cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, udata_cb, void *);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* -- classes ------------------------------------------------------------------------------- */
/* Keep in step with CLASSES in counting.py. */
enum {
    TOTAL,      /* every instruction */
    NEON,       /* Advanced SIMD data processing on vectors (not loads, stores, scalar FP) */
    NEON_Q,     /* ... of which on 128-bit registers */
    FP_SCALAR,  /* scalar floating point and scalar SIMD */
    LOAD,       /* every load (general and SIMD registers; pairs and structures count once) */
    STORE,
    LOAD_SIMD,  /* loads into SIMD/FP registers */
    STORE_SIMD,
    BRANCH,
    FMLA,       /* vector FMLA/FMLS (by vector or by element), fp32 and fp64 */
    FMLA_LANES, /* their lanes: 4 per FMLA v.4s */
    DOT,        /* SDOT/UDOT/BFDOT (by vector or by element) */
    NCLASS
};
static const char *NAMES[NCLASS] = {"total", "neon", "neon_q", "fp_scalar", "load", "store",
                                    "load_simd", "store_simd", "branch", "fmla", "fmla_lanes",
                                    "dot"};

/* The A64 encoding's top-level groups (Arm ARM, C4.1) and the multiply-accumulates counted. */
static void classify(uint32_t w, uint32_t *c)
{
    c[TOTAL]++;
    if ((w & 0x0A000000) == 0x08000000) {                   /* op0 x1x0: loads and stores */
        bool simd = (w >> 26) & 1, load;
        unsigned top = (w >> 27) & 7;                       /* bits 29:27 */
        if (top == 7 && !simd)                              /* registers: opc != 00 loads */
            load = ((w >> 22) & 3) != 0;
        else if (top == 3 && !((w >> 24) & 1))              /* literal */
            load = true;
        else                                                /* L bit (or opc<0> for SIMD) */
            load = (w >> 22) & 1;
        c[load ? LOAD : STORE]++;
        if (simd)
            c[load ? LOAD_SIMD : STORE_SIMD]++;
    } else if ((w & 0x1C000000) == 0x14000000) {            /* op0 101x: branches */
        c[BRANCH]++;
    } else if ((w & 0x0E000000) == 0x0E000000) {            /* op0 x111: SIMD and FP */
        if ((w >> 31) || ((w >> 28) & 1)) {                 /* scalar */
            c[FP_SCALAR]++;
            return;
        }
        c[NEON]++;
        bool q = (w >> 30) & 1, wide = (w >> 22) & 1;
        if (q)
            c[NEON_Q]++;
        if ((w & 0xBF20FC00) == 0x0E20CC00 || (w & 0xBF80B400) == 0x0F801000) {
            c[FMLA]++;                                      /* by vector / by element */
            c[FMLA_LANES] += wide ? (q ? 2 : 1) : (q ? 4 : 2);
        } else if ((w & 0x9FE0FC00) == 0x0E809400 || (w & 0x9FC0F400) == 0x0F80E000 ||
                   (w & 0xBFE0FC00) == 0x2E40FC00 || (w & 0xBFC0F400) == 0x0F40F000) {
            c[DOT]++;                                       /* S/UDOT, BFDOT */
        }
    }
}

/* -- blocks, marks, output ----------------------------------------------------------------- */
#define MARK_BASE @MARK_BASE@ULL
#define MARK_RANGE 100000ULL
#define NR_CLOSE 57 /* close(2) on aarch64 */
#define MAX_MARKS 4096

typedef struct Block {
    uint64_t vaddr, execs, opened, window;
    uint32_t c[NCLASS];
    struct Block *next;
} Block;

static Block *blocks;
static bool window_open;
static FILE *out;
static struct { uint64_t label, c[NCLASS]; } marks[MAX_MARKS];
static int nmarks;

static void on_exec(unsigned int vcpu, void *udata)
{
    __atomic_fetch_add(&((Block *)udata)->execs, 1, __ATOMIC_RELAXED);
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    Block *b = calloc(1, sizeof(*b));
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t k = 0; k < n; k++) {
        uint32_t word;
        memcpy(&word, qemu_plugin_insn_data(qemu_plugin_tb_get_insn(tb, k)), sizeof(word));
        classify(word, b->c);
    }
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->next = __atomic_load_n(&blocks, __ATOMIC_ACQUIRE);
    while (!__atomic_compare_exchange_n(&blocks, &b->next, b, false, __ATOMIC_RELEASE,
                                        __ATOMIC_ACQUIRE))
        ;
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS, b);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                       uint64_t a7, uint64_t a8)
{
    if (num != NR_CLOSE || a1 < MARK_BASE || a1 >= MARK_BASE + MARK_RANGE || nmarks >= MAX_MARKS)
        return;
    uint64_t label = a1 - MARK_BASE;
    marks[nmarks].label = label;
    for (Block *b = blocks; b; b = b->next) {
        uint64_t e = __atomic_load_n(&b->execs, __ATOMIC_RELAXED);
        for (int k = 0; k < NCLASS; k++)
            marks[nmarks].c[k] += e * b->c[k];
        if (label == 1 && !window_open)
            b->opened = e;
        else if (label == 2 && window_open)
            b->window += e - b->opened;
    }
    if (label == 1)
        window_open = true;  /* blocks translated from now on start from zero: opened = 0 */
    else if (label == 2)
        window_open = false;
    nmarks++;
}

static void write_classes(const uint64_t *c)
{
    for (int k = 0; k < NCLASS; k++)
        fprintf(out, ", \"%s\": %llu", NAMES[k], (unsigned long long)c[k]);
    fprintf(out, "}\n");
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
    for (int m = 0; m < nmarks; m++) {
        fprintf(out, "{\"mark\": %llu", (unsigned long long)marks[m].label);
        write_classes(marks[m].c);
    }
    for (Block *b = blocks; b; b = b->next) {
        if (!b->window)
            continue;
        uint64_t c[NCLASS];
        for (int k = 0; k < NCLASS; k++)
            c[k] = b->c[k];
        fprintf(out, "{\"block\": %llu, \"execs\": %llu", (unsigned long long)b->vaddr,
                (unsigned long long)b->window);
        write_classes(c);
    }
    fclose(out);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id,
                                                               const qemu_info_t *info,
                                                               int argc, char **argv)
{
    const char *path = NULL;
    if (strcmp(info->target_name, "aarch64") != 0) {
        fprintf(stderr, "a64count: counts aarch64 guests only, not %s\n", info->target_name);
        return -1;
    }
    for (int k = 0; k < argc; k++)
        if (strncmp(argv[k], "out=", 4) == 0)
            path = argv[k] + 4;
    out = path ? fopen(path, "w") : NULL;
    if (!out) {
        fprintf(stderr, "a64count: give out=FILE, a file it can write\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
