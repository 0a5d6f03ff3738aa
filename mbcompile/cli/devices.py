"""``mbcompile emulator build | serve | tracker``: the emulated aarch64 device and a TVM RPC
tracker for devices to register with."""

from __future__ import annotations

from dataclasses import dataclass

from mbcompile.cli.options import parsed, port_number


@dataclass
class EmulatorArgs:
    emulator_command: str  # "build", "serve" or "tracker"
    force: bool = False
    port: int = 9090
    mode: str = "auto"
    load_library: str | None = None
    tracker: str | None = None
    key: str | None = None
    host: str = "127.0.0.1"


def register(sub) -> None:
    e = sub.add_parser("emulator", help="the emulated aarch64 device (qemu user mode)")
    esub = e.add_subparsers(dest="emulator_command", required=True)
    eb = esub.add_parser(
        "build", help="build it (cached in ~/.cache/mbcompile/emulator or $MBCOMPILE_CACHE_DIR; "
        "rebuilt when its recipe changes)"
    )
    eb.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    es = esub.add_parser("serve", help="run a TVM RPC server inside it on 127.0.0.1")
    es.add_argument("--port", type=port_number, default=9090)
    es.add_argument(
        "--mode", choices=["auto", "stock", "in-process"], default="auto",
        help="stock: TVM's server (needs binfmt_misc, registered if root); in-process: no "
        "child Python; auto: stock if possible",
    )
    es.add_argument(
        "--load-library", default=None,
        help="extra library for the server, e.g. the device's tvm/lib/libtvm_runtime_extra.so "
        "(MetaSchedule over RPC; the default with --tracker)",
    )
    es.add_argument(
        "--tracker", metavar="HOST:PORT", default=None,
        help="register with this TVM RPC tracker (with --key) instead of taking direct clients",
    )
    es.add_argument("--key", default=None, help="the device key to register under, e.g. emu")
    et = esub.add_parser(
        "tracker", help="run a TVM RPC tracker (devices register with it; tune and run use it)"
    )
    et.add_argument("--port", type=port_number, default=9190)
    et.add_argument("--host", default="127.0.0.1", help="address to listen on")
    e.set_defaults(handler=lambda ns: _emulator(parsed(EmulatorArgs, ns)))


def _emulator(args: EmulatorArgs) -> int:
    from mbcompile.devices import emulator

    if args.emulator_command == "build":
        device = emulator.build(force=args.force)
        stamp = device.stamp
        print(
            f"device: {device.root} ({stamp.get('bytes', 0) / 1e6:.0f} MB, built "
            f"{stamp.get('built')} in {stamp.get('build_seconds')} s)"
        )
        print("python: " + " ".join(device.python()) + f"  (with QEMU_LD_PREFIX={device.root})")
        return 0
    if args.emulator_command == "tracker":
        from mbcompile.devices.tracker import serve_tracker

        return serve_tracker(args.port, args.host)
    return emulator.serve(
        args.port, mode=args.mode, load_library=args.load_library, tracker=args.tracker,
        key=args.key,
    )
