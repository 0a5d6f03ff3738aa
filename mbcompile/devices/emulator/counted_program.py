"""A compiled model's functions run on the emulated device with every instruction counted.

``compiled.with_program(CountedProgram(compiled))`` is the same model, called the same way
(numpy or torch inputs, Hugging Face outputs), whose calls run in a fresh emulated process under
the counting plugin (``counting.py``): one call to load and warm up, ``forwards`` more counted.
After a call, ``program.last`` holds what one forward executed: its classes and its kernels,
each with the modelled cycles of ``cycle_models.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from pathlib import Path

import numpy as np

from mbcompile.devices.emulator import cycle_models
from mbcompile.devices.emulator.counting import (
    CLASSES,
    WINDOW_CLOSE,
    WINDOW_OPEN,
    kernels_of,
    run_counted,
)
from mbcompile.devices.emulator.device import Emulator, build
from mbcompile.errors import EmulatorError, TargetError

GUEST = Path(__file__).with_name("counting_guest.py")


@dataclasses.dataclass
class ForwardCount:
    """What one forward executed on the emulated device (forwards 2..N+1 of a run, averaged)."""

    cpu: str
    forwards: int
    classes: dict[str, float]  # per forward, by class (counting.CLASSES)
    # Per function of the library, and "(outside)" it (the VM, the runtime): classes,
    # "cycles_<model>" and "bottleneck_<model>" (counting.kernels_of), largest first.
    kernels: list[dict]

    def cycles(self, model: str) -> float:
        """Modelled cycles of the forward (``cycle_models``: a model, not a measurement)."""
        return sum(k[f"cycles_{model}"] for k in self.kernels)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            f"cycles_{m}": self.cycles(m) for m in cycle_models.MODELS}


class CountedProgram:
    """Runs ``main`` (the function the signature names for the inputs' length) of a compiled
    model on the emulated aarch64 device, counting what it executes; see the module docstring.

    The model must be compiled for an aarch64 target the emulated ``cpu`` runs (``aarch64``,
    ``aarch64-dotprod``; ``cpu="max"`` for ``aarch64-armv9``).
    """

    def __init__(self, compiled, *, forwards: int = 2, cpu: str = "cortex-a76",
                 device: Emulator | None = None, timeout: float = 1800):
        if compiled.metadata.target.get("arch") != "aarch64":
            raise TargetError(
                f"counting runs aarch64 code; this model is compiled for "
                f"{compiled.metadata.target.get('name')!r} ({compiled.metadata.target.get('arch')})"
            )
        if not isinstance(forwards, int) or forwards < 1:
            raise EmulatorError(f"forwards must be a positive integer, got {forwards!r}")
        self._lib = compiled.library_bytes
        self._signature = compiled.signature
        self.forwards, self.cpu, self.timeout = forwards, cpu, timeout
        self._device = device
        self.last: ForwardCount | None = None

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        device = self._device or build(log=lambda _: None)
        function = self._signature.function_for(int(arrays[0].shape[-1]))
        digest = hashlib.sha256(self._lib).hexdigest()[:16]
        with tempfile.TemporaryDirectory(prefix="mbcompile-counted-") as tmp:
            lib = Path(tmp) / f"mbcompile-{digest}.so"
            lib.write_bytes(self._lib)
            np.savez(Path(tmp) / "arrays.npz", *arrays)
            out = Path(tmp) / "out.npz"
            python = str(device.root / "usr/bin/python3")
            counts, _ = run_counted(
                device,
                [python, str(GUEST), "forward", str(lib), function, str(Path(tmp) / "arrays.npz"),
                 str(self.forwards), str(out)],
                cpu=self.cpu, timeout=self.timeout,
            )
            with np.load(out) as data:
                outputs = [data[f"arr_{i}"] for i in range(len(data.files))]
            kernels = kernels_of(counts, lib, per=self.forwards)
        window = counts.between(WINDOW_OPEN, WINDOW_CLOSE)
        self.last = ForwardCount(
            cpu=self.cpu, forwards=self.forwards,
            classes={k: window[k] / self.forwards for k in CLASSES}, kernels=kernels,
        )
        return outputs

    def close(self) -> None:
        pass


def count_forward(compiled, *inputs, forwards: int = 2, cpu: str = "cortex-a76",
                  device: Emulator | None = None, **named):
    """``(outputs, ForwardCount)``: ``compiled(*inputs, **named)`` run on the emulated device
    with its instructions counted."""
    program = CountedProgram(compiled, forwards=forwards, cpu=cpu, device=device)
    counted = compiled.with_program(program)
    outputs = counted(*inputs, **named)
    return outputs, program.last


