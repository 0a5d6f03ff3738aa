"""Reaching a TVM RPC server: ``HOST:PORT`` addresses, the device options, and a connect whose
every wait is bounded.

TVM's own ``rpc.connect`` blocks forever on a peer that accepts but never answers (not a TVM
server, or a server busy with another client's session), so here the TCP connection has a timeout
and the handshake runs in a helper thread that is abandoned after its timeout, with a
:class:`~mbcompile.errors.RemoteError` saying which step did not finish.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from mbcompile.errors import RemoteError

CONNECT_TIMEOUT = 30.0  # seconds, for the TCP connection and for the RPC handshake
REQUEST_TIMEOUT = 60.0  # seconds to wait for a free device from a tracker
# seconds for one call on a device (upload, load, a forward) before it counts as not answering:
# a full-size MobileBERT forward takes about 30 s on the emulated device
CALL_TIMEOUT = 300.0
DEFAULT_SERVER_PORT = 9090  # TVM's rpc_server
DEFAULT_TRACKER_PORT = 9190  # TVM's rpc_tracker


def parse_address(address: str, what: str = "remote") -> tuple[str, int]:
    """``"HOST:PORT"`` → (host, port); RemoteError names the bad address."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        example = f"127.0.0.1:{DEFAULT_TRACKER_PORT if what == 'tracker' else DEFAULT_SERVER_PORT}"
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


def last_line(err: BaseException) -> str:
    """The last line of an error's message (TVM's errors carry a C++ backtrace before it)."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def bounded(fn: Callable[[], Any], timeout: float, name: str) -> tuple[bool, Any]:
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


def handshake(host: str, port: int, match_key: str, session_timeout: float, timeout: float,
              where: str):
    """The TVM RPC handshake with a server (``match_key`` from a tracker, else ""), bounded by
    ``timeout`` s; ``where`` names the server in the RemoteError."""
    from tvm import rpc

    done, value = bounded(
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
    """An RPC session with the server at ``address``, or RemoteError within about ``timeout`` s."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise RemoteError(
            f"cannot reach remote {address!r}: {err}; is a TVM RPC server running there "
            f"(e.g. `mbcompile emulator serve --port {port}`)?"
        ) from None
    return handshake(host, port, "", 0, timeout, f"remote {address!r}")


# -- foreground servers --------------------------------------------------------------------------


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM (``kill``) raises KeyboardInterrupt, as Ctrl-C does, so that a
    server run in the foreground stops the same way for both. Python handles signals in the main
    thread only; elsewhere this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
