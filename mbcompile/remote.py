"""Run a compiled library on another device over TVM RPC: upload, load, run, time.

``mbcompile.load(path, remote="HOST:PORT")`` wraps a :class:`RemoteProgram` in the same
``CompiledModel`` as a local run, so inputs, outputs and checks are the same. The device runs a
TVM RPC server (``python -m tvm.exec.rpc_server``, TVM's Android RPC app, or
``mbcompile emulator serve`` for the emulated aarch64 device).

Over RPC a Relax function that returns a tuple cannot be indexed on the client, so the program
drives the VM statefully: ``set_input``, ``invoke_stateful``, ``get_outputs``.
"""

from __future__ import annotations

import hashlib
import socket
import threading

import numpy as np

from .errors import MbcompileError

CONNECT_TIMEOUT = 30.0  # seconds, for the TCP connection and for the RPC handshake


class RemoteError(MbcompileError, ConnectionError):
    """A remote device cannot be reached, does not speak TVM RPC, or cannot run the library."""


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` → (host, port); RemoteError names the bad address."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RemoteError(
            f"bad remote address {address!r}: expected HOST:PORT with a port in 1..65535, "
            f"e.g. '127.0.0.1:9090'"
        )
    return host.strip("[]"), int(port)


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

    result: dict = {}

    def _handshake():
        from tvm import rpc

        try:
            result["session"] = rpc.connect(host, port)
        except Exception as err:  # noqa: BLE001 - reported below, with the address
            result["error"] = err

    thread = threading.Thread(target=_handshake, name=f"rpc-connect-{address}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RemoteError(
            f"remote {address!r} accepted the connection but did not complete the TVM RPC "
            f"handshake within {timeout:.0f} s: not a TVM RPC server, or it is serving another "
            f"client (a TVM RPC server serves one session at a time)"
        )
    if "error" in result:
        raise RemoteError(f"TVM RPC handshake with {address!r} failed: {result['error']}")
    return result["session"]


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

    Uploads ``lib`` (the artifact's shared library, built for the device's CPU) once and keeps
    the session open until :meth:`close` (or garbage collection).
    """

    def __init__(
        self,
        lib: bytes,
        address: str,
        *,
        target: dict | None = None,
        timeout: float = CONNECT_TIMEOUT,
    ):
        import tvm

        self.address = address
        self._session = connect(address, timeout)
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
                f"the device at {address!r} cannot load the library compiled for {what}: "
                f"{last}; compile for the device's CPU (e.g. target='aarch64' for Linux arm64 "
                f"boards and the emulator, 'android-arm64' for phones)"
            ) from None

    def _set_input(self, arrays: list[np.ndarray]) -> None:
        import tvm

        if self._vm is None:
            raise RemoteError(f"the session with {self.address!r} is closed")
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

    def __enter__(self) -> RemoteProgram:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._vm is None else "open"
        return f"RemoteProgram({self.address!r}, {state})"
