"""A BERT-family tokenizer on the Rust ``tokenizers`` library alone (no transformers, no torch).

The pipelines ask a tokenizer for a small part of transformers' API: calling it on a text or
pair (special tokens, truncation with stride windows, offsets, special-token masks, sequence
ids), ``decode``, ``convert_ids_to_tokens``, ``convert_tokens_to_string``, ``get_vocab``, the
special tokens and ``model_max_length``. :class:`FastTokenizer` answers exactly that, the way
transformers' ``BertTokenizerFast`` does over the same ``tokenizer.json`` (the pipeline tests
check the answers are the same), so an artifact's pipelines run with numpy, TVM and
``tokenizers``. A transformers tokenizer object given by the caller is used as it is.

``tokenizer.json`` is what it reads; a checkpoint with only ``vocab.txt`` gets one at compile
time (``mbcompile.artifact.tokenizer_json``).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from typing import Any

import numpy as np

from mbcompile.artifact.tokenizer_json import BERT_SPECIAL

# transformers' default when a tokenizer_config.json gives no model_max_length
VERY_LARGE_INTEGER = int(1e30)
TRUNCATION = {True: "longest_first", "longest_first": "longest_first",
              "only_first": "only_first", "only_second": "only_second"}

# Every FastTokenizer, for _new_locks_after_fork.
_instances: weakref.WeakSet = weakref.WeakSet()


def _new_locks_after_fork() -> None:
    """In a forked child, each tokenizer's lock afresh: one that another thread of the parent
    held at the fork would stay held in the child (that thread does not exist there), and the
    child's first text would wait for it forever."""
    for tokenizer in list(_instances):
        tokenizer._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks_after_fork)


class Encoded(dict):
    """What calling a :class:`FastTokenizer` returns, like transformers' ``BatchEncoding``:
    a mapping of ``input_ids``, ``token_type_ids``, ``attention_mask`` (and offsets, special
    tokens masks when asked), lists for one encoding or lists of lists for stride windows;
    ``encodings`` and ``sequence_ids(i)`` as transformers gives them."""

    def __init__(self, data: dict, encodings: list):
        super().__init__(data)
        self.encodings = encodings

    def sequence_ids(self, index: int = 0) -> list:
        return self.encodings[index].sequence_ids


class FastTokenizer:
    """transformers' ``BertTokenizerFast`` behaviour the pipelines use, over ``tokenizers``."""

    is_fast = True
    padding_side = "right"

    def __init__(self, tokenizer_json: bytes, config: dict | None = None,
                 special_tokens_map: dict | None = None, added_tokens: dict | None = None):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        # added_tokens.json ({token: id}), as transformers adds them (in id order)
        for token, _ in sorted((added_tokens or {}).items(), key=lambda kv: int(kv[1])):
            if self._tokenizer.token_to_id(token) is None:
                self._tokenizer.add_tokens([token])
        self._json = tokenizer_json
        self._lock = threading.Lock()  # truncation is state of the Rust tokenizer
        _instances.add(self)
        config = dict(config or {})
        self.config = config
        special = {**BERT_SPECIAL, **(special_tokens_map or {})}
        for key in BERT_SPECIAL:
            if key in config and config[key] is not None:
                special[key] = config[key]
        self.special_tokens = {
            k: v["content"] if isinstance(v, dict) else v for k, v in special.items()
        }
        self.model_max_length = int(config.get("model_max_length") or VERY_LARGE_INTEGER)
        # transformers 5's default (the WordPiece decoder cleans up per token); a
        # tokenizer_config.json may ask for the old whole-text clean-up
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    # -- pickling (a pipeline sent to worker processes) ------------------------------------
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_tokenizer")}
        state["_tokenizer"] = self._tokenizer.to_str()  # added tokens included
        return state

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.__dict__.update(state)
        self._tokenizer = Tokenizer.from_str(state["_tokenizer"])
        self._lock = threading.Lock()
        _instances.add(self)

    # -- special tokens ---------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.endswith("_token_id") and name[: -len("_id")] in BERT_SPECIAL:
            token = self.special_tokens.get(name[: -len("_id")])
            return None if token is None else self._tokenizer.token_to_id(token)
        if name in BERT_SPECIAL:
            return self.special_tokens.get(name)
        raise AttributeError(name)

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self._tokenizer.token_to_id(t) for t in self.special_tokens.values())
        return [i for i in ids if i is not None]

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._tokenizer.num_special_tokens_to_add(pair)

    # -- encoding -----------------------------------------------------------------------------
    def __call__(
        self,
        text: str,
        text_pair: str | None = None,
        *,
        add_special_tokens: bool = True,
        truncation: bool | str = False,
        max_length: int | None = None,
        stride: int = 0,
        return_overflowing_tokens: bool = False,
        return_offsets_mapping: bool = False,
        return_special_tokens_mask: bool = False,
        return_token_type_ids: bool = True,
        return_attention_mask: bool = True,
    ) -> Encoded:
        if not text_pair:  # as transformers: an empty second text is no second text
            text_pair = None
        with self._lock:
            tok = self._tokenizer
            if truncation:
                tok.enable_truncation(
                    max_length or self.model_max_length, stride=stride,
                    strategy=TRUNCATION[truncation],
                )
            else:
                tok.no_truncation()
            tok.no_padding()
            try:
                enc = tok.encode(text, text_pair, add_special_tokens=add_special_tokens)
            finally:
                tok.no_truncation()
        encodings = [enc] + (list(enc.overflowing) if return_overflowing_tokens else [])
        fields = {"input_ids": lambda e: list(e.ids)}
        if return_token_type_ids:
            fields["token_type_ids"] = lambda e: list(e.type_ids)
        if return_attention_mask:
            fields["attention_mask"] = lambda e: list(e.attention_mask)
        if return_special_tokens_mask:
            fields["special_tokens_mask"] = lambda e: list(e.special_tokens_mask)
        if return_offsets_mapping:
            fields["offset_mapping"] = lambda e: [tuple(o) for o in e.offsets]
        if return_overflowing_tokens:
            data = {k: [f(e) for e in encodings] for k, f in fields.items()}
            data["overflow_to_sample_mapping"] = [0] * len(encodings)
        else:
            data = {k: f(enc) for k, f in fields.items()}
        return Encoded(data, encodings)

    # -- decoding -----------------------------------------------------------------------------
    def convert_ids_to_tokens(self, ids):
        if _is_scalar(ids):
            return self._tokenizer.id_to_token(int(ids))
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._tokenizer.decoder.decode(tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if _is_scalar(ids):
            ids = [ids]
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_tokenization_spaces else text

    # -- files --------------------------------------------------------------------------------
    def files(self) -> dict[str, bytes]:
        """tokenizer.json and tokenizer_config.json, as an artifact stores them."""
        config = {**self.config, **{k: v for k, v in self.special_tokens.items()}}
        return {
            "tokenizer.json": self._json,
            "tokenizer_config.json": json.dumps(config, indent=2).encode("utf-8"),
        }

    def save_pretrained(self, folder) -> None:
        from pathlib import Path

        for name, data in self.files().items():
            (Path(folder) / name).write_bytes(data)

    def __repr__(self) -> str:
        return f"FastTokenizer(vocab {len(self)}, model_max_length {self.model_max_length})"


def _is_scalar(value) -> bool:
    """One id (a Python or numpy integer, a 0-d array), not a sequence of them."""
    return isinstance(value, (int, np.integer)) or getattr(value, "ndim", None) == 0


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and contractions."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text
