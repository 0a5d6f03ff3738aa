"""An emulated Linux aarch64 device, built by the project itself, to run aarch64 artifacts on x86.

The device is qemu user mode (Debian ``qemu-user-static``) running the Python of an arm64 Debian
root folder, into which the aarch64 wheels of the TVM runtime are installed::

    .cache/emulator/
        root/                  Debian bookworm arm64 (python3 3.11, libstdc++) + TVM runtime wheels
        stamp.json             SHA-256 of RECIPE; a different recipe means a rebuild

``build()`` makes it (mmdebstrap, pip), ``start_server()`` runs a TVM RPC server inside it on
127.0.0.1, and ``mbcompile.load(path, remote="127.0.0.1:PORT")`` runs an artifact there. With
``tracker="HOST:PORT", key=KEY`` the server registers with a TVM RPC tracker instead
(``mbcompile emulator tracker`` starts one), which is how MetaSchedule's RPC runner
(``mbcompile tune --tracker HOST:PORT --key KEY``) and ``mbcompile run --tracker`` reach it;
a server registered with a tracker loads the device TVM's ``libtvm_runtime_extra.so``
(``random_fill_for_measure``, for MetaSchedule) unless given another ``load_library``.

TVM's stock RPC server (``rpc.Server``) starts a child Python: exec'ing an aarch64 binary needs
the kernel's binfmt_misc to hand it to qemu, which ``ensure_binfmt()`` registers (root only,
idempotently). Without it the server runs in process (mode ``"in-process"``): the same TVM server
loop without the extra Python, which needs no privileges.

The server's source (``SERVER_SOURCE``) is fed to the device's Python on its standard input at
start (``python3 - --port ...``), so changing it needs no rebuild of the device.
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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MbcompileError, ToolchainError


class EmulatorError(MbcompileError, RuntimeError):
    """The emulated device cannot be built or its RPC server does not start."""


QEMU = "qemu-aarch64-static"
TOOLS = {QEMU: "qemu-user-static", "mmdebstrap": "mmdebstrap"}  # program → Debian package

# Runs inside the emulator (Python 3.11, TVM runtime only), read from stdin (``python3 - ...``).
# Prints READY once it listens (and, with --tracker, once the tracker lists it under its key).
READY = "mbcompile-rpc: listening on"
FAILED = "mbcompile-rpc: failed:"
REGISTER_TIMEOUT = 120  # seconds for the server to appear in the tracker's list, under qemu
SERVER_SOURCE = '''\
"""TVM RPC server of mbcompile's emulated aarch64 device (runs inside the emulator)."""
import argparse
import logging
import os
import platform
import socket
import time

from tvm import rpc
from tvm.rpc import server as rpc_server

parser = argparse.ArgumentParser(prog="mbcompile-rpc")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--mode", choices=["stock", "in-process"], default="stock")
parser.add_argument("--load-library", default=None)
parser.add_argument("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker")
parser.add_argument("--key", default="", help="the device key to register with the tracker")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO)


def fail(message):  # os._exit: a non-daemon server thread may already be running
    print(f"FAILED {message}", flush=True)
    os._exit(1)


tracker = None
if args.tracker:
    host, _, port = args.tracker.rpartition(":")
    tracker = (host.strip("[]"), int(port))
    try:  # TVM's server would retry for a minute, then die in a thread and hang
        socket.create_connection(tracker, timeout=10).close()
    except OSError as err:
        fail(f"cannot reach the tracker at {args.tracker}: {err}")
options = dict(tracker_addr=tracker, key=args.key, load_library=args.load_library)
if args.mode == "stock":  # tvm.exec.rpc_server: the server runs in a child Python
    server = rpc.Server("127.0.0.1", args.port, args.port + 1, **options)
    wait = server.proc.join
    port = server.port
else:  # the same listening loop, in this process
    port = rpc_server._popen_start_rpc_server("127.0.0.1", args.port, args.port + 1, **options)
    wait = rpc_server.PopenRPCServerState.current.thread.join
registered = ""
if tracker:  # TVM registers from its listening thread: wait until the tracker lists us
    deadline = time.monotonic() + REGISTER_TIMEOUT
    session = rpc.connect_tracker(*tracker)
    while not any(
        info.get("key") == "server:" + args.key and list(info.get("addr", []))[1:] == [port]
        for info in session.summary()["server_info"]
    ):
        if time.monotonic() > deadline:
            fail(f"not listed by the tracker at {args.tracker} after {REGISTER_TIMEOUT} s")
        time.sleep(0.5)
    session.close()
    registered = f", registered with the tracker at {args.tracker} as {args.key!r}"
