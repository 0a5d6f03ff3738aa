"""Devices other than this machine's CPU: remote devices over TVM RPC and the emulated aarch64
device.

- ``rpc.py``: ``HOST:PORT`` addresses, the device options, a bounded connect and handshake;
- ``tracker.py``: TVM RPC trackers (a client with a timeout on each step; start or serve one);
- ``remote.py``: :class:`RemoteProgram` (the compiled ``main`` on a remote CPU) and
  :func:`load_remote` (a saved artifact, run there);
- ``emulator/``: the emulated aarch64 device (``from mbcompile.devices import emulator``).

Errors are :class:`mbcompile.errors.RemoteError` and :class:`mbcompile.errors.EmulatorError`.
"""

from mbcompile.devices.remote import RemoteProgram, load_remote
from mbcompile.devices.rpc import check_device_options, connect, parse_address
from mbcompile.devices.tracker import (
    Tracker,
    connect_tracker,
    request_device,
    serve_tracker,
    start_tracker,
    tracker_devices,
)

__all__ = [
    "RemoteProgram",
    "Tracker",
    "check_device_options",
    "connect",
    "connect_tracker",
    "load_remote",
    "parse_address",
    "request_device",
    "serve_tracker",
    "start_tracker",
    "tracker_devices",
]
