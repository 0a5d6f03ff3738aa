"""The program counted runs execute INSIDE the emulated device (its Python and TVM runtime only:
it imports nothing from mbcompile). ``counting.py`` marks points of a run by label.

``forward LIB FUNCTION ARRAYS.npz N OUT.npz``
    Load a compiled model's library (a Relax VM), call ``FUNCTION`` on the arrays once (outputs
    saved to OUT.npz, mark 10), then N more times between marks 1 and 2: the window, whose
    blocks the plugin reports.

``kernels JOB.json``
    For each candidate kernel of the job (``{"path": LIB, "args": [["TENSOR", dtype, shape],
    ...]}``): load it, fill random arguments, call it once, then once more between marks
    ``100 + 2 i`` and ``101 + 2 i`` and inside the window (marks 1 and 2), so that the blocks
    of its library count that call alone. Prints ``ok i`` or ``error i: why`` per candidate.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

MARK_BASE = 987000  # counting.MARK_BASE


def mark(label: int) -> None:
    with contextlib.suppress(OSError):  # EBADF: the plugin saw the call
        os.close(MARK_BASE + label)


def write_maps() -> None:
    path = os.environ.get("MBCOMPILE_COUNT_MAPS")
    if path:
        with open("/proc/self/maps") as src, open(path, "w") as dst:
            dst.write(src.read())


def leaves(result) -> list:
    import tvm

    if isinstance(result, tvm.runtime.Tensor):
        return [result.numpy()]
    return [x for item in result for x in leaves(item)]


def forward(lib: str, function: str, arrays_path: str, n: int, out_path: str) -> None:
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine  # tvm.relax would need the compiler library

    vm = VirtualMachine(tvm.runtime.load_module(lib), tvm.cpu())
    with np.load(arrays_path) as data:
        args = [tvm.runtime.tensor(data[f"arr_{i}"]) for i in range(len(data.files))]
    outs = leaves(vm[function](*args))
    np.savez(out_path, *outs)
    mark(10)
    mark(1)
    for _ in range(n):
        vm[function](*args)
    mark(2)


def random_arguments(specs: list, rng) -> list:
    import numpy as np
    import tvm

    args = []
    for spec in specs:
        _, dtype, shape = spec
        if dtype.startswith(("float", "bfloat")):
            arr = rng.standard_normal(shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            arr = rng.integers(max(info.min, -8), min(info.max, 8), size=shape, dtype=dtype)
        args.append(tvm.runtime.tensor(arr))
    return args


def kernels(job_path: str) -> None:
    import numpy as np
    import tvm

    with open(job_path) as f:
        job = json.load(f)
    rng = np.random.default_rng(0)
    for i, candidate in enumerate(job):
        try:
            module = tvm.runtime.load_module(candidate["path"])
            function = module[module.entry_name]
            args = random_arguments(candidate["args"], rng)
            function(*args)  # first call: lazy binding, page faults
            mark(100 + 2 * i)
            mark(1)
            function(*args)
            mark(2)
            mark(101 + 2 * i)
            print(f"ok {i}", flush=True)
        except Exception as err:  # noqa: BLE001 - reported per candidate
            print(f"error {i}: {' '.join(str(err).split())[:300]}", flush=True)


def main(argv: list[str]) -> None:
    if argv[:1] == ["forward"] and len(argv) == 6:
        forward(argv[1], argv[2], argv[3], int(argv[4]), argv[5])
    elif argv[:1] == ["kernels"] and len(argv) == 2:
        kernels(argv[1])
    else:
        sys.exit(f"usage: {__doc__}")
    write_maps()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown counted or waited for


if __name__ == "__main__":
    main(sys.argv[1:])
