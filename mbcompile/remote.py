"""Run a compiled library on another device over TVM RPC: upload, load, run, time.

A device is reached in one of two ways:

- directly, ``remote="HOST:PORT"``: its TVM RPC server (``python -m tvm.exec.rpc_server``, TVM's
  Android RPC app, or ``mbcompile emulator serve`` for the emulated aarch64 device);
- through a TVM RPC tracker, ``tracker="HOST:PORT", key="KEY"``: the tracker hands out a free
  device among those registered under KEY (a pool of boards or phones; MetaSchedule's RPC runner,
  ``mbcompile tune --tracker``, measures the same way). :func:`start_tracker`
  (``mbcompile emulator tracker``) or ``python -m tvm.exec.rpc_tracker`` start one; servers
  register with ``--tracker HOST:PORT --key KEY``.

``mbcompile.load(path, remote=...)`` (and :func:`load_remote`, which also takes ``tracker`` and
``key``) wraps a :class:`RemoteProgram` in the same ``CompiledModel`` as a local run, so inputs,
outputs and checks are the same.

Over RPC a Relax function that returns a tuple cannot be indexed on the client, so the program
drives the VM statefully: ``set_input``, ``invoke_stateful``, ``get_outputs``.

Every wait is bounded: TVM's own ``rpc.connect`` blocks forever on a peer that accepts but never
answers, and its ``TrackerSession.request`` blocks until a device with the key is free (forever if
none is registered), so here each step has a timeout and a :class:`RemoteError` saying which.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import MbcompileError, ToolchainError

CONNECT_TIMEOUT = 30.0  # seconds, for the TCP connection and for the RPC handshake
REQUEST_TIMEOUT = 60.0  # seconds to wait for a free device from a tracker
DEFAULT_TRACKER_PORT = 9190


class RemoteError(MbcompileError, ConnectionError):
    """A remote device cannot be reached, does not speak TVM RPC, or cannot run the library."""


def parse_address(address: str, what: str = "remote") -> tuple[str, int]:
    """``"HOST:PORT"`` → (host, port); RemoteError names the bad address."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        example = f"127.0.0.1:{DEFAULT_TRACKER_PORT if what == 'tracker' else 9090}"
        raise RemoteError(
            f"bad {what} address {address!r}: expected HOST:PORT with a port in 1..65535, "
            f"e.g. '{example}'"
        )
    return host.strip("[]"), int(port)


def check_device_options(
    remote: str | None = None, tracker: str | None = None, key: str | None = None
) -> None:
    """One way to name a device: ``remote``, or ``tracker`` with ``key``; RemoteError says why not."""
    if remote is not None and (tracker is not None or key is not None):
        raise RemoteError(
            f"give remote='HOST:PORT' (a server) or tracker='HOST:PORT' with key='KEY', not both "
            f"(got remote={remote!r}, tracker={tracker!r}, key={key!r})"
        )
    if tracker is not None and not key:
        raise RemoteError(
            f"tracker {tracker!r} given without a device key: add key='KEY' (--key), the key the "
            f"device registered with (`python -m tvm.exec.query_rpc_tracker` lists them)"
        )
    if key is not None and tracker is None:
        raise RemoteError(
            f"device key {key!r} given without a tracker: add tracker='HOST:PORT' (--tracker)"
        )
    if remote is None and tracker is None:
        raise RemoteError("no device named: give remote='HOST:PORT', or tracker='HOST:PORT' and key")
    if tracker is not None:
        parse_address(tracker, "tracker")
    else:
        parse_address(remote)


def _bounded(fn, timeout: float, name: str) -> tuple[bool, Any]:
    """Run ``fn()`` in a helper thread for at most ``timeout`` s: (finished, result or exception).

    For TVM calls that cannot be given a timeout (its C++ handshake); a thread still blocked
    after ``timeout`` is a daemon and is left behind.
    """
    result: dict = {}

    def _call():
        try:
            result["value"] = fn()
        except Exception as err:  # noqa: BLE001 - handed to the caller
            result["value"] = err

    thread = threading.Thread(target=_call, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), result.get("value")


def _handshake(host: str, port: int, match_key: str, session_timeout: float, timeout: float,
               where: str):
    """The TVM RPC handshake with a server (``match_key`` from a tracker, else "")."""
    from tvm import rpc

    done, value = _bounded(
        lambda: rpc.connect(host, port, match_key, session_timeout), timeout, f"rpc-connect-{where}"
    )
    if not done:
        raise RemoteError(
            f"{where} accepted the connection but did not complete the TVM RPC handshake within "
            f"{timeout:.0f} s: not a TVM RPC server, or it is serving another client (a TVM RPC "
            f"server serves one session at a time)"
        )
    if isinstance(value, Exception):
        raise RemoteError(f"TVM RPC handshake with {where} failed: {value}")
    return value


