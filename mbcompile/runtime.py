"""Run a compiled MobileBERT from Python: numpy or torch in, the same kind out.

Needs numpy and TVM only; torch is imported only to return torch tensors to a caller who passed
them (and so is already using torch).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact
from .errors import InputError, TargetError
from .inputs import find_masked_positions, pad_to, prepare
from .outputs import ModelOutput
from .signature import Signature


def _like_input(arr: np.ndarray, as_torch: bool):
    if not as_torch:
        return arr
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr))


def _cut(arr: np.ndarray, spec, batch: int, length: int, positions) -> np.ndarray:
    """Drop batch padding, sequence padding and unused masked-position slots."""
    index: list[Any] = [slice(None)] * arr.ndim
    index[0] = slice(0, batch)
    for axis in spec.seq_axes:
        index[axis] = slice(0, length)
    if spec.masked_axis is not None:
        index[spec.masked_axis] = slice(0, positions.shape[1])
    return arr[tuple(index)]


def _blank_unused(arr: np.ndarray, spec, positions: np.ndarray) -> np.ndarray:
    """NaN where a row has fewer masked tokens than the batch's largest count (position -1)."""
    if spec.masked_axis is None or (positions >= 0).all():
        return arr
    arr = arr.copy()
    arr[positions < 0] = np.nan
    return arr


class _Library:
    """The compiled library: a TVM Executable just built, or the bytes of a saved ``lib.so``."""

    def __init__(self, executable=None, lib_bytes: bytes | None = None, export=None):
        self._executable = executable
        self._bytes = lib_bytes
        self._export = export  # callable(executable, path): links the shared library
        self._module = None

    def to_bytes(self) -> bytes:
        if self._bytes is None:
            with tempfile.TemporaryDirectory(prefix="mbcompile-") as tmp:
                path = os.path.join(tmp, artifact.LIB_MEMBER)
                self._export(self._executable, path)
                self._bytes = Path(path).read_bytes()
        return self._bytes

    def module(self):
        """The runtime module, loaded once (only for libraries this machine can run)."""
        if self._module is None:
            if self._executable is not None:
                self._module = self._executable
            else:
                import tvm

                with tempfile.TemporaryDirectory(prefix="mbcompile-") as tmp:
                    path = os.path.join(tmp, artifact.LIB_MEMBER)
                    Path(path).write_bytes(self._bytes)
                    with _without_scope_warnings():
                        self._module = tvm.runtime.load_module(path)
        return self._module


@contextlib.contextmanager
def _without_scope_warnings():
    """Drop the VM's "Scope Loaded" warning (one line per constant) from stderr while loading."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if "Warning: Scope Loaded" not in line:
                    sys.stderr.write(line)


# Threads the kernels run on, once set for this process (None: not yet).
_threads: int | None = None


def use_all_cpus() -> int:
    """Give TVM's thread pool one thread per CPU this process may run on, unless
    ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) says otherwise; returns the thread count.

    Left alone, TVM 0.27 assumes two hardware threads per core on x86 and takes half the CPUs:
    one thread on a 2-CPU machine without SMT, half the speed of two.
    """
    global _threads
    if _threads is not None:
        return _threads
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").strip().isdigit() and int(os.environ[name]) > 0:
            _threads = int(os.environ[name])  # TVM reads it itself
            return _threads
    import tvm

    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    # -3: the threads share all the listed CPUs (no pinning of one thread per CPU)
    tvm.get_global_func("runtime.config_threadpool")(-3, len(cpus), [str(c) for c in cpus])
    _threads = len(cpus)
    return _threads


class LocalProgram:
    """Runs the compiled ``main`` on this machine's CPU with the Relax VM."""

    def __init__(self, library: _Library, target: dict):
        self._library = library
        self._target = target
        self._vm = None

    def _machine(self):
        if self._vm is None:
            from mbcompile.targets.registry import Target, can_run_here

            reason = can_run_here(Target.from_dict(self._target))
            if reason is not None:
                raise TargetError(f"cannot run here: {reason}")
            import tvm

            use_all_cpus()
            self._vm = tvm.relax.VirtualMachine(self._library.module(), tvm.cpu())
        return self._vm

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import tvm

        result = self._machine()["main"](*(tvm.runtime.tensor(a) for a in arrays))
        if isinstance(result, tvm.runtime.Tensor):
            result = [result]
        return [r.numpy() for r in result]


