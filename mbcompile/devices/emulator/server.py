"""TVM RPC server of mbcompile's emulated aarch64 device: this file runs INSIDE the emulator.

It runs with the device's Python (3.11) and the device's TVM runtime only, so it imports nothing
from mbcompile (nor anything else the device lacks). ``launch.py`` hands this file's source to the
device's Python on its standard input (``python3 - --port ...``) at each start, so changing it
needs no rebuild of the device. The host imports it only for the markers below (tvm is imported
in :func:`main`).

Prints ``READY HOST:PORT (...)`` once it listens (and, with ``--tracker``, once the tracker lists
it under its key), or ``FAILED why`` before it exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import socket
import time

READY = "mbcompile-rpc: listening on"
FAILED = "mbcompile-rpc: failed:"
REGISTER_TIMEOUT = 120  # seconds for the server to appear in the tracker's list, under qemu


def fail(message: str) -> None:
    """Say why and exit (os._exit: a non-daemon server thread may already be running)."""
    print(f"{FAILED} {message}", flush=True)
    os._exit(1)


def wait_until_listed(tracker: tuple[str, int], address: str, key: str, port: int) -> None:
    """TVM registers from its listening thread: wait until the tracker lists this server."""
    from tvm import rpc

    deadline = time.monotonic() + REGISTER_TIMEOUT
    session = rpc.connect_tracker(*tracker)
    while not any(
        info.get("key") == "server:" + key and list(info.get("addr", []))[1:] == [port]
        for info in session.summary()["server_info"]
    ):
        if time.monotonic() > deadline:
            fail(f"not listed by the tracker at {address} after {REGISTER_TIMEOUT} s")
        time.sleep(0.5)
    session.close()


def main() -> None:
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
    if tracker:
        wait_until_listed(tracker, args.tracker, args.key, port)
        registered = f", registered with the tracker at {args.tracker} as {args.key!r}"
    machine = platform.machine()
    print(f"{READY} 127.0.0.1:{port} ({machine}, {args.mode} server{registered})", flush=True)
    wait()


if __name__ == "__main__":
    main()
