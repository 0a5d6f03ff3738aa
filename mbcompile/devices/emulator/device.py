"""The emulated device itself: its recipe, where it is cached, and its build (mmdebstrap, pip).

The device is qemu user mode (Debian ``qemu-user-static``) running the Python of an arm64 Debian
root folder, into which the aarch64 wheels of the TVM runtime are installed::

    $MBCOMPILE_CACHE_DIR/emulator/   (else $XDG_CACHE_HOME/mbcompile/emulator/,
                                      else ~/.cache/mbcompile/emulator/)
        root/        Debian bookworm arm64 (python3 3.11, libstdc++) + TVM runtime wheels
        stamp.json   SHA-256 of RECIPE; a different recipe means a rebuild
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mbcompile.errors import EmulatorError, ToolchainError

QEMU = "qemu-aarch64-static"
TOOLS = {QEMU: "qemu-user-static", "mmdebstrap": "mmdebstrap"}  # program → Debian package

# Everything that decides the device's contents; its hash is the cache key. The RPC server
# (server.py) is not part of it: it is handed to the device's Python at each start, so changing
# it needs no rebuild.
RECIPE = {
    "debian": {
        "suite": "bookworm",  # python3 is 3.11
        "arch": "arm64",
        "variant": "extract",
        "include": ["python3", "libstdc++6", "libgcc-s1"],
    },
    "python": "3.11",
    "platform": "manylinux_2_28_aarch64",
    # What ``import tvm`` and the RPC server import at run time (tvm's requirements and its
    # "rpc"/"popen-pool" extras, less tornado, which only the tracker and proxy use).
    "wheels": [
        "apache-tvm==0.27.0.post1",
        "apache-tvm-ffi==0.1.14.post1",
        "numpy==2.4.6",
        "ml_dtypes==0.6.0",
        "typing_extensions==4.16.0",
        "cloudpickle==3.1.2",
        "psutil==7.1.3",
    ],
    # Runtime use only: the compiler library (LLVM, ~260 MB) and CUDA are never loaded.
    "prune": ["tvm/lib/libtvm_compiler.so", "tvm/lib/libtvm_runtime_cuda.so"],
}
SITE = "usr/lib/python3/dist-packages"  # on the sys.path of Debian's python3


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    """Where the device is built: ``$MBCOMPILE_CACHE_DIR/emulator``, else
    ``$XDG_CACHE_HOME/mbcompile/emulator``, else ``~/.cache/mbcompile/emulator``.

    (A relative ``XDG_CACHE_HOME`` is ignored, as the XDG base directory specification says.)
    """
    if os.environ.get("MBCOMPILE_CACHE_DIR"):
        return Path(os.environ["MBCOMPILE_CACHE_DIR"]) / "emulator"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "mbcompile" / "emulator"


def missing_tools() -> dict[str, str]:
    """Programs the emulator needs that are not on PATH, with their Debian packages."""
    return {tool: pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}


def require_tools(tools: Iterable[str] = TOOLS) -> None:
    """ToolchainError naming the missing ``tools`` and the ``apt-get install`` that adds them."""
    missing = {t: p for t, p in missing_tools().items() if t in tools}
    if missing:
        raise ToolchainError(
            f"the emulated aarch64 device needs {sorted(missing)}, not on PATH; install with: "
            f"apt-get install {' '.join(sorted(set(missing.values())))}"
        )


def run_step(cmd: list[str], what: str) -> None:
    """Run one step of the build (or of setting up the machine); EmulatorError with its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise EmulatorError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


