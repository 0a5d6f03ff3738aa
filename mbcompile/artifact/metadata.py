"""What an artifact says about its model: one typed object, the same before and after save/load.

The compile driver builds a :class:`Metadata`; ``archive.write`` stores ``to_dict()`` as
``metadata.json`` (with the file-level keys ``format``, ``format_version`` and ``members``, which
belong to the zip, not to the model), and ``archive.read`` gives back ``Metadata.from_dict`` of
it. The JSON keys are those of format version 1, so artifacts written before this type existed
read the same.

``from_dict`` trusts nothing; each refusal is an ArtifactError naming the key (as a path, e.g.
``signature.outputs[1].shape[0]``), the value and what was expected. ``signature`` says how the
library is called, so it is checked field by field and across fields before anything reaches the
runtime, and unknown keys in it are refused (ignoring one could change outputs silently). The
other keys describe; each is type-checked (``target`` as deeply as the runtime reads it), and
unknown top-level keys are ignored, so a writer may add a description without a format bump
(``options`` came that way). Nesting deeper than ``MAX_DEPTH`` is refused anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from mbcompile.errors import ArtifactError
from mbcompile.signature import OutputSpec, Signature

# Keys of metadata.json that describe the zip file itself (written and checked by archive.py).
FILE_KEYS = ("format", "format_version", "members")
# Deepest nesting accepted (the metadata compile writes nests 5 levels deep).
MAX_DEPTH = 64
# Largest count or dimension in a signature. The runtime allocates arrays of the input shape on
# every call; this is far past any MobileBERT and keeps a crafted shape from asking for exabytes.
MAX_SIZE = 2**31 - 1
# Output dtypes a compiled library can return as numpy arrays.
DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64")


@dataclass(frozen=True)
class Metadata:
    """The model, target, versions and compile report of one compiled library."""

    signature: Signature
    # transformers' MobileBertConfig.to_dict() of the compiled model.
    config: dict[str, Any]
    # The target's table entry (``Target.to_dict()``: name, arch, llvm attributes, export...).
    target: dict[str, Any]
    # The TVM target the library was built for, as TVM prints it (JSON).
    tvm_target: str = ""
    # The tuning database applied (a folder), or None.
    tuning_db: str | None = None
    # Kernels whose schedule came from that database (0: none of its workloads matched).
    tuned_kernels: int = 0
    # mbcompile, tvm, torch, transformers and python versions at compile time.
    versions: dict[str, str] = field(default_factory=dict)
    # What the passes did (per-pass rows, the final module's statistics), the accuracy check.
    report: dict[str, Any] = field(default_factory=dict)
    # Seconds per compile stage (capture, passes, build, link).
    compile_seconds: dict[str, float] = field(default_factory=dict)
    # The compile options as given (CompileOptions.to_dict()).
    options: dict[str, Any] = field(default_factory=dict)
    # Where the model came from: name_or_path (a folder or hub id), revision (hub commit) or {}.
    source: dict[str, str] = field(default_factory=dict)

    @property
    def model_class(self) -> str:
        return self.signature.model_class

    @property
    def head(self) -> str:
        return self.signature.head

    @property
    def precision(self) -> str:  # compiled before the option existed: fp32
        return str(self.options.get("precision", "fp32"))

    @property
    def target_name(self) -> str:
        return str(self.target.get("name", "?"))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["signature"] = self.signature.to_dict()
        out["model_class"] = self.model_class
        out["head"] = self.head
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "metadata") -> Metadata:
        """Read metadata.json's dict (``where`` names it in errors, e.g. "model.mbc:
        metadata.json"); ArtifactError names the key that is missing or malformed."""
        if not isinstance(data, dict):
            raise invalid(where, "the metadata", data, "a JSON object")
        _check_depth(where, data)
        values = _fields(where, "", data, _METADATA_CHECKS, cls, strict=False)
        for key in ("model_class", "head"):  # copies of the signature's, written for readers
            if key in data and data[key] != getattr(values["signature"], key):
                raise invalid(
                    where,
                    key,
                    data[key],
                    f"{getattr(values['signature'], key)!r}, as in signature.{key}",
                )
        return cls(**values)


# -- messages --------------------------------------------------------------------------------


_KINDS = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
          ((list, tuple), "a list"), (dict, "an object"))


def _kind(value: Any) -> str:
    """The JSON name of a value's type."""
    if value is None:
        return "null"
    return next((name for t, name in _KINDS if isinstance(value, t)), type(value).__name__)


def _show(value: Any) -> str:
    """A value for a message: scalars and short flat lists as written, other containers by kind."""
    scalars = (int, float, str, type(None))
    flat = isinstance(value, (list, tuple)) and len(value) <= 8
    flat = flat and all(isinstance(v, scalars) for v in value)
    if isinstance(value, (dict, list, tuple)) and not flat:
        return _kind(value)
    try:
        shown = repr(list(value) if flat else value)
    except ValueError:  # an integer of more than 4300 digits
        return "a very large integer"
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{shown} ({_kind(value)})"


