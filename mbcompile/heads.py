"""The eight Hugging Face MobileBERT heads and the short names the CLI uses for them."""

from __future__ import annotations

from mbcompile.errors import ModelError

# short name → transformers class name, in the order of transformers' documentation.
HEADS: dict[str, str] = {
    "base": "MobileBertModel",
    "pretraining": "MobileBertForPreTraining",
    "masked-lm": "MobileBertForMaskedLM",
    "next-sentence": "MobileBertForNextSentencePrediction",
    "sequence-classification": "MobileBertForSequenceClassification",
    "multiple-choice": "MobileBertForMultipleChoice",
    "token-classification": "MobileBertForTokenClassification",
    "question-answering": "MobileBertForQuestionAnswering",
}
CLASS_TO_HEAD = {cls: head for head, cls in HEADS.items()}


def head_class_name(head: str) -> str:
    """The transformers class for a head name (or a class name given as is)."""
    if head in HEADS:
        return HEADS[head]
    if head in CLASS_TO_HEAD:
        return head
    raise ModelError(f"Unknown head {head!r}; known: {list(HEADS)}")


def head_of_class(class_name: str) -> str:
    try:
        return CLASS_TO_HEAD[class_name]
    except KeyError:
        raise ModelError(
            f"{class_name} is not a supported MobileBERT model; supported classes: "
            f"{list(CLASS_TO_HEAD)}"
        ) from None
