"""Modelled cycles of phone cores from counted instructions: models, not measurements.

The counts (``counting.py``) say what a kernel executes, not how long a core takes. A first
order throughput model of two core classes turns them into cycles, per kernel (a kernel is one
steady loop nest, so its bottleneck is one resource):

- ``a76``: a Cortex-A76-class out-of-order core. It issues 4 instructions a cycle, has two
  128-bit NEON pipes and two load pipes (one of which also stores)::

      cycles = max(neon / 2, loads / 2, (loads + stores) / 2, instructions / 4)

- ``a55``: a Cortex-A55-class narrow in-order core. It issues 2 instructions a cycle, has one
  128-bit NEON operation a cycle, and one load/store pipe::

      cycles = max(neon / 1, (loads + stores) / 1, instructions / 2)

Both ignore latencies, cache misses and (for the in-order core) stalls on dependent
instructions: they are lower bounds that rank code by its throughput limits. They are not
measurements on hardware, and say so wherever they are reported.
"""

from __future__ import annotations

from collections.abc import Mapping

from mbcompile.errors import OptionError

MODELS = {
    # name: (description, {class or class sum: instructions per cycle})
    "a76": ("Cortex-A76-class, out of order: 4-wide, 2 NEON pipes, 2 load pipes",
            {"neon": 2.0, "load": 2.0, "load+store": 2.0, "total": 4.0}),
    "a55": ("Cortex-A55-class, in order: 2-wide, 1 NEON op, 1 load/store a cycle",
            {"neon": 1.0, "load+store": 1.0, "total": 2.0}),
}
# Clock used to turn modelled cycles into seconds (MetaSchedule wants seconds): a phone's big
# core runs near this; only the ranking of candidates matters.
GHZ = 2.0


def check_model(name: str) -> str:
    if name not in MODELS:
        raise OptionError(f"unknown core model {name!r}; the models are {sorted(MODELS)}")
    return name


def cycles(counts: Mapping[str, float], model: str) -> float:
    """Modelled cycles of ``counts`` (classes as ``counting.CLASSES`` names them) on ``model``."""
    _, rates = MODELS[check_model(model)]
    return max(sum(counts[part] for part in resource.split("+")) / rate
               for resource, rate in rates.items())


def bottleneck(counts: Mapping[str, float], model: str) -> str:
    """Which resource bounds ``counts`` on ``model`` (``"neon"``, ``"load+store"``, ...)."""
    _, rates = MODELS[check_model(model)]
    return max(rates, key=lambda r: sum(counts[p] for p in r.split("+")) / rates[r])


def kernel_cycles(kernels: list[Mapping[str, float]], model: str) -> float:
    """Modelled cycles of a forward: the sum over its kernels, each bound by its own resource."""
    return sum(cycles(k, model) for k in kernels)
