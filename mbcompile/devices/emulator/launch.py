"""Start the emulated device's TVM RPC server: in the background (:func:`start_server`, for tests
and scripts) or in the foreground (:func:`serve`, ``mbcompile emulator serve``).

The server is ``server.py``, whose source is handed to the device's Python (under qemu) on its
standard input. With ``tracker="HOST:PORT", key=KEY`` it registers with a TVM RPC tracker instead
of taking direct clients, and loads the device TVM's ``libtvm_runtime_extra.so``
(``random_fill_for_measure``, for MetaSchedule's RPC runner) unless given another
``load_library``.

Two server modes: ``stock`` is TVM's ``rpc.Server``, whose child Python needs binfmt_misc (see
``binfmt.py``); ``in-process`` is the same server loop without the child, which needs no
privileges.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mbcompile.devices.emulator.binfmt import ensure_binfmt
from mbcompile.devices.emulator.device import Emulator, build
from mbcompile.devices.emulator.server import FAILED, READY
from mbcompile.devices.rpc import DEFAULT_SERVER_PORT, parse_address, sigterm_interrupts
from mbcompile.errors import EmulatorError, RemoteError

MODES = ("auto", "stock", "in-process")
SERVER_PROGRAM = Path(__file__).with_name("server.py")  # its source runs inside the emulator


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
    if mode not in MODES:
        raise EmulatorError(f"Unknown server mode {mode!r}; known: {list(MODES)}")
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
    try:
        parse_address(tracker, "tracker")
    except RemoteError as err:
        raise EmulatorError(str(err)) from None
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
    """The device's Python reading the server program from stdin, with the server's options."""
    args = ["-", "--port", str(port), "--mode", mode]
    if load_library:
        args += ["--load-library", load_library]
    if tracker:
        args += ["--tracker", tracker, "--key", key or ""]
    return device.python(*args)


def _prepare(
    device: Emulator | None, mode: str, load_library: str | None, tracker: str | None,
    key: str | None,
) -> tuple[Emulator, str, str, str | None]:
    """(device, mode, why that mode, library to load): what both ways of starting decide."""
    check_tracker_options(tracker, key)
    device = device or build()
    if tracker is not None and load_library is None:
        load_library = str(device.tvm_library())  # for MetaSchedule's RPC runner
    mode, why = choose_mode(device, mode)
    return device, mode, why, load_library


def start_server(
    port: int = DEFAULT_SERVER_PORT,
    *,
    mode: str = "auto",
    load_library: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    device: Emulator | None = None,
    timeout: float = 300,
) -> Server:
    """Start a TVM RPC server inside the emulated device on 127.0.0.1:``port`` (building the
    device first if it is not cached).

    With ``tracker="HOST:PORT"`` and ``key`` it registers with that TVM RPC tracker (clients then
    reach it only through the tracker, by its key) and returns once the tracker lists it; it
    then loads ``load_library`` or, by default, the device TVM's ``libtvm_runtime_extra.so``
    (``random_fill_for_measure``, which MetaSchedule's RPC runner needs).

    Returns once it listens (raises EmulatorError with its log if it exits or does not listen
    within ``timeout`` seconds). The TVM server serves one client session at a time.
    """
    device, mode, _why, load_library = _prepare(device, mode, load_library, tracker, key)
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
    port: int = DEFAULT_SERVER_PORT,
    *,
    mode: str = "auto",
    load_library: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
) -> int:
    """Run the server in the foreground until interrupted (``mbcompile emulator serve``); its
    exit code, 130 after Ctrl-C or SIGTERM."""
    device, mode, why, load_library = _prepare(None, mode, load_library, tracker, key)
    print(f"emulated aarch64 device at {device.root}; {mode} TVM RPC server ({why})", flush=True)
    process = _launch(
        server_command(device, port, mode, load_library, tracker=tracker, key=key), device
    )
    try:
        with sigterm_interrupts():  # `kill` stops the server too
            return process.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        Server(process, port, mode, None).stop()  # no log file to remove (never os.devnull)


def _launch(command: list[str], device: Emulator, **streams) -> subprocess.Popen:
    """Start the server's Python and hand it server.py's source on stdin (read to EOF, then run)."""
    source = SERVER_PROGRAM.read_bytes()
    process = subprocess.Popen(
        command,
        env=device.env(),
        stdin=subprocess.PIPE,
        start_new_session=True,  # its own process group, so Server.stop() reaches its children
        **streams,
    )
    with contextlib.suppress(BrokenPipeError):
        process.stdin.write(source)
    process.stdin.close()
    return process
