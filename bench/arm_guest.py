"""ONNX Runtime's forward on the emulated aarch64 device, for ``bench/arm.py``: this file runs
INSIDE the device (its Python, ONNX Runtime's aarch64 wheel on PYTHONPATH), with the marks of
``mbcompile/devices/emulator/counting_guest.py``: one forward (outputs saved), then N more
between marks 1 and 2 (the window).

    python3 arm_guest.py MODEL.onnx FEEDS.npz N OUT.npz
"""

import contextlib
import os
import sys

MARK_BASE = 987000  # mbcompile.devices.emulator.counting.MARK_BASE


def mark(label: int) -> None:
    with contextlib.suppress(OSError):  # EBADF: the plugin saw the call
        os.close(MARK_BASE + label)


def main(model: str, feeds_path: str, n: int, out_path: str) -> None:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for entry in filter(None, os.environ.get("ARM_GUEST_ORT_CONFIG", "").split(";")):
        key, _, value = entry.partition("=")  # session config entries, e.g. bf16 fast math
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    with np.load(feeds_path) as data:
        feeds = {k: data[k] for k in data.files}
    np.savez(out_path, *session.run(None, feeds))
    mark(10)
    mark(1)
    for _ in range(n):
        session.run(None, feeds)
    mark(2)
    if os.environ.get("MBCOMPILE_COUNT_MAPS"):
        with open("/proc/self/maps") as src, open(os.environ["MBCOMPILE_COUNT_MAPS"], "w") as dst:
            dst.write(src.read())
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