def connect(address: str, timeout: float = CONNECT_TIMEOUT):
    """An RPC session with the server at ``address``, or RemoteError within about ``timeout`` s.

    TVM's own connect blocks forever on a peer that accepts but never answers (not a TVM server,
    or a server busy with another client's session), so the handshake runs in a helper thread.
    """
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise RemoteError(
            f"cannot reach remote {address!r}: {err}; is a TVM RPC server running there "
            f"(e.g. `mbcompile emulator serve --port {port}`)?"
        ) from None
    return _handshake(host, port, "", 0, timeout, f"remote {address!r}")


# -- trackers ------------------------------------------------------------------------------------


class _TrackerClient:
    """The client side of TVM's tracker protocol (``tvm.rpc.base``) with a timeout on each step.

    (``tvm.rpc.TrackerSession.request`` waits for a free device forever and retries on socket
    errors, so it cannot be bounded from outside.)
    """

    def __init__(self, address: str, timeout: float):
        from tvm.rpc import base

        self.address = address
        self._base = base
        host, port = parse_address(address, "tracker")
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as err:
            raise RemoteError(
                f"cannot reach tracker {address!r}: {err}; is a TVM RPC tracker running there "
                f"(e.g. `mbcompile emulator tracker --port {port}`)?"
            ) from None
        try:
            self._sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(self._sock, 4))[0]
        except OSError as err:
            self.close()
            raise RemoteError(
                f"{address!r} accepted the connection but did not answer as a TVM RPC tracker "
                f"within {timeout:.0f} s ({err or type(err).__name__})"
            ) from None
        if magic != base.RPC_TRACKER_MAGIC:
            self.close()
            raise RemoteError(f"{address!r} is not a TVM RPC tracker (wrong handshake)")

    def call(self, message: list, timeout: float | None):
        """Send one request and wait at most ``timeout`` s (None: forever) for the answer."""
        self._sock.settimeout(timeout)
        self._base.sendjson(self._sock, message)
        return self._base.recvjson(self._sock)

    def devices(self, timeout: float) -> dict[str, dict]:
        """{key: {"registered": n, "free": n, "pending": n}} for every key with a device."""
        code = self._base.TrackerCode
        try:
            answer = self.call([code.SUMMARY], timeout)
        except OSError as err:
            raise RemoteError(
                f"tracker {self.address!r} did not send its device list within {timeout:.0f} s "
                f"({err or type(err).__name__})"
            ) from None
        if not (isinstance(answer, list) and answer and answer[0] == code.SUCCESS):
            raise RemoteError(f"tracker {self.address!r} answered {answer!r} to a summary request")
        summary = answer[1]
        devices: dict[str, dict] = {}
        for info in summary.get("server_info", []):
            role, _, key = str(info.get("key", "")).partition(":")
            if role == "server":
                devices.setdefault(key, {"registered": 0, "free": 0, "pending": 0})
                devices[key]["registered"] += 1
        for key, queue in summary.get("queue_info", {}).items():
            if key in devices:
                devices[key].update(free=queue.get("free", 0), pending=queue.get("pending", 0))
        return devices

    def request(self, key: str, timeout: float, priority: int = 1) -> tuple[str, int, str]:
        """(host, port, match key) of a free device; ``socket.timeout`` if none within timeout."""
        code = self._base.TrackerCode
        answer = self.call([code.REQUEST, key, "", priority], timeout)
        if not (isinstance(answer, list) and answer and answer[0] == code.SUCCESS):
            raise RemoteError(f"tracker {self.address!r} answered {answer!r} to a request for {key!r}")
        host, port, match_key = answer[1]
        return str(host), int(port), str(match_key)

    def close(self) -> None:
        """Close the connection (the tracker then drops this client's pending requests)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def tracker_devices(tracker: str, timeout: float = CONNECT_TIMEOUT) -> dict[str, dict]:
    """The devices registered with a tracker, by key: ``{"registered", "free", "pending"}`` counts."""
    client = _TrackerClient(tracker, timeout)
    try:
        return client.devices(timeout)
    finally:
        client.close()


def request_device(tracker: str, key: str, timeout: float, session_timeout: float):
    """(session, "HOST:PORT" of the device) for a free device registered under ``key``."""
    check_device_options(tracker=tracker, key=key)
    client = _TrackerClient(tracker, min(timeout, CONNECT_TIMEOUT))
    try:
        devices = client.devices(min(timeout, CONNECT_TIMEOUT))
        if key not in devices:
            known = sorted(devices) or "none"
            raise RemoteError(
                f"no device is registered with tracker {tracker!r} under key {key!r} (registered "
                f"keys: {known}); register one, e.g. `mbcompile emulator serve --tracker {tracker} "
                f"--key {key}` or TVM's `rpc_server --tracker {tracker} --key {key}`"
            )
        try:
            host, port, match_key = client.request(key, timeout)
        except TimeoutError:
            n = devices[key]["registered"]
            raise RemoteError(
                f"no device registered with tracker {tracker!r} under key {key!r} became free "
                f"within {timeout:.0f} s ({n} registered; each serves one session at a time)"
            ) from None
        except OSError as err:
            raise RemoteError(f"tracker {tracker!r} dropped the request for {key!r}: {err}") from None
    finally:
        client.close()
    where = f"device {key!r} at {host}:{port} (from tracker {tracker!r})"
    session = _handshake(host, port, match_key, session_timeout, min(timeout, CONNECT_TIMEOUT),
                         where)
    return session, f"{host}:{port}"


def connect_tracker(
    tracker: str, key: str, timeout: float = REQUEST_TIMEOUT, session_timeout: float = 0
):
    """An RPC session with a free device registered with ``tracker`` under ``key``.

    Raises RemoteError at once if the tracker cannot be reached or lists no device under ``key``,
    and after about ``timeout`` s if none of those devices becomes free. ``session_timeout`` (s,
    0: none) lets the device end a session that runs longer.
    """
    return request_device(tracker, key, timeout, session_timeout)[0]


@dataclass
class Tracker:
    """A TVM RPC tracker on this machine (``tvm.rpc.tracker`` in a child process); stop() ends it."""

    host: str
    port: int
    _tracker: Any = field(repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def devices(self, timeout: float = CONNECT_TIMEOUT) -> dict[str, dict]:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return tracker_devices(f"{host}:{self.port}", timeout)

    def wait(self) -> None:
        """Block until the tracker's process ends."""
        if self._tracker is not None:
            self._tracker.proc.join()

    def stop(self) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            try:
                tracker.terminate()  # asks it to stop over its socket, then ends its process
            except (OSError, AssertionError):  # its process is already gone (Ctrl-C reached it)
                tracker.proc.kill()

    def __enter__(self):  # -> Tracker
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_tracker(port: int = DEFAULT_TRACKER_PORT, host: str = "127.0.0.1") -> Tracker:
    """Start a TVM RPC tracker listening on ``host:port`` (TVM's, which needs tornado)."""
    try:
        from tvm.rpc.tracker import Tracker as TVMTracker
    except ImportError as err:
        raise ToolchainError(
            f"TVM's RPC tracker needs the tornado package ({err}); install it with: "
            f"pip install tornado"
        ) from None
    if not 0 < int(port) < 65536:
        raise RemoteError(f"bad tracker port {port!r}: expected 1..65535, e.g. 9190")
    # TVM's Tracker fails in its child process with a traceback and leaves a half-made object
    # behind, so a taken port is reported here first.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise RemoteError(f"cannot start a TVM RPC tracker on {host}:{port}: {err}") from None
    try:
        tracker = TVMTracker(host, port=port, port_end=port + 1, silent=True)
    except Exception as err:  # noqa: BLE001 - raised in the tracker's process
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise RemoteError(f"cannot start a TVM RPC tracker on {host}:{port}: {last}") from None
    return Tracker(host, tracker.port, tracker)


