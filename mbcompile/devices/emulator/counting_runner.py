"""MetaSchedule's runner for aarch64 candidates on the emulated device, costed by counted
instructions instead of time.

Wall time under qemu says nothing about a phone, so ``mbcompile tune --target aarch64
--emulator-cost a76`` measures each candidate kernel by what it executes. A batch of
candidates (linked for the target by ``rpc_tuning.rpc_builder``) runs in one emulated process
under the counting plugin (``counting_guest.py kernels``). Each is called once to warm up and
once counted: the instructions executed inside the candidate's library, not the runtime's call.
The cost MetaSchedule records is the counted call's modelled cycles (``cycle_models``: ``a76``
or ``a55``; ``instructions``: one a cycle) at ``GHZ``, in seconds, so databases and logs keep
their units. A candidate that fails or crashes the process is recorded as failed; after a crash
the rest of its batch runs again without it.
"""

from __future__ import annotations

import json
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mbcompile.devices.emulator import cycle_models
from mbcompile.devices.emulator.counting import in_library, run_counted
from mbcompile.devices.emulator.device import Emulator, cached
from mbcompile.errors import EmulatorError, OptionError

GUEST = Path(__file__).with_name("counting_guest.py")
COSTS = (*cycle_models.MODELS, "instructions")


def check_cost(cost: str) -> str:
    if cost not in COSTS:
        raise OptionError(f"unknown emulator cost {cost!r}; choose one of {list(COSTS)}")
    return cost


def candidate_seconds(classes: dict, cost: str) -> float:
    """MetaSchedule's "run time" of a counted candidate: modelled cycles at ``GHZ``."""
    cycles = classes["total"] if cost == "instructions" else cycle_models.cycles(classes, cost)
    return cycles / (cycle_models.GHZ * 1e9)


def count_candidates(device: Emulator, candidates: list[dict], *, cost: str, cpu: str,
                     timeout: float) -> list[tuple[float | None, str | None]]:
    """(seconds, None) or (None, why) per candidate (``{"path", "args"}``, each path a library
    of its own, as MetaSchedule's builder makes them: a candidate's count is its library's
    blocks), in order."""
    results: list[tuple[float | None, str | None]] = [(None, "not run")] * len(candidates)
    todo = list(range(len(candidates)))
    python = str(device.root / "usr/bin/python3")
    while todo:
        with tempfile.TemporaryDirectory(prefix="mbcompile-candidates-") as tmp:
            job = Path(tmp) / "job.json"
            job.write_text(json.dumps([candidates[i] for i in todo]))
            counts, proc = run_counted(device, [python, str(GUEST), "kernels", str(job)],
                                       cpu=cpu, timeout=timeout, check=False)
        reported = {}
        for line in proc.stdout.splitlines():
            found = re.match(r"(ok|error) (\d+)(?:: (.*))?$", line)
            if found:
                reported[int(found.group(2))] = found.group(3)
        for j, i in enumerate(todo):
            if j not in reported:
                continue
            why = reported[j]
            if why is not None:
                results[i] = (None, f"the emulated device failed on it: {why}")
            elif counts is not None:  # the kernel's own instructions, not the call's
                classes = in_library(counts, Path(candidates[i]["path"]))
                results[i] = (candidate_seconds(classes, cost), None)
        if counts is not None:
            break
        # The process died: the first unreported candidate took it down. The plugin's counts
        # died with it, so the candidates that ran well run again, with those after it.
        crashed = next((j for j in range(len(todo)) if j not in reported), None)
        if crashed is None:
            break
        tail = " ".join(proc.stderr.strip().splitlines()[-2:])[:300]
        results[todo[crashed]] = (None, f"it took the emulated process over {timeout:.0f} s"
                                  if proc.returncode == 124 else
                                  f"the emulated process died on it (exit {proc.returncode}): "
                                  f"{tail}")
        todo = [i for j, i in enumerate(todo)
                if (j < crashed and reported.get(j, "") is None) or j > crashed]
    for i, (seconds, why) in enumerate(results):
        if seconds is None and why == "not run":
            results[i] = (None, "the emulated process ended before counting it")
    return results


def counting_runner(cost: str = "a76", *, cpu: str = "cortex-a76", workers: int = 1,
                    timeout: float = 600, emulator_dir: str | None = None):
    """A MetaSchedule runner (made in the tuning search process, so a module-level function)
    counting candidates on the built emulated device (``emulator_dir``, default its cache).
    ``workers`` emulated processes share each batch."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import LocalRunnerFuture, PyRunner

    check_cost(cost)
    device = cached(Path(emulator_dir) if emulator_dir else None)
    if device is None:
        raise EmulatorError("the emulated device is not built; run `mbcompile emulator build`")

    @derived_object
    class CountingRunner(PyRunner):
        def run(self, runner_inputs):
            candidates = [
                {"path": str(r.artifact_path), "args": [a.as_json() for a in r.args_info]}
                for r in runner_inputs
            ]
            parts = [candidates[k::workers] for k in range(workers)]
            with ThreadPoolExecutor(workers) as pool:
                done = list(pool.map(
                    lambda part: count_candidates(device, part, cost=cost, cpu=cpu,
                                                  timeout=timeout), parts))
            results = [None] * len(candidates)
            for k, part in enumerate(done):
                for j, result in enumerate(part):
                    results[k + j * workers] = result
            return [LocalRunnerFuture(res=[s], error_message=None) if s is not None
                    else LocalRunnerFuture(res=None, error_message=why)
                    for s, why in results]

    return CountingRunner()