print(f"READY 127.0.0.1:{port} ({platform.machine()}, {args.mode} server{registered})", flush=True)
wait()
'''.replace("READY", READY).replace("FAILED", FAILED).replace(
    "REGISTER_TIMEOUT", str(REGISTER_TIMEOUT)
)

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
    tracker: str | None = None  # "HOST:PORT" of the tracker it registered with
    key: str | None = None  # the device key it registered under

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

    def __enter__(self):  # -> Server
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


def check_tracker_options(tracker: str | None, key: str | None) -> None:
    """A tracker needs a key and a key needs a tracker; the address is ``HOST:PORT``."""
    if tracker is None and key is None:
        return
    if tracker is None:
        raise EmulatorError(
            f"device key {key!r} given without a tracker: add tracker='HOST:PORT' (--tracker)"
        )
    host, sep, port = str(tracker).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EmulatorError(
            f"bad tracker address {tracker!r}: expected HOST:PORT, e.g. '127.0.0.1:9190'"
        )
    if not key:
        raise EmulatorError(
            f"tracker {tracker!r} given without a device key: add key=KEY (--key), the name "
            f"clients request the device by (e.g. 'emulated-aarch64')"
        )


def server_command(
    device: Emulator,
    port: int,
    mode: str,
    load_library: str | None = None,
    *,
    tracker: str | None = None,
    key: str | None = None,
) -> list[str]:
    args = ["-", "--port", str(port), "--mode", mode]  # the source comes on stdin
    if load_library:
        args += ["--load-library", load_library]
    if tracker:
        args += ["--tracker", tracker, "--key", key or ""]
    return device.python(*args)


def start_server(
    port: int = 9090,
    *,
    mode: str = "auto",
    load_library: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    device: Emulator | None = None,
    timeout: float = 300,
) -> Server:
    """Start a TVM RPC server inside the emulated device on 127.0.0.1:``port``.

    With ``tracker="HOST:PORT"`` and ``key`` it registers with that TVM RPC tracker (clients then
    reach it only through the tracker, by its key) and returns once the tracker lists it; it
    then loads ``load_library`` or, by default, the device TVM's ``libtvm_runtime_extra.so``
    (``random_fill_for_measure``, which MetaSchedule's RPC runner needs).

    Returns once it listens (raises EmulatorError with its log if it exits or does not listen
    within ``timeout`` seconds). The TVM server serves one client session at a time.
    """
    check_tracker_options(tracker, key)
    device = device or build()
    if tracker is not None and load_library is None:
        load_library = str(device.tvm_library())  # for MetaSchedule's RPC runner
    mode, _why = choose_mode(device, mode)
    fd, name = tempfile.mkstemp(prefix="mbcompile-rpc-", suffix=".log")
    log_path = Path(name)
    with os.fdopen(fd, "wb") as log_file:
        process = _launch(
            server_command(device, port, mode, load_library, tracker=tracker, key=key),
            device,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, port, mode, log_path, tracker, key)
    deadline = time.monotonic() + timeout
    while READY not in server.log():
        if FAILED in server.log() or process.poll() is not None or time.monotonic() > deadline:
            state = "exited" if process.returncode is not None else f"no answer in {timeout:.0f} s"
            log = server.log()
            why = log[log.index(FAILED) :].splitlines()[0] if FAILED in log else state
            server.stop()
            raise EmulatorError(
                f"the emulated device's RPC server on 127.0.0.1:{port} did not start ({why}):\n"
                f"{log[-2000:]}"
            )
        time.sleep(0.2)
    return server


def serve(
    port: int = 9090,
    *,
    mode: str = "auto",
    load_library: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
) -> int:
    """Run the server in the foreground until interrupted (``mbcompile emulator serve``)."""
    check_tracker_options(tracker, key)
    device = build()
    if tracker is not None and load_library is None:
        load_library = str(device.tvm_library())  # for MetaSchedule's RPC runner
    mode, why = choose_mode(device, mode)
    print(f"emulated aarch64 device at {device.root}; {mode} TVM RPC server ({why})", flush=True)
    process = _launch(
        server_command(device, port, mode, load_library, tracker=tracker, key=key), device
    )
    on_term = None
    if threading.current_thread() is threading.main_thread():  # `kill` stops the server too
        on_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
        Server(process, port, mode, None).stop()  # no log file to remove (never os.devnull)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _launch(command: list[str], device: Emulator, **streams) -> subprocess.Popen:
    """Start the server's Python and hand it SERVER_SOURCE on stdin (read to EOF, then run)."""
    process = subprocess.Popen(
        command,
        env=device.env(),
        stdin=subprocess.PIPE,
        start_new_session=True,  # its own process group, so Server.stop() reaches its children
        **streams,
    )
    with contextlib.suppress(BrokenPipeError):
        process.stdin.write(SERVER_SOURCE.encode())
    process.stdin.close()
    return process
