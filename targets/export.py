"""Link a compiled executable into a shared library for its target (cross-compiling if needed).

``link_library`` is the build's last stage: the compile driver calls it before it returns, so a
missing cross toolchain is reported by ``compile`` itself.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path

from mbcompile.errors import ToolchainError
from mbcompile.targets.codegen import write_library
from mbcompile.targets.registry import Target, host_arch

# Debian's cross compilers for Linux aarch64.
AARCH64_LINUX_CC = "aarch64-linux-gnu-g++"
AARCH64_LINUX_PACKAGE = "g++-aarch64-linux-gnu"
ANDROID_API = 28


def _aarch64_linux_compiler() -> str:
    if host_arch() == "aarch64" and shutil.which("g++"):
        return "g++"
    found = shutil.which(AARCH64_LINUX_CC)
    if found is None:
        raise ToolchainError(
            f"cross-compiling for Linux aarch64 needs {AARCH64_LINUX_CC}, which is not on PATH; "
            f"install it with: apt-get install {AARCH64_LINUX_PACKAGE}"
        )
    return found


def _android_compiler() -> str:
    ndk = os.environ.get("ANDROID_NDK_HOME") or os.environ.get("ANDROID_NDK_ROOT")
    if not ndk:
        raise ToolchainError(
            "building for Android needs the Android NDK: download it from "
            "developer.android.com/ndk and set ANDROID_NDK_HOME to its folder"
        )
    pattern = os.path.join(
        ndk, "toolchains", "llvm", "prebuilt", "*", "bin", f"aarch64-linux-android{ANDROID_API}-clang++"
    )
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise ToolchainError(
            f"ANDROID_NDK_HOME={ndk} has no aarch64-linux-android{ANDROID_API}-clang++ "
            f"(looked for {pattern}); install NDK r23 or newer"
        )
    return matches[0]


def fcompile_for(target: Target):
    """The ``fcompile`` for ``export_library`` on this target (None: the host's compiler)."""
    from tvm.support import cc

    if target.export == "host-cc":
        if target.arch != host_arch():
            raise ToolchainError(
                f"target {target.name!r} ({target.arch}) links with the host compiler, "
                f"but this machine is {host_arch()}"
            )
        return None
    if target.export == "aarch64-linux-gnu":
        return cc.cross_compiler(_aarch64_linux_compiler(), options=["-shared", "-fPIC"])
    if target.export == "android-ndk":
        return cc.cross_compiler(
            _android_compiler(), options=["-shared", "-fPIC", "-static-libstdc++", "-lm"]
        )
    raise ToolchainError(f"target {target.name!r}: unknown export {target.export!r}")


def export_library(executable, target: Target, path: str) -> None:
    """Write ``executable`` as a shared library at ``path`` for ``target`` (its compiled parts
    written on threads of their own: ``codegen.write_library``)."""
    write_library(executable, path, fcompile_for(target))


def link_library(executable, target: Target) -> bytes:
    """The bytes of ``executable`` linked as a shared library (``lib.so``) for ``target``."""
    with tempfile.TemporaryDirectory(prefix="mbcompile-link-") as tmp:
        path = os.path.join(tmp, "lib.so")
        export_library(executable, target, path)
        return Path(path).read_bytes()
