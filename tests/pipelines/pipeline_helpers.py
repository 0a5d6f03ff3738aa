"""What the pipeline tests share: a WordPiece vocabulary written here, its tokenizer, tiny seeded
model configs, and ``assert_same`` (the comparison with transformers' outputs).

Tiny seeded models (initializer_range 0.2, so that scores are not all alike) over that vocabulary,
compiled at seq_len 32.
"""

from __future__ import annotations

import numpy as np
from helpers import TOL, tiny_config
from transformers import BertTokenizerFast

SEQ = 32
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    ".", ",", "?", "!", "'", "-", "the", "a", "is", "was", "are", "in", "on", "of", "to", "and",
    "at", "cat", "dog", "sat", "mat", "house", "city", "capital", "paris", "france", "london",
    "england", "berlin", "germany", "river", "big", "small", "red", "old", "new", "john", "mary",
    "smith", "lives", "live", "works", "work", "what", "where", "who", "which", "people", "there",
    "this", "it", "he", "she", "they", "##s", "##ing", "##ed", "##er", "##son", "##ville",
    "##ton",
]
VOCAB = SPECIAL + WORDS
LONG_CONTEXT = (
    "mary works in berlin , a big city in germany . the old river is red . john smith lives in "
    "paris , the capital of france . the cat sat on the mat in the small house . they live there "
    "and it is new ."
)


def config(**overrides):
    return tiny_config(**{"vocab_size": len(VOCAB), "initializer_range": 0.2, **overrides})


def write_vocab(folder, words=VOCAB):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def make_tokenizer(folder, **kwargs):
    # transformers 5: the vocabulary file is passed as vocab= (vocab_file= is ignored there).
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), **kwargs)
    assert len(tok) == len((folder / "vocab.txt").read_text().split())
    return tok


def assert_same(ours, ref, where="output"):
    """Same nesting, keys (in order), strings and integers; scores within TOL."""
    if isinstance(ref, dict):
        assert isinstance(ours, dict) and list(ours) == list(ref), (where, ours, ref)
        for key in ref:
            assert_same(ours[key], ref[key], f"{where}[{key!r}]")
    elif isinstance(ref, (list, tuple)):
        assert isinstance(ours, list) and len(ours) == len(ref), (where, ours, ref)
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ref, (float, np.floating)):
        assert isinstance(ours, float), (where, type(ours))
        assert abs(ours - float(ref)) <= TOL, (where, ours, float(ref))
    else:
        assert ours == ref, (where, ours, ref)
