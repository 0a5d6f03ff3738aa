"""Fuzzing a compiled model's inputs (issue 14, point 5): whatever a caller passes as
``input_ids``, ``attention_mask``, ``token_type_ids`` or ``lengths`` (numpy arrays of every dtype,
rank and value, masked arrays, nested lists, torch tensors of every dtype, layout and device,
Python oddities), the call returns finite outputs of the input's shape or raises an mbcompile
error; never another exception, never a crash. Valid ids in any container and integer dtype give
PyTorch eager's numbers within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TOL
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mbcompile
from mbcompile.errors import InputError, MbcompileError

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SEQ = 16  # tiny_qa's compiled seq_len
VOCAB = 211  # tiny_config's vocab_size
ARGS = ("input_ids", "attention_mask", "token_type_ids", "lengths")

TORCH_DTYPES = sorted(
    {v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str
)
QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
NUMPY_DTYPES = [
    np.dtype(t)
    for t in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "longdouble", "complex64", "complex128", "clongdouble",
        "object", "U3", "S3", "datetime64[s]", "timedelta64[s]", "V4",
    )
]
INT_DTYPES = [d for d in NUMPY_DTYPES if d.kind in "iu"]
ID_DTYPES = [d for d in INT_DTYPES if np.iinfo(d).max >= VOCAB - 1]  # hold every token id
TORCH_INT_DTYPES = [
    torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64,
]
ODD_VALUES = [None, 5, 3.5, float("nan"), "hello", b"\x01\x02", {"a": 1}, {1, 2}, range(3),
              object(), np.int64(3), [], [[]], [[None]], [[1, "a"]], [[2**70]], [[1.5, 2]]]


# -- torch tensors of every dtype, layout and device --------------------------------------------


def _attempt(make, fallback):
    try:
        return make()
    except Exception:  # noqa: BLE001 - torch refuses many dtype/layout pairs; keep the plain one
        return fallback


def torch_tensor(values: np.ndarray, dtype: torch.dtype, form: str):
    """``values`` as a torch tensor of ``dtype`` in ``form`` (falling back to plainer forms where
    torch cannot make that combination)."""
    base = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if dtype in QUANTIZED:
        tensor = _attempt(
            lambda: torch.quantize_per_tensor(base.float(), 1.0, 0, dtype),
            _attempt(lambda: torch.zeros(base.shape, dtype=dtype), base),
        )
    else:
        tensor = _attempt(
            lambda: base.to(dtype), _attempt(lambda: torch.zeros(base.shape, dtype=dtype), base)
        )
    forms = {
        "plain": lambda: tensor,
        "non-contiguous": lambda: torch.stack([tensor, tensor], dim=-1)[..., 0],
        "transposed": lambda: tensor.mT.contiguous().mT,
        "expanded": lambda: tensor[..., :1].expand(tensor.shape),
        "sparse-coo": lambda: tensor.to_sparse(),
        "sparse-csr": lambda: tensor.to_sparse_csr(),
        "meta": lambda: tensor.to("meta"),
        "conj": lambda: tensor.conj(),
        "neg": lambda: torch._neg_view(tensor),
        "requires-grad": lambda: tensor.clone().requires_grad_(True),
        "inference": lambda: _inference(tensor),
    }
    return _attempt(forms[form], tensor)


def _inference(tensor):
    with torch.inference_mode():
        return tensor.clone()


TORCH_FORMS = ["plain", "non-contiguous", "transposed", "expanded", "sparse-coo", "sparse-csr",
               "meta", "conj", "neg", "requires-grad", "inference"]


# -- the property ------------------------------------------------------------------------------


def _shape_of(value) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return np.asarray(value).shape


def call_or_mbcompile_error(compiled, kwargs: dict):
    """The outputs, or None if the call raised an mbcompile error; anything else fails."""
    try:
        out = compiled(**kwargs)
    except MbcompileError:
        return None
    except Exception as err:  # noqa: BLE001 - the property under test
        raise AssertionError(f"raw {type(err).__name__} instead of an mbcompile error: {err}") from err
    shape = _shape_of(kwargs["input_ids"])
    as_torch = isinstance(kwargs["input_ids"], torch.Tensor)
    for name, value in out.items():
        assert isinstance(value, torch.Tensor) == as_torch, (name, type(value))
        arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        assert arr.shape == shape, (name, arr.shape, shape)
        assert np.isfinite(arr).all(), f"{name}: non-finite outputs"
    return out


# -- strategies --------------------------------------------------------------------------------


def _elements(dtype: np.dtype):
    """Values of ``dtype``: for integers, in-range token ids as often as anything else."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return st.one_of(st.integers(0, min(VOCAB - 1, int(info.max))),
                         st.integers(int(info.min), int(info.max)))
    if dtype.kind == "O":
        return st.one_of(st.integers(-5, 300), st.none(), st.text(max_size=2), st.floats())
    if dtype.kind == "f":
        return st.one_of(st.sampled_from([0.0, 1.0, -0.0, 0.5]), hnp.from_dtype(dtype))
    if dtype.kind == "V":
        return st.binary(min_size=dtype.itemsize, max_size=dtype.itemsize)
    return hnp.from_dtype(dtype)