@dataclass
class Emulator:
    """A built device: its root folder and how to start its Python."""

    directory: Path
    stamp: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def site(self) -> Path:
        return self.root / SITE

    def tvm_library(self, name: str = "libtvm_runtime_extra.so") -> Path:
        """A library of the device's TVM, e.g. for ``--load-library`` (MetaSchedule over RPC)."""
        return self.site / "tvm" / "lib" / name

    def env(self) -> dict[str, str]:
        """Environment for the emulated Python (and any aarch64 program it execs)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PYTHON", "LD_", "QEMU_", "VIRTUAL_ENV", "TVM_"))
        }
        env.update(
            QEMU_LD_PREFIX=str(self.root),  # children exec'd via binfmt find the arm64 loader
            TVM_USE_RUNTIME_LIB="1",
            PYTHONNOUSERSITE="1",
        )
        return env

    def python(self, *args: str) -> list[str]:
        """Command line running the device's Python 3.11 with ``args``."""
        qemu = shutil.which(QEMU)
        if qemu is None:
            require_tools([QEMU])
        return [qemu, "-L", str(self.root), str(self.root / "usr/bin/python3"), *args]

    def run_python(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.python(*args),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


# -- building ------------------------------------------------------------------------------------


def _read_stamp(directory: Path) -> dict:
    try:
        return json.loads((directory / "stamp.json").read_text())
    except (OSError, ValueError):
        return {}


def cached(directory: Path | None = None) -> Emulator | None:
    """The built device if it is there and its recipe is current, else None."""
    directory = directory or cache_dir()
    stamp = _read_stamp(directory)
    if stamp.get("recipe_sha256") != recipe_hash() or not (directory / "root").is_dir():
        return None
    return Emulator(directory, stamp)


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink())


def build(
    directory: Path | None = None, *, force: bool = False, log: Callable[[str], None] = print
) -> Emulator:
    """Build the device in ``directory`` (default :func:`cache_dir`), or return the cached one
    if its recipe is unchanged.

    Builds beside the cache and swaps it in, under a file lock, so that a half-built device is
    never used and concurrent builders wait for each other.
    """
    directory = directory or cache_dir()
    if not force and (done := cached(directory)) is not None:
        return done
    require_tools()
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and (done := cached(directory)) is not None:
            return done
        start = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
        try:
            _build_into(work, log)
            stamp = {
                "recipe_sha256": recipe_hash(),
                "recipe": RECIPE,
                "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "build_seconds": round(time.perf_counter() - start, 1),
                "bytes": _du(work / "root"),
            }
            (work / "stamp.json").write_text(json.dumps(stamp, indent=2))
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
                directory.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            work.rename(directory)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    log(
        f"emulated aarch64 device built in {stamp['build_seconds']:.0f} s at {directory} "
        f"({stamp['bytes'] / 1e6:.0f} MB)"
    )
    return Emulator(directory, stamp)


def _build_into(work: Path, log: Callable[[str], None]) -> None:
    deb = RECIPE["debian"]
    root = work / "root"
    log(f"mmdebstrap: Debian {deb['suite']} {deb['arch']} ({', '.join(deb['include'])})")
    run_step(
        [
            "mmdebstrap",
            f"--variant={deb['variant']}",
            f"--arch={deb['arch']}",
            f"--include={','.join(deb['include'])}",
            deb["suite"],
            str(root),
        ],
        "mmdebstrap",
    )
    log(f"pip: {', '.join(RECIPE['wheels'])} for {RECIPE['platform']}")
    site = root / SITE
    run_step(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            RECIPE["platform"],
            "--python-version",
            RECIPE["python"],
            "--target",
            str(site),
            *RECIPE["wheels"],
        ],
        "pip install of the aarch64 wheels",
    )
    for rel in RECIPE["prune"]:
        (site / rel).unlink(missing_ok=True)
    device = Emulator(work)
    log("checking the device: import the TVM runtime and its RPC server under qemu")
    # Importing also writes the .pyc files, so later starts do not recompile under emulation.
    check = device.run_python(
        "-c",
        "import platform, sys, numpy, tvm, tvm.rpc.server, tvm.exec.popen_worker, "
        "cloudpickle, psutil; "
        "print(platform.machine(), 'Python', sys.version.split()[0], 'TVM', tvm.__version__, "
        "'numpy', numpy.__version__)",
    )
    if check.returncode != 0:
        raise EmulatorError(f"the built device cannot import tvm:\n{check.stderr[-2000:]}")
    log(f"device: {check.stdout.strip()}")