def serve_tracker(port: int = DEFAULT_TRACKER_PORT, host: str = "127.0.0.1") -> int:
    """Run a tracker in the foreground until interrupted (``mbcompile emulator tracker``)."""
    on_term = None
    if threading.current_thread() is threading.main_thread():  # `kill` stops the tracker too
        on_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with start_tracker(port, host) as tracker:
            print(
                f"TVM RPC tracker on {tracker.address}; register the emulated device with "
                f"`mbcompile emulator serve --tracker {tracker.address} --key KEY`, then "
                f"`mbcompile tune --tracker {tracker.address} --key KEY ...` or "
                f"`mbcompile run MODEL.mbc --tracker {tracker.address} --key KEY`",
                flush=True,
            )
            tracker.wait()
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# -- running a compiled library remotely ---------------------------------------------------------


def _outputs(arity, get, *index: int) -> list:
    """The leaves of ``main``'s (possibly nested tuple) result, in order.

    (VirtualMachine.get_outputs does the same with a self-referencing closure, a reference
    cycle that keeps the VM, and so the RPC session, alive until the next garbage collection.)
    """
    n = arity("main", *index)
    if n == -1:
        return [get("main", *index)]
    return [leaf for i in range(n) for leaf in _outputs(arity, get, *index, i)]