class CompiledModel:
    """A compiled MobileBERT head, callable like the Hugging Face model it came from."""

    def __init__(
        self,
        signature: Signature,
        metadata: dict,
        library: _Library,
        program=None,
        tokenizer_files: Mapping[str, bytes] | None = None,
    ):
        self.signature = signature
        self.metadata = metadata
        self._library = library
        # The tokenizer's files (vocab.txt, tokenizer.json, ...) saved with the model; {} if none.
        self.tokenizer_files: dict[str, bytes] = dict(tokenizer_files or {})
        # Anything with run(list of static-shape int64 arrays) -> list of output arrays.
        self._program = program if program is not None else LocalProgram(library, metadata["target"])

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        *,
        masked_positions=None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ModelOutput | tuple:
        """Run on numpy arrays or torch tensors; ``return_dict=False`` gives a tuple, as HF's."""
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise TypeError(
                f"unsupported inputs {unsupported}; a compiled model takes input_ids, "
                f"attention_mask and token_type_ids"
            )
        sig = self.signature
        inp = prepare(sig, input_ids, attention_mask, token_type_ids)
        positions = None
        if sig.max_masked is not None:
            positions = find_masked_positions(sig, inp.input_ids, masked_positions)
        elif masked_positions is not None:
            raise InputError(
                "masked_positions: this model was compiled with logits at every position; "
                "compile with logits_for='masked' to request positions"
            )
        batch = inp.input_ids.shape[0]
        length = inp.input_ids.shape[-1]

        chunks: list[list[np.ndarray]] = []
        for start in range(0, batch, sig.batch_size):
            stop = min(start + sig.batch_size, batch)
            arrays = [
                pad_to(a[start:stop], sig.input_shape)
                for a in (inp.input_ids, inp.attention_mask, inp.token_type_ids)
            ]
            if positions is not None:
                arrays.append(pad_to(np.maximum(positions[start:stop], 0), (sig.batch_size, sig.max_masked)))
            outs = self._program.run(arrays)
            chunks.append([_cut(o, spec, stop - start, length, positions) for o, spec in zip(outs, sig.outputs)])

        flat = [np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0] for parts in zip(*chunks)]
        if positions is not None:
            flat = [_blank_unused(a, spec, positions) for a, spec in zip(flat, sig.outputs)]
        out = self._assemble(flat, inp.as_torch)
        if positions is not None:
            out["masked_positions"] = _like_input(positions, inp.as_torch)
        return out.to_tuple() if return_dict is False else out

    def _assemble(self, flat: list[np.ndarray], as_torch: bool) -> ModelOutput:
        flat = [_like_input(a, as_torch) for a in flat]
        out = ModelOutput((name, ()) for name in self.signature.fields)
        for spec, value in zip(self.signature.outputs, flat):
            if spec.index is None:
                out[spec.name] = value
            else:
                out[spec.name] = (*out[spec.name], value)
        return out

    # -- saving and describing -----------------------------------------------------------------
    def save(
        self, path: str | os.PathLike, tokenizer_files: Mapping[str, bytes] | None = None
    ) -> Path:
        """Write the artifact (one file, written atomically), with the tokenizer files
        (``tokenizer_files``, else those the model came with) so pipelines need no tokenizer."""
        meta = dict(self.metadata)
        meta["signature"] = self.signature.to_dict()
        files = self.tokenizer_files if tokenizer_files is None else tokenizer_files
        return artifact.write(path, meta, self._library.to_bytes(), tokenizer=files)

    def report(self) -> dict:
        """What the compiler did: per-pass fire counts and the final module's statistics."""
        return dict(self.metadata.get("report", {}))

    @property
    def target(self) -> str:
        return self.metadata["target"]["name"]

    def __repr__(self) -> str:
        sig = self.signature
        return (
            f"CompiledModel({sig.model_class}, input shape {sig.input_shape}, "
            f"target {self.target!r}, outputs {list(sig.output_names)})"
        )


def load(
    path: str | os.PathLike,
    remote: str | None = None,
    *,
    tracker: str | None = None,
    key: str | None = None,
) -> CompiledModel:
    """Load a saved artifact. Needs numpy and TVM only (no torch, no transformers).

    ``remote="HOST:PORT"`` runs it on the device behind that TVM RPC server instead of here, and
    ``tracker="HOST:PORT", key="KEY"`` on a device registered with that TVM RPC tracker (the
    library is uploaded once; same inputs and outputs as a local run).
    """
    if remote is not None or tracker is not None or key is not None:
        from .remote import load_remote

        return load_remote(path, remote, tracker=tracker, key=key)
    art = artifact.read(path)
    try:
        signature = Signature.from_dict(art.metadata["signature"])
    except (KeyError, TypeError) as err:
        raise artifact.ArtifactError(f"{path}: metadata has no valid signature ({err})") from None
    return CompiledModel(
        signature, art.metadata, _Library(lib_bytes=art.lib), tokenizer_files=art.tokenizer
    )