shapes = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    st.tuples(st.integers(1, 3), st.integers(1, SEQ)),
    st.tuples(st.integers(1, 2), st.integers(SEQ + 1, 3 * SEQ)),  # longer than seq_len
    st.sampled_from([(0, 3), (2, 0), (0,), ()]),
)


@st.composite
def arrays(draw, shape=None):
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    shape = draw(shapes) if shape is None else shape
    return draw(hnp.arrays(dtype, shape, elements=_elements(dtype)))


@st.composite
def containers(draw, arr: np.ndarray):
    """``arr`` as a caller might pass it."""
    kind = draw(st.sampled_from(
        ["numpy", "list", "tuple", "masked", "torch", "fortran", "reversed", "readonly"]
    ))
    if kind == "list":
        return arr.tolist()
    if kind == "tuple":
        return tuple(arr.tolist()) if arr.ndim else arr.tolist()
    if kind == "masked":
        mask = draw(hnp.arrays(np.bool_, arr.shape))
        return np.ma.array(arr, mask=mask)
    if kind == "torch":
        ints = arr.astype(np.int64) if arr.dtype.kind in "iub" else np.zeros(arr.shape, np.int64)
        return torch_tensor(ints, draw(st.sampled_from(TORCH_DTYPES)),
                            draw(st.sampled_from(TORCH_FORMS)))
    if kind == "fortran":
        return np.asfortranarray(arr)
    if kind == "reversed" and arr.ndim:
        return arr[..., ::-1]
    if kind == "readonly":
        arr = arr.copy()
        arr.flags.writeable = False
    return arr


def anything():
    return st.one_of(
        arrays().flatmap(containers),
        st.sampled_from(ODD_VALUES),
        st.recursive(st.integers(-3, 300), lambda inner: st.lists(inner, max_size=4), max_leaves=12),
    )


@st.composite
def hostile_calls(draw) -> dict:
    if draw(st.booleans()):
        ids = draw(hnp.arrays(draw(st.sampled_from(INT_DTYPES)), draw(shapes),
                              elements=st.integers(0, 127)))
    else:
        ids = draw(arrays())
    kwargs = {"input_ids": draw(containers(ids))}
    for name in ARGS[1:]:
        shape = ids.shape[:-1] if name == "lengths" else ids.shape
        choice = draw(st.sampled_from(["omit", "none", "fitting", "junk"]))
        if choice == "none":
            kwargs[name] = None
        elif choice == "fitting":  # the right shape, any dtype and values
            kwargs[name] = draw(arrays(shape=shape).flatmap(containers))
        elif choice == "junk":
            kwargs[name] = draw(anything())
    return kwargs


