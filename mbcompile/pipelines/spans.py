"""Answer spans from start/end logits, as transformers' question answering computes them.

``_select_starts_ends`` scores the spans of one window (transformers' ``select_starts_ends``);
``_char_span`` turns a token span into character offsets in the context (its ``get_indices``).
"""

from __future__ import annotations

import numpy as np

from mbcompile.pipelines.base import _softmax


def _select_starts_ends(start, end, allowed, min_null_score, top_k, handle_impossible_answer,
                        max_answer_len):
    """Span probabilities from start/end logits, as transformers' ``select_starts_ends``:
    softmax over the allowed tokens, P(span) = P(start)·P(end), end ≥ start, at most
    ``max_answer_len`` tokens."""
    start = _softmax(np.where(allowed, start, -10000.0))
    end = _softmax(np.where(allowed, end, -10000.0))
    if handle_impossible_answer:
        min_null_score = min(min_null_score, float(start[0] * end[0]))
    start[0] = end[0] = 0.0  # the [CLS] span is the null answer, counted above
    candidates = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    flat = candidates.ravel()
    if top_k == 1:
        order = np.array([np.argmax(flat)])
    elif flat.size <= top_k:
        order = np.argsort(-flat, kind="stable")
    else:
        part = np.argpartition(-flat, top_k)[:top_k]
        order = part[np.argsort(-flat[part], kind="stable")]
    starts, ends = np.unravel_index(order, candidates.shape)
    keep = allowed[starts] & allowed[ends]
    starts, ends = starts[keep], ends[keep]
    return starts, ends, candidates[starts, ends], min_null_score


def _char_span(encoding, s: int, e: int, sequence_index: int, align_to_words: bool):
    """Character offsets of tokens s..e in the context: whole words by default, as transformers."""
    if align_to_words:
        start_word, end_word = encoding.token_to_word(s), encoding.token_to_word(e)
        if start_word is not None and end_word is not None:
            start = encoding.word_to_chars(start_word, sequence_index=sequence_index)
            end = encoding.word_to_chars(end_word, sequence_index=sequence_index)
            if start is not None and end is not None:
                return start[0], end[1]
    return encoding.offsets[s][0], encoding.offsets[e][1]
