"""binfmt_misc: let the kernel hand aarch64 programs to qemu.

TVM's stock RPC server (``rpc.Server``) starts a child Python: exec'ing an aarch64 binary needs
the kernel's binfmt_misc to hand it to qemu, which :func:`ensure_binfmt` registers (root only,
idempotently). Without it the server runs in process (see ``launch.choose_mode``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from mbcompile.devices.emulator.device import QEMU, TOOLS, Emulator, run_step
from mbcompile.errors import EmulatorError

BINFMT = Path("/proc/sys/fs/binfmt_misc")
# ELF 64-bit little-endian, e_machine 0xb7 (AArch64): as Debian's qemu-user-static registers it.
_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"


def binfmt_problem(device: Emulator) -> str | None:
    """None if this kernel execs the device's aarch64 binaries (through qemu), else why not."""
    try:
        proc = subprocess.run(
            [str(device.root / "usr/bin/python3"), "-c", "pass"],
            env=device.env(),
            capture_output=True,
            timeout=120,
            check=False,
        )
    except OSError as err:
        return f"this kernel cannot exec aarch64 programs (binfmt_misc has no qemu-aarch64: {err})"
    except subprocess.TimeoutExpired:
        return "an aarch64 program exec'd through binfmt_misc did not finish within 120 s"
    if proc.returncode != 0:
        return f"aarch64 python exec'd through binfmt_misc failed: {proc.stderr.decode()[-500:]}"
    return None


def ensure_binfmt(device: Emulator) -> str | None:
    """Make the kernel hand aarch64 programs to qemu; None on success, else why it cannot.

    Idempotent: mounts binfmt_misc if needed, enables an existing ``qemu-aarch64`` entry or
    registers one (flag F: the kernel opens qemu now, so it works in any mount namespace).
    Changes the whole machine's kernel state, so only as root.
    """
    if binfmt_problem(device) is None:
        return None
    if os.geteuid() != 0:
        return "registering qemu-aarch64 with binfmt_misc needs root"
    qemu = shutil.which(QEMU)
    if qemu is None:
        return f"{QEMU} is not on PATH (apt-get install {TOOLS[QEMU]})"
    try:
        if not (BINFMT / "register").exists():
            run_step(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                     "mounting binfmt_misc")
        entry = BINFMT / "qemu-aarch64"
        if entry.exists():
            entry.write_text("1")
        else:
            (BINFMT / "register").write_text(f":qemu-aarch64:M::{_MAGIC}:{_MASK}:{qemu}:F")
    except (OSError, EmulatorError) as err:
        return f"cannot register qemu-aarch64 with binfmt_misc: {err}"
    return binfmt_problem(device)