@st.composite
def valid_calls(draw) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Valid inputs in varied containers and dtypes, with the int64 arrays they hold."""
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, SEQ))
    ids = draw(hnp.arrays(np.int64, (batch, length), elements=st.integers(0, VOCAB - 1)))
    mask = draw(hnp.arrays(np.int64, (batch, length), elements=st.integers(0, 1)))
    types = draw(hnp.arrays(np.int64, (batch, length), elements=st.integers(0, 1)))
    real = draw(hnp.arrays(np.int64, (batch,), elements=st.integers(1, length)))
    with_lengths = draw(st.booleans())
    if with_lengths:  # a mask marks no position past its row's length real (else InputError)
        mask[np.arange(length) >= real[:, None]] = 0
    kwargs = {"input_ids": draw(_valid_container(ids, TORCH_INT_DTYPES, ID_DTYPES))}
    if draw(st.booleans()):
        kwargs["attention_mask"] = draw(_valid_container(
            mask, TORCH_INT_DTYPES + [torch.bool, torch.float32, torch.bfloat16, torch.float16],
            INT_DTYPES + [np.dtype(np.bool_), np.dtype(np.float32), np.dtype(np.float64)],
        ))
    else:
        mask = np.ones_like(ids)
    if draw(st.booleans()):
        kwargs["token_type_ids"] = draw(_valid_container(types, TORCH_INT_DTYPES, INT_DTYPES))
    else:
        types = np.zeros_like(ids)
    if with_lengths:
        kwargs["lengths"] = draw(_valid_container(real, TORCH_INT_DTYPES, INT_DTYPES))
    else:
        real = np.full((batch,), length, dtype=np.int64)
    return kwargs, ids, mask, types, real


@st.composite
def _valid_container(draw, arr: np.ndarray, torch_dtypes, numpy_dtypes):
    kind = draw(st.sampled_from(["numpy", "list", "masked", "torch", "reversed-copy", "fortran"]))
    if kind == "torch":
        form = draw(st.sampled_from(["plain", "non-contiguous", "transposed", "inference"]))
        return torch_tensor(arr, draw(st.sampled_from(torch_dtypes)), form)
    arr = arr.astype(draw(st.sampled_from(numpy_dtypes)))
    if kind == "list":
        return arr.tolist()
    if kind == "masked":
        return np.ma.array(arr, mask=np.zeros(arr.shape, dtype=bool))
    if kind == "reversed-copy":
        return arr[..., ::-1].copy()[..., ::-1]  # negative strides
    if kind == "fortran":
        return np.asfortranarray(arr)
    return arr


# -- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tiny_qa):
    return tiny_qa[1]  # (fixtures of their own: hypothesis prints them in falsifying examples)


class Eager:
    """The PyTorch model, with a repr of one line."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        with torch.no_grad():
            return self.model(**{k: torch.from_numpy(v) for k, v in inputs.items()})

    def __repr__(self) -> str:
        return f"Eager({type(self.model).__name__})"


@pytest.fixture(scope="module")
def eager(tiny_qa):
    return Eager(tiny_qa[0])


@FUZZ
@given(kwargs=hostile_calls())
@example(kwargs={"input_ids": torch.zeros(1, 4, dtype=torch.float4_e2m1fn_x2)})
@example(kwargs={"input_ids": np.ones((1, 4), np.int64),
                 "attention_mask": torch.zeros(1, 4, dtype=torch.float4_e2m1fn_x2)})
