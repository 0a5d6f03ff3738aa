"""Counting what the emulated device executes: AArch64 instructions by class, per run and per
kernel, with a QEMU TCG plugin of our own (``a64count.c``).

There is no ARM hardware here and wall time under qemu means nothing, but the instructions a
program executes can be counted. :func:`run_counted` runs an aarch64 program of the device under
Debian's dynamic ``qemu-aarch64`` (the static build cannot load plugins) with the plugin loaded;
the program marks points of its run with ``close(MARK_BASE + label)`` (a syscall that fails
and does nothing else; ``counting_guest.py``), and the plugin reports the classes' totals at each
mark and, between marks 1 and 2 (the window), every executed block, which
:func:`kernels_of` names by the function of a library it lies in.

The classes (:data:`CLASSES`): ``total``, ``neon`` (vector data processing) and ``neon_q``
(on 128-bit registers), ``fp_scalar``, ``load``/``store`` (every load and store; a pair counts
once) with ``load_simd``/``store_simd``, ``branch``, ``fmla`` (vector fp FMLA/FMLS by vector or
by element) with ``fmla_lanes``, ``dot`` (SDOT/UDOT/BFDOT). ``cycle_models.py`` turns them into
modelled cycles of phone cores.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from mbcompile.devices.emulator import cycle_models
from mbcompile.devices.emulator.device import Emulator, cache_dir
from mbcompile.errors import EmulatorError, ToolchainError

QEMU = "qemu-aarch64"  # Debian qemu-user: dynamic, loads TCG plugins
TOOLS = {QEMU: "qemu-user", "cc": "gcc"}  # program → Debian package
PLUGIN_SOURCE = Path(__file__).with_name("a64count.c")
MARK_BASE = 987000
WINDOW_OPEN, WINDOW_CLOSE = 1, 2  # the labels bounding the per-block window
CLASSES = ("total", "neon", "neon_q", "fp_scalar", "load", "store", "load_simd", "store_simd",
           "branch", "fmla", "fmla_lanes", "dot")
# /proc/cpuinfo of the emulated core, MIDR fields and features as Linux prints them on a
# Cortex-A76 (qemu's -cpu cortex-a76). qemu-user gives the guest the host's x86 file, which
# some aarch64 libraries (ONNX Runtime's cpuinfo) cannot parse.
CPUINFO = {
    "cortex-a76": ("0x4", "0xd0b", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
                   "asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"),
    "cortex-a55": ("0x2", "0xd05", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
                   "asimdhp cpuid asimdrdm lrcpc dcpop asimddp"),
    "cortex-a72": ("0x0", "0xd08", "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "max": ("0x0", "0xd0f", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp "
            "cpuid asimdrdm lrcpc dcpop asimddp asimdfhm i8mm bf16 sve"),
}


@dataclasses.dataclass
class Counts:
    """What one counted run executed: the classes' totals at each mark, and the blocks run
    between marks 1 and 2 (``vaddr``, ``execs``, classes per execution)."""

    marks: list[tuple[int, dict[str, int]]]
    blocks: list[dict]
    maps: str = ""  # the guest's /proc/self/maps, if it wrote it (to name blocks)

    def at(self, label: int) -> dict[str, int]:
        """The totals at the (first) mark ``label``; EmulatorError if the run never reached it."""
        for found, classes in self.marks:
            if found == label:
                return classes
        raise EmulatorError(f"the counted run never reached its mark {label}")

    def between(self, first: int, last: int) -> dict[str, int]:
        """What ran from mark ``first`` to mark ``last``, by class."""
        a, b = self.at(first), self.at(last)
        return {k: b[k] - a[k] for k in CLASSES}


def missing_tools() -> dict[str, str]:
    """Programs counting needs that are not on PATH, with their Debian packages."""
    return {tool: pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}


def _require_tools() -> None:
    missing = missing_tools()
    if missing:
        raise ToolchainError(
            f"counting instructions needs {sorted(missing)}, not on PATH; install with: "
            f"apt-get install {' '.join(sorted(set(missing.values())))}"
        )


def _qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"version (\d+)\.(\d+)", out)
    if not found:
        raise ToolchainError(f"cannot tell the version of {QEMU}: {out.strip()[:200]!r}")
    if int(found.group(1)) not in (7, 8):
        raise ToolchainError(
            f"{QEMU} {found.group(1)}.{found.group(2)}: the counting plugin speaks QEMU's plugin "
            f"API version 1, of QEMU 7.x and 8.x (Debian bookworm's qemu-user)"
        )
    return f"{found.group(1)}.{found.group(2)}"


def build_plugin(directory: Path | None = None) -> Path:
    """The plugin, compiled with the host's ``cc`` into ``directory`` (default: beside the
    emulated device's cache) once per source and qemu version; its path."""
    _require_tools()
    source = PLUGIN_SOURCE.read_text().replace("@MARK_BASE@", str(MARK_BASE))
    key = hashlib.sha256((source + _qemu_version()).encode()).hexdigest()[:12]
    directory = directory or cache_dir().parent / "counting"
    path = directory / f"liba64count-{key}.so"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = Path(tmp) / "a64count.c"
        src.write_text(source)
        built = Path(tmp) / path.name
        proc = subprocess.run(
            ["cc", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-o", str(built),
             str(src)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise ToolchainError(f"building the counting plugin failed:\n{proc.stderr[-2000:]}")
        os.replace(built, path)
    return path


def with_cpuinfo(device: Emulator, cpu: str) -> Path:
    """The device's root with an aarch64 /proc/cpuinfo for ``cpu``: a hard-linked copy of it
    (the device itself is left as built), made once per CPU; its path."""
    if cpu not in CPUINFO:
        raise EmulatorError(f"no /proc/cpuinfo for the CPU {cpu!r}; known: {sorted(CPUINFO)}")
    variant, part, features = CPUINFO[cpu]
    text = "".join(
        f"processor\t: {p}\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: 1\n\n"
        for p in range(os.cpu_count() or 1)
    )
    stamp = hashlib.sha256((text + json.dumps(device.stamp, sort_keys=True)).encode()).hexdigest()
    root = device.directory.parent / "counting" / f"root-{cpu}-{stamp[:12]}"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".root-{cpu}-", dir=root.parent))
    try:
        copy = subprocess.run(["cp", "-al", f"{device.root}/.", str(tmp)], capture_output=True,
                              check=False)
        if copy.returncode != 0:  # another file system: a plain copy
            shutil.rmtree(tmp)
            shutil.copytree(device.root, tmp, symlinks=True)
        (tmp / "proc").mkdir(exist_ok=True)
        (tmp / "proc" / "cpuinfo").write_text(text)
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not root.is_dir():
            raise
        # another process or thread made it first (renaming onto it: ENOTEMPTY)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def run_counted(
    device: Emulator,
    program: list[str],
    *,
    cpu: str = "cortex-a76",
    env: dict[str, str] | None = None,
    timeout: float = 900,
    library_path: str | None = None,
    check: bool = True,
) -> tuple[Counts | None, subprocess.CompletedProcess]:
    """Run ``program`` (an aarch64 command line, its program a host path, e.g.
    ``[str(device.root / "usr/bin/python3"), ...]``) under ``qemu-aarch64 -cpu CPU`` with the
    counting plugin; its counts and process.

    One kernel thread (``TVM_NUM_THREADS=OMP_NUM_THREADS=1``); address randomisation is off
    (``setarch -R``) so that repeated runs execute the same blocks. ``env`` adds to the guest's
    environment; ``library_path`` is the guest loader's ``LD_LIBRARY_PATH``. A guest that wants
    its blocks named writes its /proc/self/maps to ``$MBCOMPILE_COUNT_MAPS`` before it exits.
    EmulatorError if the program fails or takes longer than ``timeout`` seconds; with
    ``check=False`` the counts are None then, and the process says what happened.
    """
    plugin = build_plugin()
    model = cpu.split(",")[0]  # "max,sme=off": qemu's CPU model and its properties
    root = with_cpuinfo(device, model if model in CPUINFO else "cortex-a76")
    with tempfile.TemporaryDirectory(prefix="mbcompile-count-") as tmp:
        out, maps = Path(tmp) / "counts.jsonl", Path(tmp) / "maps.txt"
        guest_env = {
            "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "TVM_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1", "TVM_USE_RUNTIME_LIB": "1", "QEMU_LD_PREFIX": str(root),
            "MBCOMPILE_COUNT_MAPS": str(maps), **(env or {}),
        }
        cmd = ["timeout", "-k", "5", str(int(timeout))]
        if shutil.which("setarch"):
            cmd += ["setarch", "-R"]
        cmd += [QEMU, "-cpu", cpu, "-L", str(root), "-plugin", f"{plugin},out={out}"]
        if library_path:
            cmd += ["-E", f"LD_LIBRARY_PATH={library_path}"]
        cmd += program
        proc = subprocess.run(cmd, env=guest_env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 and not check:
            return None, proc
        if proc.returncode != 0:
            why = f"took longer than {timeout:.0f} s" if proc.returncode == 124 else \
                f"failed (exit {proc.returncode})"
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise EmulatorError(f"the counted run {why}: {' '.join(program)[:300]}\n{tail}")
        counts = _parse(out)
        counts.maps = maps.read_text() if maps.is_file() else ""
    return counts, proc


def _parse(path: Path) -> Counts:
    marks, blocks = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise EmulatorError(f"the counting plugin wrote nothing ({err})") from None
    for line in lines:
        row = json.loads(line)
        if "mark" in row:
            marks.append((int(row.pop("mark")), row))
        else:
            row["vaddr"] = row.pop("block")
            blocks.append(row)
    return Counts(marks, blocks)


def _symbols(library: Path) -> list[tuple[int, str]]:
    """(offset, name) of the functions defined in an aarch64 shared library, sorted."""
    nm = shutil.which("aarch64-linux-gnu-nm") or shutil.which("llvm-nm")
    if nm is None:
        raise ToolchainError("naming kernels needs aarch64-linux-gnu-nm (apt-get install "
                             "binutils-aarch64-linux-gnu)")
    lines = subprocess.run([nm, "--defined-only", str(library)], capture_output=True, text=True,
                           check=False).stdout.splitlines()
    found = []
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tT":
            found.append((int(parts[0], 16), parts[2]))
    return sorted(found)


def _regions(counts: Counts, library: Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of ``library``'s executable mappings in the guest's memory map:
    by its full path if the map has it, else by its file name."""
    found: dict[bool, list] = {True: [], False: []}
    for line in counts.maps.splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) \S+ \d+\s+(.*)$", line)
        if m and "x" in m.group(3) and Path(m.group(5).strip()).name == library.name:
            exact = m.group(5).strip() == str(library)
            found[exact].append((int(m.group(1), 16), int(m.group(2), 16), int(m.group(4), 16)))
    regions = found[True] or found[False]
    if not regions:
        raise EmulatorError(f"{library.name} is not in the counted run's memory map")
    return regions


def in_library(counts: Counts, library: Path) -> dict[str, int]:
    """What the window's blocks inside ``library`` (by full path) executed, by class."""
    regions = _regions(counts, library)
    total = {k: 0 for k in CLASSES}
    for block in counts.blocks:
        if any(lo <= block["vaddr"] < hi for lo, hi, _ in regions):
            for k in CLASSES:
                total[k] += block[k] * block["execs"]
    return total


def kernels_of(counts: Counts, library: Path | None, per: float = 1.0) -> list[dict]:
    """The window's blocks summed per function of ``library`` (found in the guest's memory map
    by file name), each class divided by ``per`` (e.g. the forwards in the window), with the
    modelled cycles of each core model (``cycles_<model>``: the sum of each block's own bound,
    so a kernel's loop and its packing are each bound by their own resource); largest
    ``total`` first. Blocks elsewhere are summed under ``"(outside)"``; with ``library=None``
    every block is, under ``"(all)"``."""
    regions, symbols = [], []
    if library is not None:
        regions = _regions(counts, library)
        symbols = _symbols(library)
    starts = [a for a, _ in symbols]
    models = list(cycle_models.MODELS)
    per_kernel: dict[str, dict] = {}
    for block in counts.blocks:
        name = "(all)" if library is None else "(outside)"
        for lo, hi, offset in regions:
            if lo <= block["vaddr"] < hi:
                i = bisect.bisect_right(starts, block["vaddr"] - lo + offset) - 1
                name = symbols[i][1] if i >= 0 else "(unnamed)"
                break
        row = per_kernel.setdefault(
            name, {"kernel": name, **{k: 0.0 for k in CLASSES},
                   **{f"cycles_{m}": 0.0 for m in models}})
        scale = block["execs"] / per
        for k in CLASSES:
            row[k] += block[k] * scale
        for m in models:
            row[f"cycles_{m}"] += cycle_models.cycles(block, m) * scale
    for row in per_kernel.values():
        for m in models:
            row[f"bottleneck_{m}"] = cycle_models.bottleneck(row, m)
    return sorted(per_kernel.values(), key=lambda r: -r["total"])
