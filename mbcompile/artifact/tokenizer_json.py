"""``tokenizer.json`` for a WordPiece ``vocab.txt``: what compile stores beside a checkpoint's
vocabulary, so that the pipelines tokenize with the ``tokenizers`` library alone.

BERT's normaliser (clean text, Chinese characters, accents and lower case as the
tokenizer_config.json says), pre-tokeniser, WordPiece model, ``[CLS] A [SEP] B [SEP]``
post-processor and decoder: the components transformers' ``BertConverter`` builds (the pipeline
tests compare the token ids with transformers' ``BertTokenizerFast`` on the same vocabulary).
"""

from __future__ import annotations

import json

BERT_SPECIAL = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}


def tokenizer_json_from_vocab(vocab: bytes, config: dict | None = None) -> bytes:
    """``tokenizer.json`` for a WordPiece ``vocab.txt`` (lower-casing and accent stripping as the
    tokenizer_config.json says; BERT's defaults otherwise)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    config = config or {}
    words = [w.rstrip("\n") for w in vocab.decode("utf-8").split("\n")]
    if words and words[-1] == "":
        words.pop()
    table = {w: i for i, w in enumerate(words)}  # a repeated word keeps its last index, as BERT's
    special = {k: config.get(k, v) for k, v in BERT_SPECIAL.items()}
    special = {k: v["content"] if isinstance(v, dict) else v for k, v in special.items()}
    tok = Tokenizer(models.WordPiece(table, unk_token=special["unk_token"]))
    lower = bool(config.get("do_lower_case", True))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"),
        lowercase=lower,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = special["cls_token"], special["sep_token"]
    missing = [t for t in (cls, sep) if t not in table]
    if missing:  # every text would start and end with another token's id
        raise ValueError(f"vocab.txt has no {' or '.join(missing)} (the classifier/separator token)")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, table.get(cls, 0)), (sep, table.get(sep, 0))],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    present = [v for v in special.values() if v in table]
    tok.add_special_tokens([AddedToken(v, special=True, normalized=False) for v in present])
    return tok.to_str().encode("utf-8")



def tokenizer_settings(files: dict[str, bytes]) -> dict:
    """tokenizer_config.json's settings with special_tokens_map.json's tokens over them, as
    transformers reads a folder without tokenizer.json ({} for files that are not JSON
    objects: refused where the tokenizer is loaded)."""
    merged: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            values = json.loads(files.get(name, b"{}") or b"{}")
        except ValueError:
            values = {}
        if isinstance(values, dict):
            if name == "special_tokens_map.json":
                values = {k: v for k, v in values.items() if k in BERT_SPECIAL}
            merged.update(values)
    return merged


def mask_token_id(files: dict[str, bytes]) -> int | None:
    """The [MASK] id of tokenizer files (their mask token, as ``tokenizer_settings`` names
    it, looked up in tokenizer.json or vocab.txt); None when there is none or the files
    cannot be read (the pipelines say why when they load them)."""
    mask = tokenizer_settings(files).get("mask_token", BERT_SPECIAL["mask_token"])
    mask = mask.get("content") if isinstance(mask, dict) else mask
    try:
        if "tokenizer.json" in files:
            from tokenizers import Tokenizer

            return Tokenizer.from_str(files["tokenizer.json"].decode("utf-8")).token_to_id(mask)
        if "vocab.txt" in files:
            words = files["vocab.txt"].decode("utf-8").split("\n")
            return len(words) - 1 - words[::-1].index(mask) if mask in words else None
    except Exception:  # noqa: BLE001 - tokenizers raises bare Exception on a damaged file
        return None
    return None


def with_tokenizer_json(files: dict[str, bytes]) -> dict[str, bytes]:
    """``files`` with a ``tokenizer.json`` made from ``vocab.txt`` when it has none."""
    if "tokenizer.json" in files or "vocab.txt" not in files:
        return dict(files)
    settings = tokenizer_settings(files)
    try:
        converted = tokenizer_json_from_vocab(files["vocab.txt"], settings)
    except Exception:  # noqa: BLE001 - a damaged vocabulary: stored as given, refused when loaded
        return dict(files)
    return {**files, "tokenizer.json": converted}