@example(kwargs={"input_ids": np.ma.array([[1, 999, 3]], mask=[[0, 1, 0]])})
@example(kwargs={"input_ids": np.ones((1, SEQ + 1), np.int64)})
@example(kwargs={"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.full((1, 4), np.nan)})
def test_any_input_gives_outputs_or_an_mbcompile_error(compiled, kwargs):
    out = call_or_mbcompile_error(compiled, kwargs)
    event("outputs" if out is not None else "an mbcompile error")


@settings(FUZZ, max_examples=60)
@given(case=valid_calls())
def test_valid_ids_in_any_container_and_integer_dtype_equal_eager(eager, compiled, case):
    kwargs, ids, mask, types, real = case
    out = call_or_mbcompile_error(compiled, kwargs)
    assert out is not None, f"valid inputs were refused: {kwargs}"
    for i, n in enumerate(real):
        ref = eager(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n],
                    token_type_ids=types[i : i + 1, :n])
        for name in ("start_logits", "end_logits"):
            got = out[name]
            got = got.numpy() if isinstance(got, torch.Tensor) else got
            error = float(np.abs(got[i, :n] - ref[name][0].numpy()).max())
            assert error <= TOL, f"row {i} (length {n}) {name}: max abs error {error:.2e}"


def test_every_torch_dtype_and_form_gives_outputs_or_an_mbcompile_error(compiled):
    """All torch dtypes (bfloat16, float8/float4, complex, bool, bits, sub-byte ints, quantized)
    in every form (sparse COO/CSR, meta, conj and neg bits, views), for each input."""
    ids = np.array([[3, 1, 0, 2]], dtype=np.int64)
    raw = []
    for dtype in TORCH_DTYPES:
        for form in TORCH_FORMS:
            for name in ARGS:
                value = torch_tensor(ids[0] if name == "lengths" else ids, dtype, form)
                kwargs = {"input_ids": ids, name: value}
                try:
                    call_or_mbcompile_error(compiled, kwargs)
                except AssertionError as err:
                    raw.append(f"{name}={dtype} {form}: {err}")
    assert raw == [], f"{len(raw)} raw errors:\n" + "\n".join(raw[:40])


def test_every_numpy_dtype_gives_outputs_or_an_mbcompile_error(compiled):
    raw = []
    for dtype in sorted({np.dtype(t) for t in np.sctypeDict.values()}, key=str):
        value = np.zeros((1, 4), dtype=dtype)
        for name in ARGS:
            kwargs = {"input_ids": np.ones((1, 4), np.int64)}
            kwargs[name] = value[0] if name == "lengths" else value
            try:
                call_or_mbcompile_error(compiled, kwargs)
            except AssertionError as err:
                raw.append(f"{name}={dtype}: {err}")
    assert raw == [], "\n".join(raw)


@pytest.mark.parametrize("name", ["input_ids", "token_type_ids", "lengths", "attention_mask"])
def test_masked_entries_cannot_hide_out_of_range_values(compiled, name):
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    bad = {"input_ids": 999, "token_type_ids": 9, "lengths": 99, "attention_mask": 7}[name]
    value = np.array([[1, bad, 1]]) if name != "lengths" else np.array([bad])
    masked = np.ma.array(value, mask=value == bad)  # min()/max() would skip the bad value
    kwargs = {"input_ids": ids, name: masked}
    with pytest.raises(InputError, match=name):
        compiled(**kwargs)


def test_a_masked_array_without_masked_entries_is_a_plain_array(compiled):
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
    got = compiled(input_ids=np.ma.array(ids), attention_mask=np.ma.array(np.ones_like(ids)))
    want = compiled(input_ids=ids)
    assert np.array_equal(got.start_logits, want.start_logits)


def test_inputs_error_is_a_value_error_and_names_the_input(compiled):
    with pytest.raises(ValueError, match="token_type_ids"):
        compiled(input_ids=np.ones((1, 3), np.int64), token_type_ids=np.full((1, 3), 5))
    assert issubclass(mbcompile.InputError, mbcompile.MbcompileError)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e5m2])
def test_a_torch_float_dtype_is_named_as_the_caller_gave_it(compiled, dtype):
    """Not as the float32 it is converted to on the way (numpy has no bfloat16)."""
    with pytest.raises(InputError, match=str(dtype).removeprefix("torch.")):
        compiled(input_ids=torch.ones(1, 3, dtype=dtype))
