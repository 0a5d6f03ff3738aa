"""Named targets: one table of data, validated at import.

Each entry says which LLVM target TVM compiles for, which CPU features a machine needs to run the
result, and how the shared library is linked (``export``). ``host`` is not in the table: it is
resolved from this machine's CPU (TVM rejects ``mcpu=native``).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field, replace

from mbcompile.errors import TargetError

ARCHES = ("x86_64", "aarch64")
EXPORTS = ("host-cc", "aarch64-linux-gnu", "android-ndk")


@dataclass(frozen=True)
class Target:
    """A named compilation target.

    ``llvm`` holds the TVM target fields besides ``kind`` and ``num-cores`` (``mtriple``,
    ``mcpu``, ``mattr``); ``features`` are the CPU flags (as Linux's /proc/cpuinfo spells them)
    that a machine must have to run code built for this target.
    """

    name: str
    description: str
    arch: str
    llvm: dict = field(default_factory=dict)
    features: tuple[str, ...] = ()
    export: str = "host-cc"
    num_cores: int | None = None

    def tvm_target(self):
        import tvm

        spec = {"kind": "llvm", **self.llvm}
        spec["num-cores"] = self.num_cores or os.cpu_count() or 1
        return tvm.target.Target(spec)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "arch": self.arch,
            "llvm": dict(self.llvm),
            "features": list(self.features),
            "export": self.export,
            "num_cores": self.num_cores,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Target:
        return cls(
            name=data["name"],
            description=data["description"],
            arch=data["arch"],
            llvm=dict(data["llvm"]),
            features=tuple(data["features"]),
            export=data["export"],
            num_cores=data.get("num_cores"),
        )


_X86 = {"mtriple": "x86_64-linux-gnu"}
_AARCH64 = {"mtriple": "aarch64-linux-gnu"}
_ANDROID = {"mtriple": "aarch64-linux-android"}
_AVX2 = ("avx2", "fma")
_AVX512 = (*_AVX2, "avx512f", "avx512bw", "avx512dq", "avx512vl")
_AMX = ("amx_tile", "amx_bf16", "amx_int8")

# CPU flags a target may require, as /proc/cpuinfo spells them ("flags" on x86, "Features" on
# aarch64: asimd = NEON, asimddp = the ARMv8.2 dot-product instructions SDOT/UDOT, i8mm and
# bf16 = Armv8.6's int8 matrix multiply and BF16 instructions).
FEATURES = {
    "x86_64": ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16",
               "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"),
    "aarch64": ("asimd", "asimddp", "i8mm", "bf16"),
}
# How each export links, and for which architecture and LLVM triple (OS) it can.
EXPORT_TRIPLES = {
    "host-cc": ("x86_64-linux-gnu", "aarch64-linux-gnu"),
    "aarch64-linux-gnu": ("aarch64-linux-gnu",),
    "android-ndk": ("aarch64-linux-android",),
}

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="x86-64",
            description="x86-64 with AVX2 and FMA (Haswell and later, AMD Zen)",
            arch="x86_64",
            llvm={**_X86, "mcpu": "haswell"},
            features=_AVX2,
        ),
        Target(
            name="x86-64-avx512",
            description="x86-64 with AVX-512 (Skylake-SP and later)",
            arch="x86_64",
            llvm={**_X86, "mcpu": "skylake-avx512"},
            features=_AVX512,
        ),
        # AMD EPYC/Ryzen by generation: LLVM tunes for the core, and each has a tuning database
        # in targets/databases/ that applies by default.
        Target(
            name="x86-64-zen3",
            description="AMD Zen 3 (EPYC 7003, Ryzen 5000): AVX2 and FMA",
            arch="x86_64",
            llvm={**_X86, "mcpu": "znver3"},
            features=_AVX2,
        ),
        Target(
            name="x86-64-zen4",
            description=("AMD Zen 4 (EPYC 9004, Ryzen 7000): AVX-512; fp32 on 256-bit vectors, "
                         "bf16 and int8 on 512-bit"),
            arch="x86_64",
            llvm={**_X86, "mcpu": "znver4"},
            features=_AVX512,
        ),
        # Zen 5 server and desktop cores run 512-bit operations at full width, so fp32 takes
        # 512-bit vectors there too (mbcompile.cpu); no database is shipped for it yet.
        Target(
            name="x86-64-zen5",
            description=("AMD Zen 5 (EPYC 9005, Ryzen 9000): AVX-512 at full width, "
                         "AVX512_BF16 and VNNI"),
            arch="x86_64",
            llvm={**_X86, "mcpu": "znver5"},
            features=(*_AVX512, "avx512_bf16", "avx512_vnni"),
        ),
        # Intel Xeon 4th generation and later: bf16 and int8 matmuls on AMX tiles
        # (targets/schedules/dense_tiles.py). Linux 5.16 or later grants the tile state.
        Target(
            name="x86-64-sapphirerapids",
            description="Intel Xeon Sapphire Rapids and later: AVX-512, AVX512_BF16, AMX tiles",
            arch="x86_64",
            llvm={**_X86, "mcpu": "sapphirerapids"},
            features=(*_AVX512, "avx512_bf16", "avx512_vnni", *_AMX),
        ),
        Target(
            name="aarch64",
            description="64-bit ARM Linux with NEON (ARMv8-A)",
            arch="aarch64",
            llvm={**_AARCH64, "mcpu": "generic", "mattr": ["+neon"]},
            features=("asimd",),
            export="aarch64-linux-gnu",
        ),
        Target(
            name="aarch64-dotprod",
            description="64-bit ARM Linux, ARMv8.2-A with dot product (Cortex-A55/A76 and later)",
            arch="aarch64",
            llvm={**_AARCH64, "mcpu": "generic", "mattr": ["+v8.2a", "+neon", "+dotprod"]},
            features=("asimd", "asimddp"),
            export="aarch64-linux-gnu",
        ),
        Target(
            name="aarch64-armv9",
            description="64-bit ARM Linux, Armv9-A phone big cores (Cortex-A710/X2 and later): "
                        "dot product, int8 matrix multiply, bf16",
            arch="aarch64",
            llvm={**_AARCH64, "mcpu": "generic",
                  "mattr": ["+v8.6a", "+neon", "+dotprod", "+i8mm", "+bf16"]},
            features=("asimd", "asimddp", "i8mm", "bf16"),
            export="aarch64-linux-gnu",
        ),
        Target(
            name="android-arm64",
            description="Android phones (arm64-v8a), tuned for Cortex-A76 big cores (dotprod)",
            arch="aarch64",
            llvm={**_ANDROID, "mcpu": "cortex-a76", "mattr": ["+neon"]},
            features=("asimd", "asimddp"),
            export="android-ndk",
        ),
        Target(
            name="raspberry-pi-4",
            description="Raspberry Pi 4 Model B, 64-bit OS (4x Cortex-A72, ARMv8-A NEON)",
            arch="aarch64",
            llvm={**_AARCH64, "mcpu": "cortex-a72", "mattr": ["+neon"]},
            features=("asimd",),
            export="aarch64-linux-gnu",
            num_cores=4,
        ),
    )
}


def _validate(table: dict[str, Target]) -> None:
    for name, t in table.items():
        if name != t.name:
            raise AssertionError(f"target table key {name!r} != name {t.name!r}")
        if t.arch not in ARCHES:
            raise AssertionError(f"target {name!r}: arch {t.arch!r} not in {ARCHES}")
        if t.export not in EXPORTS:
            raise AssertionError(f"target {name!r}: export {t.export!r} not in {EXPORTS}")
        if "mtriple" not in t.llvm or "mcpu" not in t.llvm:
            raise AssertionError(f"target {name!r}: llvm needs mtriple and mcpu")
        if not t.llvm["mtriple"].startswith(t.arch):
            raise AssertionError(f"target {name!r}: mtriple {t.llvm['mtriple']!r} is not {t.arch}")
        if t.llvm["mtriple"] not in EXPORT_TRIPLES[t.export]:
            raise AssertionError(
                f"target {name!r}: export {t.export!r} links for {EXPORT_TRIPLES[t.export]}, "
                f"not {t.llvm['mtriple']!r}"
            )
        unknown = [f for f in t.features if f not in FEATURES[t.arch]]
        if unknown:
            raise AssertionError(
                f"target {name!r}: features {unknown} not in {t.arch}'s {FEATURES[t.arch]} "
                f"(spell them as /proc/cpuinfo does)"
            )
        if "+dotprod" in t.llvm.get("mattr", ()) and "asimddp" not in t.features:
            raise AssertionError(f"target {name!r}: +dotprod code needs feature 'asimddp'")


_validate(TARGETS)


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def host_features() -> set[str]:
    """CPU flags of this machine as /proc/cpuinfo lists them (empty set if unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def host_cpu_name() -> str:
    """This machine's CPU model as /proc/cpuinfo names it (for reports and benchmarks)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_target() -> Target:
    """This machine's CPU, with LLVM's name for it as ``mcpu``."""
    import tvm

    arch = host_arch()
    if arch not in ARCHES:
        raise TargetError(f"host architecture {arch!r} is not supported; supported: {ARCHES}")
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    triple = "x86_64-linux-gnu" if arch == "x86_64" else "aarch64-linux-gnu"
    flags = host_features()
    if not amx_permitted():
        flags -= set(_AMX)
    wanted = ("avx2", "fma", "avx512f", *_AMX) if arch == "x86_64" else ("asimd", "asimddp")
    llvm = {"mtriple": triple, "mcpu": cpu}
    extra = _missing_llvm_features(llvm, flags)
    if extra:
        llvm["mattr"] = [f"+{f}" for f in extra]
    return Target(
        name="host",
        description=f"this machine ({arch}, LLVM cpu {cpu}{''.join(' +' + f for f in extra)})",
        arch=arch,
        llvm=llvm,
        features=tuple(f for f in wanted if f in flags),
    )


# /proc/cpuinfo flag → LLVM feature, for the features a build can use that LLVM's name for a CPU
# may not imply: under a hypervisor LLVM can name an older model than the CPU (an AVX512_BF16
# Xeon reported as "rocketlake", which has no BF16).
_LLVM_FEATURES = {"avx512_bf16": "avx512bf16", "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni",
                  "amx_tile": "amx-tile", "amx_bf16": "amx-bf16", "amx_int8": "amx-int8"}


def _missing_llvm_features(llvm: dict, flags: set[str]) -> list[str]:
    """The LLVM features of ``_LLVM_FEATURES`` this machine has and ``llvm``'s mcpu lacks."""
    import tvm

    target = tvm.target.Target({"kind": "llvm", **llvm})
    missing = []
    for flag, feature in _LLVM_FEATURES.items():
        if flag in flags and not bool(tvm.target.codegen.target_has_features(feature, target)):
            missing.append(feature)
    return missing


# Linux x86-64's arch_prctl request for AMX tile state (asm/prctl.h), also made by the kernels
ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1023, 18, 158


def amx_permitted() -> bool:
    """Whether this process may use AMX tiles: the CPU has them and Linux grants the state
    (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, Linux 5.16 and later). The
    kernels ask again themselves (``tile_intrinsics``); this is the answer before compiling."""
    if host_arch() != "x86_64" or "amx_tile" not in host_features() or platform.system() != "Linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def known_targets() -> list[str]:
    return ["host", *TARGETS]


def resolve_target(target: str | Target = "host", num_cores: int | None = None) -> Target:
    """A Target from its name (or the Target itself); unknown names list the known ones."""
    if isinstance(target, Target):
        resolved = target
    elif target == "host":
        resolved = host_target()
    elif isinstance(target, str) and target in TARGETS:
        resolved = TARGETS[target]
    else:
        raise TargetError(f"Unknown target {target!r}; known: {known_targets()}")
    if num_cores is not None:
        resolved = replace(resolved, num_cores=num_cores)
    return resolved


def can_run_here(target: Target) -> str | None:
    """None if this machine can run code built for ``target``, else the reason it cannot."""
    arch = host_arch()
    if target.arch != arch:
        return (
            f"the artifact was compiled for {target.arch} (target {target.name!r}) and this "
            f"machine is {arch}; run it on a {target.arch} device, e.g. over TVM RPC with "
            f"mbcompile.load(path, remote='HOST:PORT')"
        )
    have = host_features()
    if any(f in _AMX for f in target.features) and not amx_permitted():
        have -= set(_AMX)
    missing = [f for f in target.features if f not in have]
    if missing:
        return (
            f"the artifact was compiled for target {target.name!r}, which needs CPU features "
            f"{missing} that this machine lacks; recompile with target='host'"
        )
    return None
