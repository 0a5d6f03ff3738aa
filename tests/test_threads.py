"""The runtime runs the kernels on every CPU the process may use, unless told otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import make_model, tiny_config

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


def _inputs(compiled, count: int, seed: int = 0) -> list:
    import numpy as np

    sig = compiled.signature
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, sig.seq_len + 1, count)
    return [rng.integers(0, sig.vocab_size, (1, int(n)), dtype=np.int64) for n in lengths]


def _hammer(models_and_inputs, threads: int, calls: int) -> list[str]:
    """Call each (model, inputs, expected) from ``threads`` threads ``calls`` times each; the
    list of calls whose outputs differ from the serial ones."""
    import threading

    import numpy as np

    wrong: list[str] = []
    start = threading.Barrier(threads)

    def work(k: int) -> None:
        start.wait()
        for j in range(calls):
            compiled, inputs, expected = models_and_inputs[(k + j) % len(models_and_inputs)]
            i = (k * 7 + j) % len(inputs)
            out = compiled(input_ids=inputs[i])
            for name, want in expected[i].items():
                if not np.array_equal(out[name], want):
                    wrong.append(f"thread {k} call {j}: {name}")

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return wrong


def _serial(compiled, inputs) -> list[dict]:
    return [dict(compiled(input_ids=i)) for i in inputs]


def test_one_model_called_from_8_threads_gives_the_serial_results(tiny_qa_artifact):
    """A Relax VM is not re-entrant; the runtime gives each calling thread its own."""
    import mbcompile

    compiled = mbcompile.load(tiny_qa_artifact)
    inputs = _inputs(compiled, 12)
    expected = _serial(compiled, inputs)
    assert _hammer([(compiled, inputs, expected)], threads=8, calls=200) == []


def test_several_models_first_called_in_threads_give_the_serial_results(tiny_qa_artifact):
    """Three loads of one artifact (three libraries) whose first calls race in threads."""
    import mbcompile

    reference = mbcompile.load(tiny_qa_artifact)
    inputs = _inputs(reference, 6, seed=1)
    expected = _serial(reference, inputs)
    fresh = [mbcompile.load(tiny_qa_artifact) for _ in range(3)]
    work = [(m, inputs, expected) for m in fresh]
    assert _hammer(work, threads=6, calls=40) == []


def _host_lacks(precision: str) -> str | None:
    from mbcompile.cpu import cpu_info
    from mbcompile.targets.registry import host_target

    info = cpu_info(host_target().tvm_target())
    has = info.bf16_dot if precision == "bf16" else info.int8_dot
    return None if has else f"this CPU has no {precision} dot products to run a {precision} build on"


@pytest.mark.parametrize(
    "precision",
    [pytest.param(p, marks=pytest.mark.skipif(_host_lacks(p) is not None, reason=str(_host_lacks(p))))
     for p in ("bf16", "int8")],
)
def test_a_reduced_precision_model_called_from_threads_gives_the_serial_results(precision):
    """bf16 and int8 builds (on AMX tiles where the host has them: every call configures the
    tiles on its thread and releases them; on dot products elsewhere, the panel steps where K
    is a multiple of 128, as here) at every length up to 32, from 4 threads at once: the serial
    results, bit for bit."""
    import mbcompile

    widths = {"hidden_size": 128, "intra_bottleneck_size": 128, "true_hidden_size": 128,
              "intermediate_size": 128}
    model = make_model("question-answering", tiny_config(**widths), seed=5)
    compiled = mbcompile.compile(model, max_seq_len=32, precision=precision)
    inputs = _inputs(compiled, 8, seed=2)
    expected = _serial(compiled, inputs)
    assert _hammer([(compiled, inputs, expected)], threads=4, calls=40) == []


NUM_THREADS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import mbcompile

    one = mbcompile.load(sys.argv[1], num_threads=1)
    before = len(os.listdir("/proc/self/task"))
    one(np.zeros((1, 16), np.int64))
    with_one = len(os.listdir("/proc/self/task")) - before
    report = one.benchmark(np.ones((1, 9), np.int64), runs=3, warmup=1)
    print(json.dumps({"new_os_threads": with_one, "threads": report["threads"],
                      "runs": len(report["latency_ms"]), "length": report["compiled_length"],
                      "rss": report["peak_rss_mb"]}))
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_num_threads_on_load_sets_the_threads_per_call(tiny_qa_artifact):
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", NUM_THREADS_SCRIPT, str(tiny_qa_artifact)],
        env=env, check=True, timeout=300, capture_output=True, text=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # one thread: the caller runs the kernels itself (TVM's pool parks one idle worker)
    assert got["new_os_threads"] <= 1
    assert got["threads"] == 1 and got["runs"] == 3 and got["length"] == 16
    assert got["rss"] > 10


def test_num_threads_is_checked_and_reaches_the_pipelines(tiny_qa, tiny_qa_artifact):
    import numpy as np

    import mbcompile
    from mbcompile.errors import InputError, PipelineError, RemoteError

    with pytest.raises(InputError, match="num_threads must be a positive integer"):
        mbcompile.load(tiny_qa_artifact, num_threads=0)
    with pytest.raises(RemoteError, match="num_threads applies to a model run here"):
        mbcompile.load(tiny_qa_artifact, remote="127.0.0.1:9", num_threads=2)
    model, compiled = tiny_qa
    two = compiled.with_threads(2)
    ids = np.arange(1, 8)[None]
    assert np.array_equal(two(ids).start_logits, compiled(ids).start_logits)
    assert two.benchmark(ids, runs=2)["threads"] == 2
    with pytest.raises(PipelineError, match="num_threads must be a positive integer"):
        mbcompile.pipeline("question-answering", compiled, tokenizer=object(), num_threads=-1)
    with pytest.raises(InputError, match="runs must be a positive integer"):
        compiled.benchmark(ids, runs=0)


def test_a_vm_is_made_only_while_no_vm_runs():
    """Making a Relax VM while another thread's VM ran crashed the process now and then (a
    SIGSEGV in a map of TVM's runtime, in the new VM's constructor; seen in compile's own check,
    whose two rows run side by side): the runtime makes and drops VMs only while none runs."""
    import threading
    import time

    from mbcompile.runtime.program import _VMS

    order = []
    running = threading.Event()

    def run():
        with _VMS.run():
            running.set()
            time.sleep(0.3)
            order.append("run ends")

    def make():
        running.wait()
        with _VMS.change():
            order.append("vm made")

    threads = [threading.Thread(target=run), threading.Thread(target=make)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert order == ["run ends", "vm made"]

    # a change waiting holds back new runs (a stream of calls cannot starve it)
    order.clear()
    first = threading.Event()

    def long_run():
        with _VMS.run():
            first.set()
            time.sleep(0.3)
            order.append("first run ends")

    def later_run():
        first.wait()
        time.sleep(0.1)  # the change is waiting by now
        with _VMS.run():
            order.append("later run")

    def change():
        first.wait()
        time.sleep(0.05)
        with _VMS.change():
            order.append("change")

    threads = [threading.Thread(target=f) for f in (long_run, later_run, change)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert order == ["first run ends", "change", "later run"]
