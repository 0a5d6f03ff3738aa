"""Run a compiled library on another device over TVM RPC: upload, load, run, time.

A device is reached in one of two ways:

- directly, ``remote="HOST:PORT"``: its TVM RPC server (``python -m tvm.exec.rpc_server``, TVM's
  Android RPC app, or ``mbcompile emulator serve`` for the emulated aarch64 device);
- through a TVM RPC tracker, ``tracker="HOST:PORT", key="KEY"``: the tracker hands out a free
  device among those registered under KEY (see ``tracker.py``).

:func:`load_remote` wraps a :class:`RemoteProgram` in the same ``CompiledModel`` as a local
``mbcompile.load(path)``, so inputs, outputs and checks are the same.

Over RPC a Relax function that returns a tuple cannot be indexed on the client, so the program
drives the VM statefully: ``set_input``, ``invoke_stateful``, ``get_outputs``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mbcompile.devices.rpc import (
    CALL_TIMEOUT,
    CONNECT_TIMEOUT,
    REQUEST_TIMEOUT,
    bounded,
    check_device_options,
    connect,
    last_line,
)
from mbcompile.devices.tracker import request_device
from mbcompile.errors import RemoteError
from mbcompile.runtime import CompiledModel
from mbcompile.runtime import load as runtime_load
from mbcompile.signature import Signature


def _outputs(arity: Callable, get: Callable, name: str, *index: int) -> list:
    """The leaves of function ``name``'s (possibly nested tuple) result, in order.

    (VirtualMachine.get_outputs does the same with a self-referencing closure, a reference
    cycle that keeps the VM, and so the RPC session, alive until the next garbage collection.)
    """
    n = arity(name, *index)
    if n == -1:
        return [get(name, *index)]
    return [leaf for i in range(n) for leaf in _outputs(arity, get, name, *index, i)]


class RemoteProgram:
    """The compiled functions running on a remote device's CPU, driven over TVM RPC: for inputs
    of ``n`` tokens, the function ``signature`` names for ``n`` (``main`` without one).

    The device is the server at ``address`` ("HOST:PORT"), or a free device registered with
    ``tracker`` ("HOST:PORT") under ``key``. Uploads ``lib`` (the artifact's shared library,
    built for the device's CPU) once and keeps the session open until :meth:`close` (or garbage
    collection). ``target`` (the artifact's target dict) names what the library was built for
    when the device refuses it. ``timeout``: for connecting (default 30 s), or through a tracker
    for a device to become free (default 60 s). ``call_timeout``: for every call on the device
    (the upload, loading, each forward; default ``CALL_TIMEOUT``, 300 s): a device that does not
    answer in time raises RemoteError naming it, and the session is given up.

    Calls from several threads take turns (one RPC session serves one call at a time).
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
        call_timeout: float | None = None,
        signature: Signature | None = None,
    ):
        import tvm

        self._signature = signature

        check_device_options(address, tracker, key)
        self.tracker, self.key = tracker, key
        self.call_timeout = CALL_TIMEOUT if call_timeout is None else float(call_timeout)
        if not self.call_timeout > 0:
            raise RemoteError(f"call_timeout must be a positive number of seconds, got {call_timeout!r}")
        self._lock = threading.Lock()
        self._vm = self._dev = self._session = None
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
        def start():
            self._session.upload(bytearray(lib), target=name)
            module = self._session.load_module(name)
            self._dev = self._session.cpu()
            return tvm.relax.VirtualMachine(module, self._dev)

        try:
            self._vm = self._bounded(start, "uploading and loading the library")
        except (RuntimeError, OSError, ValueError) as err:  # TVM's errors, raised over RPC
            self.close()
            raise RemoteError(
                f"{self._where} cannot load the library compiled for {what}: "
                f"{last_line(err)}; compile for the device's CPU (e.g. target='aarch64' for Linux "
                f"arm64 boards and the emulator, 'android-arm64' for phones)"
            ) from None

    @property
    def where(self) -> str:
        """The device, as error messages and the CLI name it."""
        if self.tracker is None:
            return self.address
        return f"{self.address} (key {self.key!r} from tracker {self.tracker})"

    def _bounded(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` on the device, at most ``call_timeout`` s; RemoteError naming the device."""
        # The helper thread holds the session while it waits: if the device never answers,
        # dropping the session here would run its destructor, which talks to the device and
        # blocks too. So the thread keeps it (and it is never freed: it is stuck anyway).
        held = (self._session, self._dev, self._vm)

        def call() -> Any:
            assert held
            return fn()

        done, value = bounded(call, self.call_timeout, "rpc-call")
        if not done:
            self._session = self._dev = self._vm = None
            raise RemoteError(
                f"{self._where} did not answer within {self.call_timeout:g} s while {what}; the "
                f"session was given up (raise call_timeout for slow devices, or check the device)"
            )
        if isinstance(value, Exception):
            raise value
        return value

    def _function(self, arrays: list[np.ndarray]) -> str:
        sig = self._signature
        if sig is None:
            return "main"
        length = int(arrays[0].shape[-1]) if arrays and arrays[0].ndim else 0
        if length not in sig.lengths:
            raise RemoteError(
                f"no compiled function takes {length} tokens; the compiled lengths are "
                f"{list(sig.lengths)} (pad the inputs to one of them)"
            )
        return sig.function_for(length)

    def _set_input(self, name: str, arrays: list[np.ndarray]) -> None:
        import tvm

        if self._vm is None:
            raise RemoteError(f"the session with {self.where} is closed")
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), self._dev) for a in arrays]
        self._vm.set_input(name, *tensors)

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Static-shape int64 inputs in; the function's outputs, in order, as numpy arrays."""
        name = self._function(arrays)

        def call():
            self._set_input(name, arrays)
            self._vm.invoke_stateful(name)
            module = self._vm.module
            leaves = _outputs(module["get_output_arity"], module["get_output"], name)
            return [t.numpy() for t in leaves]

        with self._lock:
            return self._bounded(call, "running the model")

    def time(self, arrays: list[np.ndarray], *, number: int = 1, repeat: int = 3) -> list[float]:
        """Seconds per call of the function for these inputs on the device (TVM's
        time_evaluator), one per repeat.

        Each repeat averages ``number`` calls, timed on the device, so network and upload
        time are excluded.
        """
        name = self._function(arrays)

        def call():
            self._set_input(name, arrays)
            timer = self._vm.time_evaluator(
                "invoke_stateful", self._dev, number=number, repeat=repeat
            )
            return [float(r) for r in timer(name).results]

        with self._lock:
            return self._bounded(call, "timing the model")

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


def load(
    path: str | Path,
    remote: str | None = None,
    *,
    tracker: str | None = None,
    key: str | None = None,
    timeout: float | None = None,
    call_timeout: float | None = None,
    expected_sha256: str | None = None,
    num_threads: int | None = None,
) -> CompiledModel:
    """Load a saved artifact, to run here or on a remote device (``mbcompile.load``).

    ``num_threads``: kernel threads per call here (default: every CPU the process may use, or
    ``TVM_NUM_THREADS``); a remote device's server sets its own.

    With none of ``remote``, ``tracker``, ``key`` it runs here (``mbcompile.runtime.load``:
    numpy and TVM only). ``remote="HOST:PORT"`` runs it on the device behind that TVM RPC
    server, and ``tracker="HOST:PORT", key="KEY"`` on a device registered with that TVM RPC
    tracker: the library is uploaded once, and the model is the same ``CompiledModel`` (inputs,
    outputs, checks) as a local one; its ``program`` is the :class:`RemoteProgram` (close it to
    end the session). Bad or missing device options raise RemoteError before any connection.
    ``timeout``: seconds to connect, or to wait for a free device from the tracker;
    ``call_timeout``: seconds each call on the device may take (default 300) before RemoteError.

    ``expected_sha256``: the SHA-256 of the whole file (``sha256sum model.mbc``), to pin the
    exact artifact a deployment shipped; another file is refused before anything in it is read
    or any native code loads. (An artifact is native code: load only what you trust.)
    """
    if remote is None and tracker is None and key is None:
        return runtime_load(path, expected_sha256, num_threads)
    check_device_options(remote, tracker, key)
    if num_threads is not None:
        raise RemoteError(
            "num_threads applies to a model run here; a remote device's RPC server sets its own "
            "thread count (TVM_NUM_THREADS in the server's environment)"
        )
    local = runtime_load(path, expected_sha256)  # reads and checks the artifact; runs nothing
    program = RemoteProgram(
        local.library_bytes, remote, tracker=tracker, key=key,
        target=local.metadata.target, timeout=timeout, call_timeout=call_timeout,
        signature=local.signature,
    )
    return local.with_program(program)


def load_remote(path: str | Path, remote: str | None = None, **options: Any) -> CompiledModel:
    """:func:`load` for a remote device only: without ``remote``, or ``tracker`` and ``key``,
    RemoteError says that no device was named (``options``: those of :func:`load`)."""
    check_device_options(remote, options.get("tracker"), options.get("key"))
    return load(path, remote, **options)
