"""An emulated Linux aarch64 device, built by the project itself, to run aarch64 artifacts on x86.

- ``device.py``: what the device is (qemu user mode running an arm64 Debian root with the TVM
  runtime wheels), where it is cached (:func:`cache_dir`) and how it is built (:func:`build`);
- ``binfmt.py``: letting the kernel exec its aarch64 programs (:func:`ensure_binfmt`);
- ``server.py``: the TVM RPC server program that runs inside the device;
- ``launch.py``: starting that server (:func:`start_server`, :func:`serve`).

``build()`` makes the device, ``start_server()`` runs a TVM RPC server inside it on 127.0.0.1,
and ``mbcompile.devices.load_remote(path, "127.0.0.1:PORT")`` (``mbcompile run MODEL.mbc
--remote 127.0.0.1:PORT``) runs an artifact there. With ``tracker="HOST:PORT", key=KEY`` the
server registers with a TVM RPC tracker instead (``mbcompile emulator tracker`` starts one), which
is how MetaSchedule's RPC runner (``mbcompile tune --tracker HOST:PORT --key KEY``) and
``mbcompile run --tracker`` reach it.
"""

from mbcompile.devices.emulator.binfmt import binfmt_problem, ensure_binfmt
from mbcompile.devices.emulator.device import (
    RECIPE,
    Emulator,
    build,
    cache_dir,
    cached,
    missing_tools,
    recipe_hash,
)
from mbcompile.devices.emulator.launch import (
    Server,
    choose_mode,
    serve,
    start_server,
)

__all__ = [
    "RECIPE",
    "Emulator",
    "Server",
    "binfmt_problem",
    "build",
    "cache_dir",
    "cached",
    "choose_mode",
    "ensure_binfmt",
    "missing_tools",
    "recipe_hash",
    "serve",
    "start_server",
]
