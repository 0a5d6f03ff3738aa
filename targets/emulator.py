"""An emulated Linux aarch64 device, built by the project itself, to run aarch64 artifacts on x86.

The device is qemu user mode (Debian ``qemu-user-static``) running the Python of an arm64 Debian
root folder, into which the aarch64 wheels of the TVM runtime are installed::

    .cache/emulator/
        root/                  Debian bookworm arm64 (python3 3.11, libstdc++) + TVM runtime wheels
        stamp.json             SHA-256 of RECIPE; a different recipe means a rebuild

``build()`` makes it (mmdebstrap, pip), ``start_server()`` runs a TVM RPC server inside it on
127.0.0.1, and ``mbcompile.load(path, remote="127.0.0.1:PORT")`` runs an artifact there.

TVM's stock RPC server (``rpc.Server``) starts a child Python: exec'ing an aarch64 binary needs
the kernel's binfmt_misc to hand it to qemu, which ``ensure_binfmt()`` registers (root only,
idempotently). Without it the server runs in process (mode ``"in-process"``): the same TVM server
loop without the extra Python, which needs no privileges.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MbcompileError, ToolchainError


class EmulatorError(MbcompileError, RuntimeError):
    """The emulated device cannot be built or its RPC server does not start."""


QEMU = "qemu-aarch64-static"
TOOLS = {QEMU: "qemu-user-static", "mmdebstrap": "mmdebstrap"}  # program → Debian package

# Runs inside the emulator (Python 3.11, TVM runtime only). Prints READY once it listens.
READY = "mbcompile-rpc: listening on"
SERVER_MODULE = "mbcompile_rpc_server"
SERVER_SOURCE = '''\
"""TVM RPC server of mbcompile's emulated aarch64 device (runs inside the emulator)."""
import argparse
import logging
import platform

from tvm import rpc
from tvm.rpc import server as rpc_server

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--mode", choices=["stock", "in-process"], default="stock")
parser.add_argument("--load-library", default=None)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO)
if args.mode == "stock":  # tvm.exec.rpc_server: the server runs in a child Python
    server = rpc.Server("127.0.0.1", args.port, args.port + 1, load_library=args.load_library)
    wait = server.proc.join
    port = server.port
else:  # the same listening loop, in this process
    port = rpc_server._popen_start_rpc_server(
        "127.0.0.1", args.port, args.port + 1, load_library=args.load_library
    )
    wait = rpc_server.PopenRPCServerState.current.thread.join
