"""A compiled MobileBERT, called from Python: numpy or torch in, the same kind out.

Needs numpy and TVM only; torch is imported only to return torch tensors to a caller who passed
them (and so is already using torch).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mbcompile import artifact
from mbcompile.artifact import Artifact, Metadata
from mbcompile.errors import InputError, InputTypeError, ModelClosedError, RemoteError
from mbcompile.runtime.inputs import (
    find_masked_positions,
    mask_within_lengths,
    pad_to,
    prepare,
    real_lengths,
)
from mbcompile.runtime.library import Library
from mbcompile.runtime.outputs import ModelOutput
from mbcompile.runtime.program import LocalProgram, default_threads
from mbcompile.runtime.shaping import blank_unused, cut, group_choices, ungroup_choices
from mbcompile.signature import Signature


def _like_input(arr: np.ndarray, as_torch: bool):
    if not as_torch:
        return arr
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr))


class CompiledModel:
    """A compiled MobileBERT head, callable like the Hugging Face model it came from."""

    def __init__(
        self, art: Artifact, program=None, *, library: Library | None = None, reference=None
    ):
        self.metadata: Metadata = art.metadata
        # The PyTorch model ``compile`` was given (for ``accuracy``); None for a loaded artifact.
        self.reference = reference
        self.signature: Signature = art.metadata.signature
        # The tokenizer's files (vocab.txt, tokenizer.json, ...) saved with the model; {} if none.
        self.tokenizer_files: dict[str, bytes] = dict(art.tokenizer)
        self._library = library if library is not None else Library(art.lib)
        # Anything with run(list of static-shape int64 arrays) -> list of output arrays, and close().
        self._program = (
            program
            if program is not None
            else LocalProgram(self._library, art.metadata.target, art.metadata.signature)
        )

    @property
    def program(self):
        """What runs ``main``: a ``LocalProgram`` here, or a remote device's program."""
        return self._program

    @property
    def library_bytes(self) -> bytes:
        """The linked shared library (``lib.so``), weights included."""
        return self._library.bytes

    @property
    def artifact(self) -> Artifact:
        """The model as bytes: metadata, library and tokenizer files (what ``save`` writes)."""
        return Artifact(self.metadata, self._library.bytes, dict(self.tokenizer_files))

    def close(self) -> None:
        """End this model's programs (VMs, remote sessions); calling it afterwards raises.
        Also done by garbage collection. (The library itself stays loaded for the process and
        is shared by every later load of the same artifact: TVM does not unload libraries.)"""
        if self._program is not None:
            self._program.close()
            self._program = None

    def __enter__(self) -> CompiledModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def with_threads(self, num_threads: int | None) -> CompiledModel:
        """The same model running its kernels on ``num_threads`` threads per call (None: every
        CPU this process may use, or ``TVM_NUM_THREADS``). Models share the loaded library."""
        check_threads(num_threads)
        if self._program is None:
            raise ModelClosedError(f"{self!r} is closed; load the artifact again to run it")
        if not isinstance(self._program, LocalProgram):
            raise InputError("num_threads applies to a model run on this machine's CPU")
        program = LocalProgram(
            self._library, self.metadata.target, self.signature, num_threads=num_threads
        )
        return self.with_program(program)

    def benchmark(self, *args, runs: int = 20, warmup: int = 2, pause: float = 0.0, **inputs) -> dict:
        """Time ``runs`` calls on these inputs (the arguments of a call), after ``warmup``
        untimed ones, ``pause`` s apart (a spinning thread pool takes a core from whatever
        runs next on a busy machine). Returns the latencies (ms), their median, mean, p90,
        min and max, the process's peak resident memory (MB, ``getrusage``), the threads per
        call and the compiled length that ran."""
        import resource
        import statistics
        import time

        if not isinstance(runs, int) or isinstance(runs, bool) or runs < 1:
            raise InputError(f"runs must be a positive integer, got {runs!r}")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise InputError(f"warmup must be a non-negative integer, got {warmup!r}")
        for _ in range(warmup):
            self(*args, **inputs)
        times = []
        for _ in range(runs):
            if pause:
                time.sleep(pause)
            start = time.perf_counter()
            self(*args, **inputs)
            times.append((time.perf_counter() - start) * 1e3)
        ordered = sorted(times)
        ids = args[0] if args else inputs.get("input_ids")
        length = np.asarray(ids).shape[-1] if ids is not None else None
        program = self._program
        # kernel threads per call here (None for a remote device: its server decides)
        threads = (
            (program.num_threads or default_threads())
            if isinstance(program, LocalProgram)
            else None
        )
        return {
            "runs": runs,
            "latency_ms": times,
            "median_ms": statistics.median(times),
            "mean_ms": statistics.fmean(times),
            "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "min_ms": ordered[0],
            "max_ms": ordered[-1],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": threads,
            "compiled_length": None if length is None else self.signature.fitting_length(length),
        }

    def __reduce__(self):
        """Pickled as its artifact (metadata, library, tokenizer files) and its threads per
        call, so that the model goes to worker processes (multiprocessing, joblib, Ray) and is
        loaded there on its first call; the PyTorch ``reference`` stays behind."""
        if self._program is None:
            raise ModelClosedError(f"{self!r} is closed: load the artifact again to pickle it")
        if not isinstance(self._program, LocalProgram):
            raise RemoteError(
                f"{self!r} runs on a remote device and cannot be pickled: pickle the artifact's "
                "path and load it where it is needed"
            )
        return _unpickle, (self.artifact, self._program.num_threads)

    def with_program(self, program) -> CompiledModel:
        """The same model (signature, checks, outputs) with ``main`` run by ``program``."""
        return CompiledModel(
            self.artifact, program, library=self._library, reference=self.reference
        )

    def accuracy(self, inputs, reference=None) -> dict:
        """This model's outputs against PyTorch fp32 on ``inputs``: texts (tokenized with the
        artifact's tokenizer), a dict of input arrays, or a list of such dicts. ``reference``:
        the PyTorch model, a checkpoint folder or hub id to load it from, or an ONNX file (run
        by ONNX Runtime); default: the model ``compile`` was given. Per output: max abs and
        relative error, cosine similarity, top-1 agreement of logits (``runtime/accuracy.py``)."""
        from mbcompile.runtime import accuracy

        return accuracy.report(self, inputs, self.reference if reference is None else reference)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        *,
        masked_positions=None,
        lengths=None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ModelOutput | tuple:
        """Run on numpy arrays or torch tensors. Returns HF's ModelOutput (fields by name or
        index); a tuple with ``return_dict=False``, or when the model's config says
        ``return_dict: false`` and the call does not say, as HF's model does.

        ``lengths`` (optional, the input's shape without its last axis): each row's real length,
        when the caller padded rows of different lengths together (as the pipelines do); the
        outputs at the real positions are then those of each row alone, whatever the padding
        (without ``attention_mask``, the mask is the positions before each length). Without it
        every given position is real, as in Hugging Face. The runtime's own padding
        (up to the compiled ``seq_len`` and ``batch_size``) never changes the outputs.
        """
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise InputTypeError(
                f"unsupported inputs {unsupported}; a compiled model takes input_ids, "
                f"attention_mask and token_type_ids"
            )
        sig = self.signature
        inp, real, positions, choices = self._checked(
            input_ids, attention_mask, token_type_ids, lengths, masked_positions
        )
        length = inp.input_ids.shape[-1]
        program = self._program
        if program is None:
            raise ModelClosedError(f"{self!r} is closed; load the artifact again to run it")
        parts = list(self._chunks(inp, real, positions))
        calls = [arrays for _, _, arrays in parts]
        # several chunks: side by side where the program can (LocalProgram.run_many)
        if len(calls) > 1 and hasattr(program, "run_many"):
            results = program.run_many(calls)
        else:
            results = [program.run(arrays) for arrays in calls]
        chunks: list[list[np.ndarray]] = [
            [
                cut(o, spec, stop - start, spec.shape[0] // sig.batch_size, length, positions)
                for o, spec in zip(outs, sig.outputs)
            ]
            for (start, stop, _), outs in zip(parts, results)
        ]

        flat = [np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0] for parts in zip(*chunks)]
        if choices is not None:
            flat = [ungroup_choices(a, spec, sig, choices) for a, spec in zip(flat, sig.outputs)]
        if positions is not None:
            flat = [blank_unused(a, spec, positions) for a, spec in zip(flat, sig.outputs)]
        out = self._assemble(flat, inp.as_torch)
        if positions is not None:
            out["masked_positions"] = _like_input(positions, inp.as_torch)
        if return_dict is None:
            return_dict = (self.metadata.config or {}).get("return_dict", True) is not False
        return out if return_dict else out.to_tuple()

    def program_inputs(
        self, input_ids, attention_mask=None, token_type_ids=None, *, lengths=None,
        masked_positions=None,
    ) -> list[np.ndarray]:
        """The arrays the compiled function takes for the first ``batch_size`` rows of these
        inputs, checked and padded to the shortest compiled length that holds them: for timing a program directly (e.g.
        ``compiled.program.time(...)`` on a remote device)."""
        inp, real, positions, _ = self._checked(
            input_ids, attention_mask, token_type_ids, lengths, masked_positions
        )
        return next(self._chunks(inp, real, positions))[2]

    def _checked(self, input_ids, attention_mask, token_type_ids, lengths, masked_positions):
        """The checked inputs, each row's real length, the masked positions (or None), and the
        caller's number of choices when it differs from the compiled one (the inputs are then
        regrouped by ``group_choices``; else None)."""
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
        real = real_lengths(sig, inp.input_ids, lengths)
        if lengths is not None:
            inp = mask_within_lengths(inp, real, mask_given=attention_mask is not None)
        choices = None
        if sig.num_choices is not None and inp.input_ids.shape[1] != sig.num_choices:
            choices = inp.input_ids.shape[1]
            inp, real = group_choices(inp, real, sig.num_choices)
        return inp, real, positions, choices

    def _chunks(self, inp, real: np.ndarray, positions):
        """(start, stop, arrays for the compiled function) per ``batch_size`` rows, padded to
        the shortest compiled length that holds the input (``Signature.fitting_length``):
        padding ids 0, mask 0, types 0, lengths 0 (a padded row), positions 0."""
        sig = self.signature
        shape = sig.input_shape_for(sig.fitting_length(inp.input_ids.shape[-1]))
        for start in range(0, inp.input_ids.shape[0], sig.batch_size):
            stop = min(start + sig.batch_size, inp.input_ids.shape[0])
            arrays = [
                pad_to(a[start:stop], shape)
                for a in (inp.input_ids, inp.attention_mask, inp.token_type_ids)
            ]
            if sig.takes_lengths:
                arrays.append(pad_to(real[start:stop], shape[:-1]))
            if positions is not None:
                arrays.append(
                    pad_to(np.maximum(positions[start:stop], 0), (sig.batch_size, sig.max_masked))
                )
            yield start, stop, arrays

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
    def save(self, path: str | os.PathLike, tokenizer_files: dict[str, bytes] | None = None) -> Path:
        """Write the artifact (one file, written atomically), with the tokenizer files
        (``tokenizer_files``, else those the model came with) so pipelines need no tokenizer."""
        files = self.tokenizer_files if tokenizer_files is None else tokenizer_files
        return artifact.write(path, self.metadata, self._library.bytes, tokenizer=files)

    def report(self) -> dict:
        """What the compiler did: per-pass fire counts and the final module's statistics."""
        return dict(self.metadata.report)

    @property
    def target(self) -> str:
        return self.metadata.target_name

    def __repr__(self) -> str:
        sig = self.signature
        return (
            f"CompiledModel({sig.model_class}, input shape {sig.input_shape}, "
            f"target {self.target!r}, outputs {list(sig.output_names)})"
        )


def check_threads(num_threads) -> None:
    if num_threads is not None and (
        not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1
    ):
        raise InputError(f"num_threads must be a positive integer or None, got {num_threads!r}")


def _unpickle(art: Artifact, num_threads: int | None) -> CompiledModel:
    model = CompiledModel(art)
    return model if num_threads is None else model.with_threads(num_threads)


def load(
    path: str | os.PathLike,
    expected_sha256: str | None = None,
    num_threads: int | None = None,
) -> CompiledModel:
    """Load a saved artifact to run here. Needs numpy and TVM only (no torch, no transformers).

    ``expected_sha256``: the SHA-256 of the whole file (``sha256sum model.mbc``); a different
    file is refused before anything in it is read or any of its native code loads.

    ``num_threads``: kernel threads per call (default: every CPU this process may use, or
    ``TVM_NUM_THREADS``).

    (``mbcompile.load(path, remote=...)`` runs it on another device; see ``mbcompile.devices``.)
    """
    check_threads(num_threads)
    model = CompiledModel(artifact.read(path, expected_sha256=expected_sha256))
    return model if num_threads is None else model.with_threads(num_threads)
