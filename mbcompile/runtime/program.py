"""Running the compiled functions on this machine's CPU, and the thread count it runs on."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mbcompile.errors import ArtifactError, TargetError
from mbcompile.runtime.library import Library
from mbcompile.signature import Signature

# The thread count each calling thread's TVM pool was given (TVM keeps one pool per thread).
_configured = threading.local()


def _env_threads() -> int | None:
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").strip().isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    return None


def default_threads() -> int:
    """``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) if set, else the CPUs this process may use."""
    return _env_threads() or len(_cpus())


def use_threads(count: int | None = None) -> int:
    """Give the calling thread's TVM thread pool ``count`` threads (default
    :func:`default_threads`), if it has not that many already; returns the count.

    Left alone, TVM 0.27 assumes two hardware threads per core on x86 and takes half the CPUs:
    one thread on a 2-CPU machine without SMT, half the speed of two.
    """
    from_env = count is None and _env_threads() is not None
    count = default_threads() if count is None else count
    current = getattr(_configured, "threads", None)
    if current == count:
        return count
    if current is None and from_env:  # a new pool reads TVM_NUM_THREADS itself
        _configured.threads = count
        return count
    import tvm

    # -3: the threads share all the listed CPUs (no pinning of one thread per CPU)
    tvm.get_global_func("runtime.config_threadpool")(-3, count, [str(c) for c in _cpus()])
    _configured.threads = count
    return count


def use_all_cpus() -> int:
    """``use_threads()``: the default count for the calling thread's TVM thread pool."""
    return use_threads(None)


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


class _RunsOrOneChange:
    """Any number of VM calls at once, or one VM being made or dropped, process-wide.

    Making a Relax VM over a library while another thread's VM runs crashed the process
    (SIGSEGV in a map of TVM's runtime, inside the new VM's constructor): a VM is made (and
    dropped) only while no VM runs. Runs wait for a change that waits, so a steady stream of
    calls cannot starve it; a change waits for the calls in flight.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._changing = False
        self._waiting = 0

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        with self._cond:
            while self._changing or self._waiting:
                self._cond.wait()
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if not self._running:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def change(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._changing or self._running:
                self._cond.wait()
            self._waiting -= 1
            self._changing = True
        try:
            yield
        finally:
            with self._cond:
                self._changing = False
                self._cond.notify_all()


_VMS = _RunsOrOneChange()


# Worker threads that run the chunks of one batch side by side, one kernel thread each.
_batch_pool: tuple[int, ThreadPoolExecutor] | None = None
_batch_pool_lock = threading.Lock()


def _batch_workers(count: int) -> ThreadPoolExecutor:
    global _batch_pool
    with _batch_pool_lock:
        if _batch_pool is None or _batch_pool[0] != count:
            pool = ThreadPoolExecutor(count, thread_name_prefix="mbcompile-batch")
            _batch_pool = (count, pool)
        return _batch_pool[1]


# -- after fork -----------------------------------------------------------------------------
# A process forked (multiprocessing's default on Linux, gunicorn --preload, Celery, DataLoader
# workers) keeps only the thread that forked. If that thread ran kernels before, its TVM pool
# still counts on worker threads that the child does not have, and the next parallel kernel
# waits for them forever (TVM's ResetThreadPool would join them: a hang too). So in the child
# that thread's calls run on a thread of the child's own, whose pool is new; and the runtime's
# locks and pools, which the parent's other threads may have held, start afresh.
_stale_pool_thread: int | None = None
_after_fork: ThreadPoolExecutor | None = None


def _reset_after_fork() -> None:
    global _VMS, _batch_pool, _batch_pool_lock, _stale_pool_thread, _after_fork
    _VMS = _RunsOrOneChange()
    _batch_pool, _batch_pool_lock = None, threading.Lock()
    _after_fork = None
    # Whatever ran TVM code on this thread before (a model, compile's constant folding), its
    # pool is not to be trusted: the hand-over costs microseconds against a forward's ms.
    _stale_pool_thread = threading.get_ident()


def _forked_thread_runs(function, *args):
    """``function(*args)``, on a thread with a usable TVM pool (see ``_reset_after_fork``)."""
    global _after_fork
    if _stale_pool_thread != threading.get_ident():
        return function(*args)
    with _batch_pool_lock:
        if _after_fork is None:
            _after_fork = ThreadPoolExecutor(1, thread_name_prefix="mbcompile-after-fork")
    return _after_fork.submit(function, *args).result()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class LocalProgram:
    """Runs the compiled functions on this machine's CPU with the Relax VM: for inputs of ``n``
    tokens, the function compiled for ``n`` (``Signature.function_for``).

    Thread-safe: a Relax VM is not re-entrant (two threads in one VM crash it), so each calling
    thread gets its own VM over the one loaded library (a VM costs about 50 µs and no memory
    worth counting: the weights are the library's), and its own TVM thread pool.

    A program is anything with ``run(list of static-shape int64 arrays) -> list of output
    arrays`` and ``close()``; ``mbcompile.devices.remote.RemoteProgram`` is the other one.
    """

    def __init__(
        self,
        library: Library,
        target: dict,
        signature: Signature | None = None,
        num_threads: int | None = None,
    ):
        self._library = library
        # Kernel threads per call (None: ``default_threads()``), set on the calling thread's
        # TVM pool before each call (a pool is per calling thread, shared by its models).
        self.num_threads = num_threads
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

            module = self._library.module()
            with _VMS.change():
                vm = tvm.relax.VirtualMachine(module, tvm.cpu())
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
            with _VMS.change():  # looks functions up in the library, as making a VM does
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
        return self._run(arrays, self.num_threads)

    def _run(self, arrays: list[np.ndarray], threads: int | None) -> list[np.ndarray]:
        return _forked_thread_runs(self._run_here, arrays, threads)

    def _run_here(self, arrays: list[np.ndarray], threads: int | None) -> list[np.ndarray]:
        import tvm

        use_threads(threads)
        vm = self._machine()
        name = self._function(vm, arrays)
        try:
            with _VMS.run():
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
        threads = self.num_threads or default_threads()
        workers = min(threads, len(calls))
        if workers < 2 or os.environ.get("MBCOMPILE_BATCH_THREADS") == "0":
            return [self.run(arrays) for arrays in calls]
        return list(_batch_workers(threads).map(lambda arrays: self._run(arrays, 1), calls))

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
        with _VMS.change():
            self._local = threading.local()