print(f"READY 127.0.0.1:{port} ({platform.machine()}, {args.mode} server)", flush=True)
wait()
'''.replace("READY", READY)

# Everything that decides the device's contents; its hash is the cache key.
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
    "server": hashlib.sha256(SERVER_SOURCE.encode()).hexdigest(),
}
SITE = "usr/lib/python3/dist-packages"  # on the sys.path of Debian's python3


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    """``$MBCOMPILE_EMULATOR_DIR``, else ``.cache/emulator`` of the source checkout, else
    ``~/.cache/mbcompile/emulator``."""
    if os.environ.get("MBCOMPILE_EMULATOR_DIR"):
        return Path(os.environ["MBCOMPILE_EMULATOR_DIR"])
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return checkout / ".cache" / "emulator"
    return Path.home() / ".cache" / "mbcompile" / "emulator"


def missing_tools() -> dict[str, str]:
    """Programs the emulator needs that are not on PATH, with their Debian packages."""
    return {tool: pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}


def _require_tools(tools=TOOLS) -> None:
    missing = {t: p for t, p in missing_tools().items() if t in tools}
    if missing:
        raise ToolchainError(
            f"the emulated aarch64 device needs {sorted(missing)}, not on PATH; install with: "
            f"apt-get install {' '.join(sorted(set(missing.values())))}"
        )


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
            _require_tools([QEMU])
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


def _run(cmd: list[str], what: str, **kwargs) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise EmulatorError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink())


def build(directory: Path | None = None, *, force: bool = False, log=print) -> Emulator:
    """Build the device (or return the cached one if its recipe is unchanged).

    Builds beside the cache and swaps it in, under a file lock, so that a half-built device is
    never used and concurrent builders wait for each other.
    """
    directory = directory or cache_dir()
    if not force and (done := cached(directory)) is not None:
        return done
    _require_tools()
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


def _build_into(work: Path, log) -> None:
    deb = RECIPE["debian"]
    root = work / "root"
    log(f"mmdebstrap: Debian {deb['suite']} {deb['arch']} ({', '.join(deb['include'])})")
    _run(
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
    _run(
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
    (site / f"{SERVER_MODULE}.py").write_text(SERVER_SOURCE)
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


# -- binfmt_misc ---------------------------------------------------------------------------------

BINFMT = Path("/proc/sys/fs/binfmt_misc")
# ELF 64-bit little-endian, e_machine 0xb7 (AArch64): as Debian's qemu-user-static registers it.
_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"


def binfmt_problem(device: Emulator) -> str | None:
    """None if this kernel execs the device's aarch64 binaries (through qemu), else why not."""
    try:
        proc = subprocess.run(
            [str(device.root / "usr/bin/python3"), "-c", "pass"],
            env=device.env(),
            capture_output=True,
            timeout=120,
            check=False,
        )
    except OSError as err:
        return f"this kernel cannot exec aarch64 programs (binfmt_misc has no qemu-aarch64: {err})"
    except subprocess.TimeoutExpired:
        return "an aarch64 program exec'd through binfmt_misc did not finish within 120 s"
    if proc.returncode != 0:
        return f"aarch64 python exec'd through binfmt_misc failed: {proc.stderr.decode()[-500:]}"
    return None


def ensure_binfmt(device: Emulator) -> str | None:
    """Make the kernel hand aarch64 programs to qemu; None on success, else why it cannot.

    Idempotent: mounts binfmt_misc if needed, enables an existing ``qemu-aarch64`` entry or
    registers one (flag F: the kernel opens qemu now, so it works in any mount namespace).
    Changes the whole machine's kernel state, so only as root.
    """
    if binfmt_problem(device) is None:
        return None
    if os.geteuid() != 0:
        return "registering qemu-aarch64 with binfmt_misc needs root"
    qemu = shutil.which(QEMU)
    if qemu is None:
        return f"{QEMU} is not on PATH (apt-get install {TOOLS[QEMU]})"
    try:
        if not (BINFMT / "register").exists():
            _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], "mounting binfmt_misc")
        entry = BINFMT / "qemu-aarch64"
        if entry.exists():
            entry.write_text("1")
        else:
            (BINFMT / "register").write_text(f":qemu-aarch64:M::{_MAGIC}:{_MASK}:{qemu}:F")
    except (OSError, EmulatorError) as err:
        return f"cannot register qemu-aarch64 with binfmt_misc: {err}"
    return binfmt_problem(device)


# -- the RPC server ------------------------------------------------------------------------------


@dataclass
class Server:
    """A TVM RPC server running inside the emulated device (a context manager: stops on exit)."""

    process: subprocess.Popen
    port: int
    mode: str
    log_path: Path | None  # the server's log file, removed on stop (None: no log file)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server and its children (they share the process group we started)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def choose_mode(device: Emulator, mode: str = "auto") -> tuple[str, str]:
    """The server mode to use and why: ``stock`` if binfmt_misc works (or can be made to)."""
    if mode not in ("auto", "stock", "in-process"):
        raise EmulatorError(f"Unknown server mode {mode!r}; known: ['auto', 'stock', 'in-process']")
    if mode == "in-process":
        return mode, "requested"
    problem = ensure_binfmt(device)
    if problem is None:
        return "stock", "binfmt_misc runs aarch64 children"
    if mode == "stock":
        raise EmulatorError(f"TVM's stock RPC server needs binfmt_misc: {problem}")
    return "in-process", problem


def server_command(
    device: Emulator, port: int, mode: str, load_library: str | None = None
) -> list[str]:
    args = ["-m", SERVER_MODULE, "--port", str(port), "--mode", mode]
    if load_library:
        args += ["--load-library", load_library]
    return device.python(*args)


def start_server(
    port: int = 9090,
    *,
    mode: str = "auto",
    load_library: str | None = None,
    device: Emulator | None = None,
    timeout: float = 300,
) -> Server:
    """Start a TVM RPC server inside the emulated device on 127.0.0.1:``port``.

    Returns once it listens (raises EmulatorError with its log if it exits or does not listen
    within ``timeout`` seconds). The TVM server serves one client session at a time.
    """
    device = device or build()
    mode, _why = choose_mode(device, mode)
    fd, name = tempfile.mkstemp(prefix="mbcompile-rpc-", suffix=".log")
    log_path = Path(name)
    with os.fdopen(fd, "wb") as log_file:
        process = subprocess.Popen(
            server_command(device, port, mode, load_library),
            env=device.env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches its children
        )
    server = Server(process, port, mode, log_path)
    deadline = time.monotonic() + timeout
    while READY not in server.log():
        if process.poll() is not None or time.monotonic() > deadline:
            state = "exited" if process.returncode is not None else f"no answer in {timeout:.0f} s"
            log = server.log()[-2000:]
            server.stop()
            raise EmulatorError(
                f"the emulated device's RPC server on 127.0.0.1:{port} did not start ({state}):\n"
                f"{log}"
            )
        time.sleep(0.2)
    return server


def serve(port: int = 9090, *, mode: str = "auto", load_library: str | None = None) -> int:
    """Run the server in the foreground until interrupted (``mbcompile emulator serve``)."""
    device = build()
    mode, why = choose_mode(device, mode)
    print(f"emulated aarch64 device at {device.root}; {mode} TVM RPC server ({why})", flush=True)
    process = subprocess.Popen(
        server_command(device, port, mode, load_library),
        env=device.env(),
        start_new_session=True,
    )
    try:
        return process.wait()
    except KeyboardInterrupt:
        Server(process, port, mode, None).stop()  # no log file to remove (never os.devnull)
        return 130