def invalid(where: str, key: str, value: Any, expected: str) -> ArtifactError:
    """The error for a bad metadata value: file, key path, the value (shortened) and what was
    expected. ``archive`` uses it for the file-level keys too."""
    return ArtifactError(f"{where}: {key} is {_show(value)}; expected {expected}")


def _check_depth(where: str, data: Any) -> None:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ArtifactError(f"{where}: the metadata nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


# -- value checks: each takes (where, key, value) and returns the value to store ------------

Check = Callable[[str, str, Any], Any]


def _accepting(accepts: Callable[[Any], bool], expected: str) -> Check:
    """A check that passes the values ``accepts`` says yes to, and names ``expected`` if not."""

    def check(where: str, key: str, value: Any) -> Any:
        if not accepts(value):
            raise invalid(where, key, value, expected)
        return value

    return check


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(low: int, high: int = MAX_SIZE) -> Check:
    return _accepting(lambda v: _is_int(v) and low <= v <= high, f"an integer in [{low}, {high}]")


def _is_seconds(value: Any) -> bool:
    finite = _is_int(value) or (isinstance(value, float) and math.isfinite(value))
    return finite and value >= 0


_text = _accepting(lambda v: isinstance(v, str), "a string")
_name = _accepting(lambda v: isinstance(v, str) and v != "", "a non-empty string")
_flag = _accepting(lambda v: isinstance(v, bool), "true or false")
_object = _accepting(
    lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "an object"
)
_seconds = _accepting(_is_seconds, "a finite number of seconds >= 0")
_dtype = _accepting(lambda v: v in DTYPES, f"one of {list(DTYPES)}")


def _optional(check: Check) -> Check:
    def optional(where: str, key: str, value: Any) -> Any:
        return None if value is None else check(where, key, value)

    return optional


def _list_of(check: Check) -> Check:
    def list_of(where: str, key: str, value: Any) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise invalid(where, key, value, "a list")
        return tuple(check(where, f"{key}[{i}]", v) for i, v in enumerate(value))

    return list_of


def _object_of(check: Check) -> Check:
    def object_of(where: str, key: str, value: Any) -> dict:
        _object(where, key, value)
        for k, v in value.items():
            check(where, f"{key}[{k!r}]", v)
        return value

    return object_of


def _fields(where: str, key: str, data: Any, checks: dict[str, Check], cls, strict: bool) -> dict:
    """Check an object whose keys are the fields of dataclass ``cls``: fields without a default
    are required; keys not in ``checks`` are refused (``strict``) or ignored."""
    prefix = f"{key}." if key else ""
    if not isinstance(data, dict):
        raise invalid(where, key, data, "an object")
    if strict:
        unknown = sorted(str(k) for k in data if k not in checks)
        if unknown:
            raise ArtifactError(
                f"{where}: {key} has unknown keys {unknown}; known: {sorted(checks)} (an "
                f"artifact from a newer mbcompile? recompile it with this one)"
            )
    values = {}
    for f in fields(cls):
        if f.name in data:
            values[f.name] = checks[f.name](where, prefix + f.name, data[f.name])
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ArtifactError(f"{where}: {prefix}{f.name} is missing")
    return values


# -- the signature ----------------------------------------------------------------------------


def _output(where: str, key: str, data: Any) -> OutputSpec:
    spec = OutputSpec(**_fields(where, key, data, _OUTPUT_CHECKS, OutputSpec, strict=True))
    ndim = len(spec.shape)
    if not 1 <= ndim <= 32:  # numpy's limit
        raise invalid(where, f"{key}.shape", data["shape"], "a list of 1 to 32 dimensions")
    axes = [("seq_axes", a) for a in spec.seq_axes]
    if spec.masked_axis is not None:
        axes.append(("masked_axis", spec.masked_axis))
    for name, axis in axes:
        if not 0 <= axis < ndim:
            raise invalid(where, f"{key}.{name}", axis, f"an axis of the shape {list(spec.shape)}")
    if len(set(spec.seq_axes)) != len(spec.seq_axes) or spec.masked_axis in spec.seq_axes:
        raise invalid(
            where, f"{key}.seq_axes", data["seq_axes"], "distinct axes, none the masked_axis"
        )
    return spec


def _check_outputs(where: str, sig: Signature) -> None:
    """The outputs against the signature's other fields, as the runtime uses them."""
    if not sig.outputs:
        raise ArtifactError(f"{where}: signature.outputs is empty; expected at least one output")
    if len(set(sig.fields)) != len(sig.fields):
        raise invalid(where, "signature.fields", list(sig.fields), "distinct names")
    indices: dict[str, list[int | None]] = {}
    for i, spec in enumerate(sig.outputs):
        key = f"signature.outputs[{i}]"
        if spec.name not in sig.fields:
            raise invalid(
                where, f"{key}.name", spec.name, f"one of signature.fields {list(sig.fields)}"
            )
        indices.setdefault(spec.name, []).append(spec.index)
        if spec.masked_axis is None:
            continue
        if sig.max_masked is None:
            raise invalid(
                where, f"{key}.masked_axis", spec.masked_axis, "null: signature.max_masked is null"
            )
        # The runtime blanks unused slots by (batch row, slot): the slots are axis 1.
        if spec.masked_axis != 1 or spec.shape[1] != sig.max_masked:
            raise invalid(
                where,
                f"{key}.masked_axis",
                spec.masked_axis,
                f"1, with shape[1] == max_masked ({sig.max_masked}); shape is {list(spec.shape)}",
            )
        if not spec.dtype.startswith("float"):  # unused slots are NaN
            raise invalid(where, f"{key}.dtype", spec.dtype, "a float dtype for masked logits")
    for name, found in indices.items():
        if found != [None] and found != list(range(len(found))):
            raise invalid(
                where,
                f"signature.outputs[*].index for field {name!r}",
                found,
                "one output with index null, or indices 0, 1, 2, ... in order",
            )


def _signature(where: str, key: str, data: Any) -> Signature:
    values = _fields(where, key, data, _SIGNATURE_CHECKS, Signature, strict=True)
    if "outputs" in data:
        values["outputs"] = tuple(
            _output(where, f"{key}.outputs[{i}]", o) for i, o in enumerate(values["outputs"])
        )
    sig = Signature(**values)
    if (sig.num_choices is not None) != (sig.head == "multiple-choice"):
        raise invalid(
            where,
            f"{key}.num_choices",
            sig.num_choices,
            f"an integer for the multiple-choice head and null for others (head is {sig.head!r})",
        )
    elements = math.prod(sig.input_shape)
    if elements > MAX_SIZE:
        raise ArtifactError(
            f"{where}: {key}.batch_size, num_choices and seq_len make an input shape "
            f"{list(sig.input_shape)} of {elements} elements; expected at most {MAX_SIZE}"
        )
    if (sig.max_masked is None) != (sig.mask_token_id is None):
        raise invalid(
            where, f"{key}.mask_token_id", sig.mask_token_id, "set exactly when max_masked is set"
        )
    lens, expected = list(sig.seq_lens), f"[] or ≤ 64 ascending lengths ending at {sig.seq_len}"
    if lens and (lens != sorted(set(lens)) or lens[-1] != sig.seq_len or len(lens) > 64):
        raise invalid(where, f"{key}.seq_lens", lens, expected)
    if sig.max_masked is not None:
        _int_in(1, sig.lengths[0])(where, f"{key}.max_masked", sig.max_masked)
        _int_in(0, sig.vocab_size - 1)(where, f"{key}.mask_token_id", sig.mask_token_id)
    _check_outputs(where, sig)
    return sig


_OUTPUT_CHECKS: dict[str, Check] = {
    "name": _name,
    "shape": _list_of(_int_in(1)),
    "dtype": _dtype,
    "seq_axes": _list_of(_int_in(0)),
    "index": _optional(_int_in(0)),
    "masked_axis": _optional(_int_in(0)),
}
_SIGNATURE_CHECKS: dict[str, Check] = {
    "model_class": _name,
    "head": _name,
    "batch_size": _int_in(1),
    "seq_len": _int_in(1),
    "num_choices": _optional(_int_in(1)),
    "vocab_size": _int_in(1),
    "type_vocab_size": _int_in(1),
    "outputs": _list_of(lambda where, key, value: value),  # each checked by _output
    "fields": _list_of(_name),
    "max_masked": _optional(_int_in(1)),
    "mask_token_id": _optional(_int_in(0)),
    "takes_lengths": _flag,
    "seq_lens": _list_of(_int_in(1)),
}

# -- the target (read by the runtime as targets.registry.Target.from_dict) -------------------

_TARGET_CHECKS: dict[str, tuple[Check, bool]] = {  # key: (check, required)
    "name": (_name, True),
    "description": (_text, True),
    "arch": (_name, True),
    "llvm": (_object, True),
    "features": (_list_of(_name), True),
    "export": (_name, True),
    "num_cores": (_optional(_int_in(1)), False),
}


def _target(where: str, key: str, data: Any) -> dict:
    """Checked, and stored as written (other keys are kept and ignored, as Target ignores them)."""
    _object(where, key, data)
    for name, (check, required) in _TARGET_CHECKS.items():
        if name in data:
            check(where, f"{key}.{name}", data[name])
        elif required:
            raise ArtifactError(f"{where}: {key}.{name} is missing")
    return data


_METADATA_CHECKS: dict[str, Check] = {
    "signature": _signature,
    "config": _object,
    "target": _target,
    "tvm_target": _text,
    "tuning_db": _optional(_text),
    "tuned_kernels": _int_in(0, 2**63 - 1),
    "versions": _object_of(_text),
    "report": _object,
    "compile_seconds": _object_of(_seconds),
    "options": _object,
    "source": _object_of(_text),
}
