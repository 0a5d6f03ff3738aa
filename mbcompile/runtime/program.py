"""Running the compiled functions on this machine's CPU, and the thread count it runs on."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mbcompile.errors import ArtifactError, TargetError
from mbcompile.runtime.library import Library
from mbcompile.signature import Signature

# Threads the kernels run on (None: not yet decided), and the caller threads whose TVM thread
# pool has been given that count. TVM keeps one pool per calling thread, so each is set once.
_threads: int | None = None
_configured = threading.local()


def use_all_cpus() -> int:
    """Give the calling thread's TVM thread pool one thread per CPU this process may run on,
    unless ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) says otherwise; returns the thread count.

    Left alone, TVM 0.27 assumes two hardware threads per core on x86 and takes half the CPUs:
    one thread on a 2-CPU machine without SMT, half the speed of two.
    """
    global _threads
    if getattr(_configured, "threads", None) is not None:
        return _configured.threads
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").strip().isdigit() and int(os.environ[name]) > 0:
            _threads = _configured.threads = int(os.environ[name])  # TVM reads it itself
            return _threads
    import tvm

    cpus = _cpus()
    # -3: the threads share all the listed CPUs (no pinning of one thread per CPU)
    tvm.get_global_func("runtime.config_threadpool")(-3, len(cpus), [str(c) for c in cpus])
    _threads = _configured.threads = len(cpus)
    return _threads


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _one_kernel_thread() -> None:
    """Give the calling thread (a batch worker) a TVM thread pool of one thread."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(-3, 1, [str(c) for c in _cpus()])
    _configured.threads = 1


# Worker threads that run the chunks of one batch side by side, one kernel thread each.
_batch_pool: tuple[int, ThreadPoolExecutor] | None = None
_batch_pool_lock = threading.Lock()


def _batch_workers(count: int) -> ThreadPoolExecutor:
    global _batch_pool
    with _batch_pool_lock:
        if _batch_pool is None or _batch_pool[0] != count:
            pool = ThreadPoolExecutor(
                count, thread_name_prefix="mbcompile-batch", initializer=_one_kernel_thread
            )
            _batch_pool = (count, pool)
        return _batch_pool[1]


class LocalProgram:
    """Runs the compiled functions on this machine's CPU with the Relax VM: for inputs of ``n``
    tokens, the function compiled for ``n`` (``Signature.function_for``).

    Thread-safe: a Relax VM is not re-entrant (two threads in one VM crash it), so each calling
    thread gets its own VM over the one loaded library (a VM costs about 50 µs and no memory
    worth counting: the weights are the library's), and its own TVM thread pool.

    A program is anything with ``run(list of static-shape int64 arrays) -> list of output
    arrays`` and ``close()``; ``mbcompile.devices.remote.RemoteProgram`` is the other one.
    """

    def __init__(self, library: Library, target: dict, signature: Signature | None = None):
        self._library = library
        self._target = target
        self._signature = signature
        self._checked = False
        self._local = threading.local()

    def _machine(self):
        vm = getattr(self._local, "vm", None)
        if vm is None:
            if not self._checked:
                from mbcompile.targets.registry import Target, can_run_here

                reason = can_run_here(Target.from_dict(self._target))
                if reason is not None:
                    raise TargetError(f"cannot run here: {reason}")
                self._checked = True
            import tvm

            use_all_cpus()
            vm = tvm.relax.VirtualMachine(self._library.module(), tvm.cpu())
            self._local.vm = vm
        return vm

    def _function(self, vm, arrays: list[np.ndarray]) -> str:
        """The library function for inputs of this length (``main`` without a signature), its
        parameters checked against the signature on first use."""
        if self._signature is None:
            return "main"
        length = int(arrays[0].shape[-1]) if arrays and arrays[0].ndim else 0
        if length not in self._signature.lengths:
            raise ArtifactError(
                f"no compiled function takes {length} tokens; the compiled lengths are "
                f"{list(self._signature.lengths)} (pad the inputs to one of them)"
            )
        name = self._signature.function_for(length)
        checked = self._local.__dict__.setdefault("checked", set())
        if name not in checked:
            self._check_parameters(vm, name)
            checked.add(name)
        return name

    def _check_parameters(self, vm, name: str) -> None:
        """The library's function ``name`` takes the inputs the metadata describes, by name and
        count; ArtifactError before anything runs if not (crafted or mismatched metadata)."""
        try:
            arity = int(vm.module["get_function_arity"](name))
            names = tuple(str(vm.module["get_function_param_name"](name, i)) for i in range(arity))
        except (RuntimeError, ValueError, AttributeError) as err:
            raise ArtifactError(
                f"the artifact's metadata does not match its library: the library has no "
                f"function {name!r} ({' '.join(str(err).split())[:200]}); recompile the model"
            ) from None
        if names != self._signature.input_names:
            raise ArtifactError(
                f"the artifact's metadata does not match its library: the library's {name} "
                f"takes {list(names)}, the metadata describes "
                f"{list(self._signature.input_names)}; recompile the model"
            )

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import tvm

        vm = self._machine()
        name = self._function(vm, arrays)
        try:
            result = vm[name](*(tvm.runtime.tensor(a) for a in arrays))
        except (RuntimeError, ValueError) as err:
            text = " ".join(str(err).split())[:400]
            if "loc=param" in text:  # TVM checks the shapes main was built for
                raise ArtifactError(
                    "the artifact's metadata does not match its library: the library refused "
                    f"inputs shaped as the metadata describes ({text}); recompile the model"
                ) from None
            raise ArtifactError(f"the compiled library failed while running: {text}") from None
        if isinstance(result, tvm.runtime.Tensor):
            result = [result]
        outs = [r.numpy() for r in result]
        self._check_outputs(outs, int(arrays[0].shape[-1]))
        return outs

    def run_many(self, calls: Sequence[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """``run`` of each call, in order. Several calls (the chunks of one batch) run side by
        side, one per CPU, each on one kernel thread: on short inputs a kernel's work is too
        small to split well over threads, and rows are independent, so splitting the batch
        instead gives more texts per second (``bench.lengths`` measures batch 8 against 1)."""
        workers = min(use_all_cpus(), len(calls))
        if workers < 2 or os.environ.get("MBCOMPILE_BATCH_THREADS") == "0":
            return [self.run(arrays) for arrays in calls]
        return list(_batch_workers(use_all_cpus()).map(self.run, calls))

    def _check_outputs(self, outs: list[np.ndarray], length: int) -> None:
        """The library returned what the metadata describes (count, shapes, dtypes)."""
        if self._signature is None:
            return
        sig = self._signature
        got = [(tuple(o.shape), str(o.dtype)) for o in outs]
        want = [(sig.output_shape_for(s, length), s.dtype) for s in sig.outputs]
        if got != want:
            raise ArtifactError(
                f"the artifact's metadata does not match its library: the library returned "
                f"{got}, the metadata describes {want}; recompile the model"
            )

    def close(self) -> None:
        """Drop the VMs (the library stays loaded for the model's other programs)."""
        self._local = threading.local()
