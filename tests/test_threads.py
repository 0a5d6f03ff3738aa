"""The runtime runs the kernels on every CPU the process may use, unless told otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import mbcompile
    from mbcompile.runtime import use_all_cpus

    compiled = mbcompile.load(sys.argv[1])
    before = len(os.listdir("/proc/self/task"))
    compiled(np.zeros((1, 16), np.int64))
    new_os_threads = len(os.listdir("/proc/self/task")) - before  # before asking use_all_cpus
    print(json.dumps({"threads": use_all_cpus(), "new_os_threads": new_os_threads}))
    """
)


def _run(artifact, **env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_overrides)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(artifact)],
        env=env, check=True, timeout=300, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
@pytest.mark.skipif(CPUS < 2, reason="one CPU: nothing to spread over")
def test_kernels_use_every_cpu_by_default(tiny_qa_artifact):
    """TVM 0.27 alone takes half the CPUs on x86 (it assumes two hardware threads per core):
    one thread on a 2-CPU machine. Its pool starts CPUS - 1 workers beside the caller."""
    got = _run(tiny_qa_artifact)
    assert got == {"threads": CPUS, "new_os_threads": CPUS - 1}


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_tvm_num_threads_still_decides(tiny_qa_artifact):
    assert _run(tiny_qa_artifact, TVM_NUM_THREADS="1") == {"threads": 1, "new_os_threads": 0}
