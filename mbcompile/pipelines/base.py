"""The ``Pipeline`` base class and the steps every task shares.

A pipeline holds a compiled MobileBERT and a transformers tokenizer. The base class checks that
they fit each other and the task (head, vocabulary size, fast tokenizer), tokenizes one text or
pair (refusing what is longer than the compiled ``seq_len``, the longest, unless the caller
asks for transformers' ``truncation``),
runs token rows right-padded to the longest of each group of the compiled batch size (the model
then runs the shortest compiled length that holds them), and saves the model with its tokenizer.

The model runs with numpy and TVM (no torch); scores are computed in float64 as transformers does.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from mbcompile.errors import PipelineError, PipelineTypeError
from mbcompile.pipelines.tokenizer import _files_of_tokenizer
from mbcompile.runtime import CompiledModel

# -- helpers shared by the tasks --------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _is_int(value) -> bool:
    """A whole number (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# transformers' truncation strategies (besides True, which is "longest_first")
TRUNCATIONS = ("longest_first", "only_first", "only_second")


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PipelineError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _truncation_args(task: str, name: str, kwargs: dict | None, truncation, max_length) -> tuple:
    """``(truncation, max_length)`` from keyword arguments or transformers' dict of tokenizer
    arguments (``name``: ``tokenizer_kwargs`` for fill-mask, ``tokenize_kwargs`` for
    feature-extraction), which may hold only those two."""
    if kwargs is None:
        return truncation, max_length
    if not isinstance(kwargs, dict):
        raise PipelineTypeError(f"{task}: {name} must be a dict, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - {"truncation", "max_length"})
    if unknown:
        raise PipelineError(
            f"{task}: {name} may set 'truncation' and 'max_length' only, got {unknown}"
        )
    both = [k for k, v in (("truncation", truncation), ("max_length", max_length))
            if v is not None and k in kwargs]
    if both:
        raise PipelineError(f"{task}: {both[0]} is given both in {name} and on its own")
    return kwargs.get("truncation", truncation), kwargs.get("max_length", max_length)


def _is_stream(inputs) -> bool:
    """An iterator of inputs (a generator, ``map``, ``iter(...)``): transformers' pipelines answer
    a generator with a generator of results, computed ``batch_size`` inputs at a time."""
    return isinstance(inputs, Iterator)


def _config_of(model: CompiledModel) -> dict:
    """The model's Hugging Face config as a new dict ({} if none was recorded)."""
    return dict(model.metadata.config or {})


def _id2label(config: dict, width: int) -> dict[int, str]:
    """The config's id2label (its keys are strings once saved as JSON); LABEL_i where missing."""
    labels = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    return {i: labels.get(i, f"LABEL_{i}") for i in range(width)}


def _texts(inputs, task: str) -> list[str]:
    if not isinstance(inputs, (str, list, tuple)):
        raise PipelineTypeError(
            f"{task}: expected a text or a list of texts, got {type(inputs).__name__}"
        )
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not texts:
        raise PipelineError(f"{task}: at least one input is required")
    for t in texts:
        if not isinstance(t, str):
            raise PipelineTypeError(f"{task}: inputs must be strings, got {type(t).__name__}")
        _check_unicode(task, "input", t)
    return texts


def _check_unicode(task: str, what: str, text: str) -> None:
    """Text the tokenizer can read: valid Unicode (a lone surrogate is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PipelineError(
            f"{task}: {what} is not valid Unicode ({err.reason} at position {err.start})"
        ) from None


def _tasks_for_head(head: str) -> list[str]:
    """The tasks whose pipeline can use a model with this head, sorted.

    Each task module defines one subclass of ``Pipeline`` and the package imports them all, so
    the subclasses are the package's ``TASKS`` (which this module cannot import: no cycles).
    """
    found, todo = [], list(Pipeline.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.task and head in cls.heads:
            found.append(cls.task)
    return sorted(set(found))


def check_vocabulary(tokenizer, vocab_size: int) -> None:
    """PipelineError when ``tokenizer`` has more tokens than the model has embeddings."""
    if len(tokenizer) > vocab_size:
        raise PipelineError(
            f"tokenizer: its vocabulary has {len(tokenizer)} tokens, the model's vocab_size "
            f"is {vocab_size}: this tokenizer does not belong to this model"
        )


# -- the base class ---------------------------------------------------------------------------


class Pipeline:
    """A compiled MobileBERT and its tokenizer; subclasses implement one task's ``__call__``."""

    task: str = ""
    heads: tuple[str, ...] = ()  # the compiled heads this task can use
    needs_fast_tokenizer = False  # character offsets come from a fast (Rust) tokenizer only

    def __init__(self, model: CompiledModel, tokenizer, *, tokenizer_files: dict | None = None,
                 batch_size: int | None = None):
        self.check_head(model)
        if tokenizer is None:
            raise PipelineError(f"{self.task}: a tokenizer is required")
        if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise PipelineTypeError(
                f"tokenizer: expected a transformers tokenizer or a local folder path, got "
                f"{type(tokenizer).__name__}"
            )
        check_vocabulary(tokenizer, model.signature.vocab_size)
        if self.needs_fast_tokenizer and not getattr(tokenizer, "is_fast", False):
            raise PipelineError(
                f"{self.task}: needs a fast tokenizer (character offsets), got "
                f"{type(tokenizer).__name__}; load one with AutoTokenizer.from_pretrained(folder)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self._tokenizer_files = tokenizer_files
        self._config: dict = _config_of(model)
        # inputs per model call unless a call says otherwise (see _group_size)
        self.batch_size: int = (model.signature.batch_size if batch_size is None
                                else _check_positive("batch_size", batch_size))

    @classmethod
    def check_head(cls, model: CompiledModel) -> None:
        if not isinstance(model, CompiledModel):
            raise PipelineTypeError(
                f"model: expected a CompiledModel or an artifact path, got {type(model).__name__}"
            )
        head = model.signature.head
        if head not in cls.heads:
            fitting = _tasks_for_head(head)
            hint = f"; for this model use {fitting}" if fitting else ""
            raise PipelineError(
                f"task {cls.task!r} needs a model with head {list(cls.heads)}, this one is "
                f"{model.signature.model_class} (head {head!r}){hint}"
            )

    @property
    def seq_len(self) -> int:
        return self.model.signature.seq_len

    def save(self, path: str | os.PathLike) -> Path:
        """Save the compiled model with this tokenizer in one artifact (written atomically), so
        that ``mbcompile.pipeline(task, path)`` needs no tokenizer argument."""
        files = self._tokenizer_files or _files_of_tokenizer(self.tokenizer)
        return self.model.save(path, tokenizer_files=files)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r}, tokenizer={type(self.tokenizer).__name__})"

    # -- shared steps ---------------------------------------------------------------------------
    def _encode(self, text: str, pair: str | None = None, *, what: str = "input", **kwargs):
        """Tokenize one text (or pair), without truncation unless ``kwargs`` ask for it
        (``_truncation``); refuse it if longer than seq_len."""
        for value in (text, pair) if pair is not None else (text,):
            if not isinstance(value, str):
                raise PipelineTypeError(
                    f"{self.task}: {what} must be a string, got {type(value).__name__}"
                )
            _check_unicode(self.task, what, value)
        enc = self._tokenize(text, pair, **kwargs)
        n = len(enc["input_ids"])
        if n > self.seq_len:
            option = self.model.signature.length_option
            raise PipelineError(
                f"{self.task}: {what} is {n} tokens long (special tokens included), the model "
                f"was compiled for at most {option}={self.seq_len}; shorten it or recompile "
                f"with {option}>={n}"
            )
        return enc

    def _truncation(self, truncation: bool | str | None, max_length: int | None) -> dict:
        """The tokenizer arguments for transformers' ``truncation=`` and ``max_length=``: an
        input longer than ``max_length`` tokens (default: the tokenizer's ``model_max_length``
        as in transformers, or the longest compiled length if shorter) is cut to it as
        transformers' tokenizers cut (``True`` is ``"longest_first"``; a pair may name
        ``"only_first"`` or ``"only_second"``). Without truncation a longer input is refused."""
        if truncation is None or truncation is False or truncation == "do_not_truncate":
            if max_length is not None:
                raise PipelineError(
                    f"{self.task}: max_length={max_length!r} applies with truncation=True"
                )
            return {}
        if truncation is not True and truncation not in TRUNCATIONS:
            raise PipelineError(
                f"{self.task}: truncation must be True, False or one of {list(TRUNCATIONS)}, "
                f"got {truncation!r}"
            )
        if max_length is None:
            limit = min(self.seq_len, getattr(self.tokenizer, "model_max_length", None) or self.seq_len)
        else:
            limit = _check_positive("max_length", max_length)
        return {"truncation": truncation, "max_length": limit}

    def _tokenize(self, *args, **kwargs):
        """The tokenizer's encoding; PipelineError if the tokenizer itself fails (damaged
        files, e.g. a vocabulary without [UNK], only fail when used)."""
        try:
            return self.tokenizer(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tokenizers raises bare Exception
            raise PipelineError(
                f"{self.task}: the tokenizer failed: {type(err).__name__}: "
                f"{' '.join(str(err).split())[:300]}"
            ) from None

    def _run(self, rows: Sequence, **kwargs):
        """Run the model on token rows (dicts of lists), right-padded to the longest row."""
        length = max(len(r["input_ids"]) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = np.full((len(rows), length), pad, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        types = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = r["input_ids"]
            mask[i, :n] = r.get("attention_mask", 1)
            if r.get("token_type_ids") is not None:
                types[i, :n] = r["token_type_ids"]
        lengths = self._lengths([len(r["input_ids"]) for r in rows])
        return self.model(
            input_ids=ids, attention_mask=mask, token_type_ids=types, **lengths, return_dict=True,
            **kwargs,
        )

    def _lengths(self, lengths) -> dict:
        """``lengths=`` for the model when rows of different lengths are padded together, so
        that the padding cannot change any row's outputs ({} for artifacts that predate it)."""
        if not self.model.signature.takes_lengths:
            return {}
        return {"lengths": np.asarray(lengths, dtype=np.int64)}

    def _width(self, field: str) -> int:
        """The last dimension of an output field (e.g. the number of labels of ``logits``)."""
        return next(o.shape[-1] for o in self.model.signature.outputs if o.name == field)

    def _group_size(self, batch_size: int | None) -> int:
        """Inputs per model call: ``batch_size`` as transformers' pipelines take it (on the call or
        the pipeline), else the compiled batch size. A group is padded to its longest row (which
        cannot change any row's outputs) and run in chunks of the compiled batch size, side by
        side on the model's threads."""
        return self.batch_size if batch_size is None else _check_positive("batch_size", batch_size)

    def _batches(self, items: list, batch_size: int | None = None) -> list[list]:
        """Groups of ``_group_size(batch_size)`` items: one model call each."""
        size = self._group_size(batch_size)
        return [items[i : i + size] for i in range(0, len(items), size)]

    def _stream(self, inputs: Iterator, batch_size: int | None,
                run: Callable[[list], list]) -> Iterator:
        """Results one input at a time for an iterator of inputs, as transformers' pipelines
        give for a generator: ``run`` takes a list of up to ``batch_size`` inputs at a time and
        returns one result per input. Nothing runs before the first result is asked for."""
        size = self._group_size(batch_size)

        def results() -> Iterator:
            while chunk := list(itertools.islice(inputs, size)):
                yield from run(chunk)

        return results()
