"""TVM RPC trackers: find a free device by its key, and run a tracker on this machine.

A tracker hands out a free device among those registered under a key (a pool of boards or
phones; MetaSchedule's RPC runner, ``mbcompile tune --tracker``, measures the same way).
:func:`start_tracker` (``mbcompile emulator tracker``) or ``python -m tvm.exec.rpc_tracker``
start one; servers register with ``--tracker HOST:PORT --key KEY``.

TVM's ``TrackerSession.request`` blocks until a device with the key is free (forever if none is
registered) and retries on socket errors, so the client here speaks the tracker protocol itself,
with a timeout on each step and a :class:`~mbcompile.errors.RemoteError` saying which.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from mbcompile.devices.rpc import (
    CONNECT_TIMEOUT,
    DEFAULT_TRACKER_PORT,
    REQUEST_TIMEOUT,
    check_device_options,
    handshake,
    last_line,
    parse_address,
    sigterm_interrupts,
)
from mbcompile.errors import RemoteError, ToolchainError


class _TrackerClient:
    """The client side of TVM's tracker protocol (``tvm.rpc.base``) with a timeout on each step."""

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
    session = handshake(host, port, match_key, session_timeout, min(timeout, CONNECT_TIMEOUT),
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


# -- a tracker on this machine -------------------------------------------------------------------


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
        raise RemoteError(
            f"bad tracker port {port!r}: expected 1..65535, e.g. {DEFAULT_TRACKER_PORT}"
        )
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
        raise RemoteError(
            f"cannot start a TVM RPC tracker on {host}:{port}: {last_line(err)}"
        ) from None
    return Tracker(host, tracker.port, tracker)


def serve_tracker(port: int = DEFAULT_TRACKER_PORT, host: str = "127.0.0.1") -> int:
    """Run a tracker in the foreground until interrupted (``mbcompile emulator tracker``); 0, or
    130 after Ctrl-C or SIGTERM."""
    try:
        with sigterm_interrupts(), start_tracker(port, host) as tracker:  # `kill` stops it too
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