class RemoteProgram:
    """The compiled ``main`` running on a remote device's CPU, driven over TVM RPC.

    The device is the server at ``address`` ("HOST:PORT"), or a free device registered with
    ``tracker`` ("HOST:PORT") under ``key``. Uploads ``lib`` (the artifact's shared library,
    built for the device's CPU) once and keeps the session open until :meth:`close` (or garbage
    collection). ``timeout``: for connecting (default 30 s), or through a tracker for a device to
    become free (default 60 s).
    """

    def __init__(
        self,
        lib: bytes,
        address: str | None = None,
        *,
        tracker: str | None = None,
        key: str | None = None,
        target: dict | None = None,
        timeout: float | None = None,
    ):
        import tvm

        check_device_options(address, tracker, key)
        self.tracker, self.key = tracker, key
        if tracker is None:
            self.address = address
            self._where = f"the device at {address!r}"
            self._session = connect(address, CONNECT_TIMEOUT if timeout is None else timeout)
        else:
            timeout = REQUEST_TIMEOUT if timeout is None else timeout
            self._session, self.address = request_device(tracker, key, timeout, 0)
            self._where = f"the device {key!r} at {self.address} (from tracker {tracker!r})"
        name = f"mbcompile-{hashlib.sha256(lib).hexdigest()[:16]}.so"
        what = f"target {target['name']!r} ({target['arch']})" if target else "its target"
        try:
            self._session.upload(bytearray(lib), target=name)
            module = self._session.load_module(name)
            self._dev = self._session.cpu()
            self._vm = tvm.relax.VirtualMachine(module, self._dev)
        except (RuntimeError, OSError, ValueError) as err:  # TVM's errors, raised over RPC
            self.close()
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise RemoteError(
                f"{self._where} cannot load the library compiled for {what}: "
                f"{last}; compile for the device's CPU (e.g. target='aarch64' for Linux arm64 "
                f"boards and the emulator, 'android-arm64' for phones)"
            ) from None

    @property
    def where(self) -> str:
        """The device, as error messages and the CLI name it."""
        if self.tracker is None:
            return self.address
        return f"{self.address} (key {self.key!r} from tracker {self.tracker})"

    def _set_input(self, arrays: list[np.ndarray]) -> None:
        import tvm

        if self._vm is None:
            raise RemoteError(f"the session with {self.where} is closed")
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), self._dev) for a in arrays]
        self._vm.set_input("main", *tensors)

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Static-shape int64 inputs in; the outputs of ``main``, in order, as numpy arrays."""
        self._set_input(arrays)
        self._vm.invoke_stateful("main")
        module = self._vm.module
        leaves = _outputs(module["get_output_arity"], module["get_output"])
        return [t.numpy() for t in leaves]

    def time(self, arrays: list[np.ndarray], *, number: int = 1, repeat: int = 3) -> list[float]:
        """Seconds per call of ``main`` on the device (TVM's time_evaluator), one per repeat.

        Each repeat averages ``number`` calls, timed on the device, so network and upload
        time are excluded.
        """
        self._set_input(arrays)
        timer = self._vm.time_evaluator("invoke_stateful", self._dev, number=number, repeat=repeat)
        return [float(r) for r in timer("main").results]

    def close(self) -> None:
        """End the session (the server then serves its next client)."""
        self._vm = None
        self._dev = None
        self._session = None

    def __enter__(self):  # -> RemoteProgram
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._vm is None else "open"
        return f"RemoteProgram({self.where!r}, {state})"


def load_remote(
    path,
    remote: str | None = None,
    *,
    tracker: str | None = None,
    key: str | None = None,
    timeout: float | None = None,
):
    """A saved artifact, to run on a remote device: the server at ``remote`` ("HOST:PORT"), or a
    device registered with ``tracker`` ("HOST:PORT") under ``key``.

    The same ``CompiledModel`` (inputs, outputs, checks) as ``mbcompile.load(path)``; only where
    ``main`` runs differs. Bad or missing device options raise RemoteError before any connection.
    """
    from .runtime import CompiledModel, load

    check_device_options(remote, tracker, key)
    local = load(path)  # reads and checks the artifact; nothing runs here
    program = RemoteProgram(
        local._library.to_bytes(), remote, tracker=tracker, key=key,
        target=local.metadata.get("target"), timeout=timeout,
    )
    return CompiledModel(local.signature, local.metadata, local._library, program=program,
                         tokenizer_files=local.tokenizer_files)
