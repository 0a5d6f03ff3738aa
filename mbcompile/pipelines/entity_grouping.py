"""From per-token scores to entities, as transformers' TokenClassificationPipeline aggregates.

Each token is a dict {word, scores, start, end, index, is_subword} (``scores``: the softmax over
the labels). ``aggregation_strategy``:

- ``"none"``: one entity per token, its best label {entity, score, index, word, start, end};
- ``"simple"``: those, then adjacent tokens of one entity (B-/I- tags) grouped into
  {entity_group, score, word, start, end} (score: the mean);
- ``"first" | "average" | "max"``: first one label per word (the first sub-word's scores, their
  mean, or those of the sub-word with the highest score), then grouped as "simple".

Entities found in overlapping windows of one long text are merged by ``_merge_overlapping``.
"""

from __future__ import annotations

import numpy as np

_AGGREGATIONS = ("none", "simple", "first", "average", "max")


def _aggregate(pre: list[dict], strategy: str, labels: dict[int, str], tokenizer) -> list[dict]:
    """The entities of one window's tokens; ``labels``: id2label, ``tokenizer`` joins words."""
    if strategy in ("none", "simple"):
        entities = []
        for p in pre:
            best = int(p["scores"].argmax())
            entities.append(
                {"entity": labels[best], "score": float(p["scores"][best]),
                 "index": p["index"], "word": p["word"], "start": p["start"], "end": p["end"]}
            )
        if strategy == "none":
            return entities
    else:
        entities = _aggregate_words(pre, strategy, labels, tokenizer)
    return _group_entities(entities, tokenizer)


def _aggregate_words(pre: list[dict], strategy: str, labels: dict[int, str],
                     tokenizer) -> list[dict]:
    words, group = [], []
    for p in pre:
        if group and not p["is_subword"]:
            words.append(_aggregate_word(group, strategy, labels, tokenizer))
            group = []
        group.append(p)
    if group:
        words.append(_aggregate_word(group, strategy, labels, tokenizer))
    return words


def _aggregate_word(group: list[dict], strategy: str, labels: dict[int, str], tokenizer) -> dict:
    if strategy == "first":
        scores = group[0]["scores"]
    elif strategy == "max":
        scores = max(group, key=lambda p: p["scores"].max())["scores"]
    else:  # average
        scores = np.nanmean(np.stack([p["scores"] for p in group]), axis=0)
    best = int(scores.argmax())
    return {
        "entity": labels[best],
        "score": float(scores[best]),
        "word": tokenizer.convert_tokens_to_string([p["word"] for p in group]),
        "start": group[0]["start"],
        "end": group[-1]["end"],
    }


def _group_entities(entities: list[dict], tokenizer) -> list[dict]:
    groups, current = [], []
    for entity in entities:
        if current:
            bi, tag = _bio(entity["entity"])
            _, last_tag = _bio(current[-1]["entity"])
            if tag != last_tag or bi == "B":
                groups.append(_group(current, tokenizer))
                current = []
        current.append(entity)
    if current:
        groups.append(_group(current, tokenizer))
    return groups


def _group(entities: list[dict], tokenizer) -> dict:
    return {
        "entity_group": entities[0]["entity"].split("-", 1)[-1],
        "score": float(np.nanmean([e["score"] for e in entities])),
        "word": tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
        "start": entities[0]["start"],
        "end": entities[-1]["end"],
    }


def _bio(label: str) -> tuple[str, str]:
    """("B" | "I", tag) of a label; a label without B-/I- continues ("I")."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def _merge_overlapping(entities: list[dict]) -> list[dict]:
    """Entities found in overlapping windows: of those that overlap keep the longer (then the
    higher-scoring) one, as transformers does."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    merged, previous = [], entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            length = entity["end"] - entity["start"]
            previous_length = previous["end"] - previous["start"]
            if length > previous_length or (
                length == previous_length and entity["score"] > previous["score"]
            ):
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    merged.append(previous)
    return merged
