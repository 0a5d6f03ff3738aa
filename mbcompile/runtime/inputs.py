"""Check and prepare the inputs of a compiled model before anything runs.

Every check names the input and what was expected. The compiled gathers do not check bounds, so
token and type ids are range-checked here: unchecked, an out-of-range id would read out of bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mbcompile.errors import InputError
from mbcompile.signature import Signature


@dataclass
class Prepared:
    """Validated int64 inputs at the caller's shape, and whether to return torch tensors."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    as_torch: bool


def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _to_numpy(name: str, value) -> np.ndarray:
    """A plain ndarray of ``value`` (numpy array, torch tensor or nested lists); InputError
    naming the input for anything else."""
    if _is_torch(value):
        return _torch_to_numpy(name, value)
    if isinstance(value, np.ma.MaskedArray):
        # min()/max() skip masked entries, so range checks would not see them: refuse those.
        if np.ma.getmaskarray(value).any():
            raise InputError(
                f"{name}: a masked array with masked entries; fill them first "
                f"(e.g. arr.filled(0)) or pass a plain array"
            )
        return np.asarray(value.data)
    if isinstance(value, np.ndarray):
        return np.asarray(value)  # subclasses (np.matrix, ...) as plain arrays
    if isinstance(value, (list, tuple)):
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError, OverflowError) as err:
            raise InputError(f"{name}: nested lists must be rectangular numbers ({err})") from None
        # numpy makes [] float64: an empty list is empty, not of the wrong type
        return arr.astype(np.int64) if arr.size == 0 and arr.dtype.kind == "f" else arr
    raise InputError(
        f"{name}: expected a numpy array or torch tensor, got {type(value).__name__}"
    )


def _torch_to_numpy(name: str, tensor) -> np.ndarray:
    import torch

    what = f"{name}: a torch tensor"
    if tensor.layout != torch.strided:
        raise InputError(f"{what} with layout {tensor.layout}; pass a dense tensor (.to_dense())")
    if tensor.is_meta or tensor.device.type == "meta":
        raise InputError(f"{what} on the meta device has no values")
    if tensor.is_quantized:
        raise InputError(f"{what} that is quantized ({tensor.dtype}); pass integer token ids")
    if tensor.is_complex():
        raise InputError(f"{what} of dtype {tensor.dtype}; expected an integer dtype")
    dtype = tensor.dtype
    narrow_float = tensor.is_floating_point() and dtype not in (torch.float32, torch.float64)
    if narrow_float and name != "attention_mask":  # only the mask may be float (0.0/1.0)
        raise InputError(f"{name}: expected an integer dtype (int64 or int32), got {dtype}")
    try:
        tensor = tensor.detach().resolve_conj().resolve_neg()
        if narrow_float:
            tensor = tensor.to(torch.float32)  # bfloat16/float16/float8 have no numpy dtype
        return tensor.cpu().numpy()
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
        raise InputError(f"{what} of dtype {dtype} cannot be read ({err})") from None


def _check_integer(name: str, arr: np.ndarray, allow_bool: bool) -> None:
    if arr.dtype.kind in "iu" or (allow_bool and arr.dtype.kind == "b"):
        return
    expected = "an integer or bool dtype" if allow_bool else "an integer dtype (int64 or int32)"
    raise InputError(f"{name}: expected {expected}, got dtype {arr.dtype}")


def _same_shape(name: str, value, ids: np.ndarray) -> np.ndarray:
    arr = _to_numpy(name, value)
    if arr.shape != ids.shape:
        raise InputError(
            f"{name}: expected shape {tuple(ids.shape)} (that of input_ids), got {tuple(arr.shape)}"
        )
    return arr


def _check_range(name: str, arr: np.ndarray, high: int, what: str, limit: str) -> None:
    """Every value in [0, high): the compiled gathers must not read outside their tables."""
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= high:
        bad = lo if lo < 0 else hi
        raise InputError(f"{name}: {what} {bad} is outside [0, {high}) ({limit})")


def prepare(
    sig: Signature,
    input_ids,
    attention_mask=None,
    token_type_ids=None,
) -> Prepared:
    """Validate the caller's inputs against ``sig`` and fill Hugging Face's defaults."""
    if input_ids is None:
        raise InputError("input_ids is required")
    as_torch = _is_torch(input_ids)
    ids = _to_numpy("input_ids", input_ids)
    _check_integer("input_ids", ids, allow_bool=False)

    rank = 3 if sig.num_choices is not None else 2
    layout = "(batch, num_choices, seq)" if rank == 3 else "(batch, seq)"
    if ids.size == 0:
        raise InputError(f"input_ids: empty batch or sequence, shape {tuple(ids.shape)}")
    if ids.ndim != rank:
        hint = " (add a batch axis, e.g. ids[None])" if ids.ndim == rank - 1 else ""
        raise InputError(
            f"input_ids: expected rank {rank} {layout}, got shape {tuple(ids.shape)}{hint}"
        )
    if ids.shape[0] < 1 or ids.shape[-1] < 1:
        raise InputError(f"input_ids: empty batch or sequence, shape {tuple(ids.shape)}")
    if ids.shape[-1] > sig.seq_len:
        option = sig.length_option
        raise InputError(
            f"input_ids: sequence length {ids.shape[-1]} exceeds the longest this model was "
            f"compiled for ({option}={sig.seq_len}); truncate the input or recompile with "
            f"{option}>={ids.shape[-1]}"
        )
    if rank == 3 and ids.shape[1] < 1:
        raise InputError(f"input_ids: no choices, shape {tuple(ids.shape)}")
    _check_range("input_ids", ids, sig.vocab_size, "token id", "vocab_size")

    if attention_mask is None:
        mask = np.ones(ids.shape, dtype=np.int64)
    else:
        mask = _same_shape("attention_mask", attention_mask, ids)
        if mask.dtype.kind != "f":  # HF accepts float masks of 0.0 and 1.0 too
            _check_integer("attention_mask", mask, allow_bool=True)
        values = np.unique(mask)
        wrong = values[~np.isin(values, (0, 1))]
        if wrong.size:
            shown = ", ".join(repr(v.item()) for v in wrong[:5])
            raise InputError(f"attention_mask: values must be 0 or 1, got {shown}")

    if token_type_ids is None:
        types = np.zeros(ids.shape, dtype=np.int64)
    else:
        types = _same_shape("token_type_ids", token_type_ids, ids)
        _check_integer("token_type_ids", types, allow_bool=False)
        _check_range("token_type_ids", types, sig.type_vocab_size, "type id", "type_vocab_size")

    return Prepared(
        input_ids=ids.astype(np.int64, copy=False),
        attention_mask=mask.astype(np.int64, copy=False),
        token_type_ids=types.astype(np.int64, copy=False),
        as_torch=as_torch,
    )


def real_lengths(sig: Signature, ids: np.ndarray, lengths=None) -> np.ndarray:
    """Each row's real length, int64 of ``ids.shape[:-1]``: ``lengths`` checked, or the full
    length of every row."""
    full = np.full(ids.shape[:-1], ids.shape[-1], dtype=np.int64)
    if lengths is None:
        return full
    if not sig.takes_lengths:
        raise InputError(
            "lengths: this artifact was compiled before models took real lengths; recompile it "
            "with this mbcompile to pass them"
        )
    arr = _to_numpy("lengths", lengths)
    _check_integer("lengths", arr, allow_bool=False)
    if arr.shape != full.shape:
        raise InputError(
            f"lengths: expected shape {full.shape} (one length per row of input_ids), got "
            f"{tuple(arr.shape)}"
        )
    if arr.size and (int(arr.min()) < 1 or int(arr.max()) > ids.shape[-1]):
        bad = int(arr.min()) if int(arr.min()) < 1 else int(arr.max())
        raise InputError(f"lengths: {bad} is outside [1, {ids.shape[-1]}] (the input's length)")
    return arr.astype(np.int64, copy=False)


def mask_within_lengths(inp: Prepared, real: np.ndarray, mask_given: bool) -> Prepared:
    """The attention mask that goes with ``lengths=``: without a mask, the positions before each
    row's length (as Hugging Face's mask of right-padded rows); with one, it is checked to mark
    no position past its row's length real (a left-padded row's mask, zeros first, is fine)."""
    past = np.arange(inp.input_ids.shape[-1]) >= real[..., None]
    if not mask_given:
        return replace(inp, attention_mask=(~past).astype(np.int64))
    wrong = np.argwhere(past & (inp.attention_mask != 0))
    if wrong.size:
        *row, position = (int(i) for i in wrong[0])
        where = f"row {row[0]}" if len(row) == 1 else f"row {tuple(row)}"
        raise InputError(
            f"attention_mask: {where} marks position {position} real (1), past its length "
            f"{int(real[tuple(row)])} in lengths; give lengths that cover every real position, "
            f"or leave out attention_mask to take it from lengths"
        )
    return inp


def pad_to(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-pad ``arr`` at the end of each axis up to ``shape`` (pad token 0, mask 0, type 0)."""
    if arr.shape == shape:
        return np.ascontiguousarray(arr)
    out = np.zeros(shape, dtype=arr.dtype)
    out[tuple(slice(0, n) for n in arr.shape)] = arr
    return out


def find_masked_positions(sig: Signature, ids: np.ndarray, requested=None) -> np.ndarray:
    """Positions whose vocabulary logits to compute, (batch, n) int64, -1 where a row has fewer.

    By default the positions of ``sig.mask_token_id`` in each row; ``requested`` (batch, n) gives
    them explicitly (-1 for none). At most ``sig.max_masked`` per row.
    """
    length = ids.shape[-1]
    if requested is None:
        rows = [np.flatnonzero(row == sig.mask_token_id) for row in ids]
        n = max(len(r) for r in rows)
        if n > sig.max_masked:
            raise InputError(
                f"input_ids: {n} masked tokens (id {sig.mask_token_id}) in one sequence, "
                f"the model was compiled for at most max_masked={sig.max_masked}"
            )
        out = np.full((ids.shape[0], n), -1, dtype=np.int64)
        for b, r in enumerate(rows):
            out[b, : len(r)] = r
        return out
    pos = _to_numpy("masked_positions", requested)
    _check_integer("masked_positions", pos, allow_bool=False)
    if pos.ndim != 2 or pos.shape[0] != ids.shape[0]:
        raise InputError(
            f"masked_positions: expected shape ({ids.shape[0]}, n), got {tuple(pos.shape)}"
        )
    if pos.shape[1] > sig.max_masked:
        raise InputError(
            f"masked_positions: {pos.shape[1]} positions per row, the model was compiled for at "
            f"most max_masked={sig.max_masked}"
        )
    if pos.size and (pos.min() < -1 or pos.max() >= length):
        raise InputError(f"masked_positions: values must be in [0, {length}) or -1 for none")
    return pos.astype(np.int64)
