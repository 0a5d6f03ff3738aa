"""Model classes for code written against transformers, in the manner of Optimum's
``ORTModelFor*`` and optimum-intel's ``OVModelFor*``: a compiled MobileBERT behind a
``PreTrainedModel`` whose forward takes and returns what the transformers model does (torch
tensors in, the head's ``ModelOutput`` with torch tensors out), so that transformers' own
``pipeline(task, model=MBCModelForMaskedLM.from_pretrained(...), tokenizer=tok)`` runs it.

    from mbcompile.transformers import MBCModelForMaskedLM
    model = MBCModelForMaskedLM.from_pretrained("google/mobilebert-uncased")  # compiles
    model.save_pretrained("mlm-compiled")              # model.mbc + config.json (+ tokenizer)
    model = MBCModelForMaskedLM.from_pretrained("mlm-compiled")              # loads, no compile

Needs torch and transformers (the ``compile`` extra); compiling needs them anyway, and a model
loaded from a saved folder runs with the TVM runtime beneath.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import transformers
from transformers import MobileBertConfig, PreTrainedModel, modeling_outputs

from mbcompile.errors import InputError, ModelError
from mbcompile.runtime import CompiledModel
from mbcompile.runtime import load as load_artifact

ARTIFACT_NAME = "model.mbc"

# Each head's transformers output class (for the compiled outputs' fields).
_OUTPUTS = {
    "base": modeling_outputs.BaseModelOutputWithPooling,
    "masked-lm": modeling_outputs.MaskedLMOutput,
    "sequence-classification": modeling_outputs.SequenceClassifierOutput,
    "token-classification": modeling_outputs.TokenClassifierOutput,
    "question-answering": modeling_outputs.QuestionAnsweringModelOutput,
    "multiple-choice": modeling_outputs.MultipleChoiceModelOutput,
    "next-sentence": modeling_outputs.NextSentencePredictorOutput,
    "pretraining": transformers.models.mobilebert.modeling_mobilebert.MobileBertForPreTrainingOutput,
}


class MBCPreTrainedModel(PreTrainedModel):
    """A compiled MobileBERT with transformers' model interface (``config``, ``forward``,
    ``from_pretrained``, ``save_pretrained``). Subclasses fix the head."""

    config_class = MobileBertConfig
    base_model_prefix = "mbcompile"
    main_input_name = "input_ids"
    head: ClassVar[str] = ""
    # One compiled length: a folder with a model.mbc, or a compile of the given checkpoint.
    compile_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: MobileBertConfig, compiled: CompiledModel):
        super().__init__(config)
        if compiled.signature.head != self.head:
            raise ModelError(
                f"{type(self).__name__} runs a {self.head!r} model; this artifact is a "
                f"{compiled.signature.model_class} (head {compiled.signature.head!r})"
            )
        if compiled.signature.max_masked is not None:
            raise ModelError(
                f"{type(self).__name__} returns the logits at every position, as transformers "
                f"does; this artifact was compiled with logits_for='masked'"
            )
        self.compiled = compiled

    # No parameters to read these from (transformers' pipelines ask): the CPU, fp32.
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    # -- loading and saving ----------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, num_threads: int | None = None, **compile_options
    ) -> MBCPreTrainedModel:
        """A folder written by ``save_pretrained`` (or an ``.mbc`` artifact) loads as is; a
        transformers checkpoint (a folder with weights, or a hub id) is compiled for this head
        (``compile_options``: those of ``mbcompile.compile``)."""
        path = Path(name_or_path)
        artifact_path = path / ARTIFACT_NAME if path.is_dir() else path
        if artifact_path.is_file() and artifact_path.suffix == ".mbc":
            if compile_options:
                raise InputError(
                    f"{sorted(compile_options)}: compile options apply to a checkpoint, not to "
                    f"the compiled {artifact_path}"
                )
            compiled = load_artifact(artifact_path, num_threads=num_threads)
        else:
            from mbcompile.compiler import compile as compile_model

            compiled = compile_model(
                name_or_path, head=cls.head, **{**cls.compile_defaults, **compile_options}
            )
            if num_threads is not None:
                compiled = compiled.with_threads(num_threads)
        config = MobileBertConfig.from_dict(compiled.metadata.config)
        return cls(config, compiled)

    def save_pretrained(self, save_directory: str | os.PathLike, **_ignored) -> None:
        """``model.mbc`` (with its tokenizer files) and ``config.json`` into the folder."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.compiled.save(folder / ARTIFACT_NAME)
        self.config.save_pretrained(folder)

    # -- running -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        unused = sorted(k for k, v in kwargs.items() if v is not None)
        if unused:
            raise InputError(f"{type(self).__name__} does not take {unused}")
        out = self.compiled(
            input_ids=_numpy(input_ids),
            attention_mask=_numpy(attention_mask),
            token_type_ids=_numpy(token_type_ids),
            return_dict=True,
        )
        fields = {name: _torch(value) for name, value in out.items()}
        result = _OUTPUTS[self.head](**{k: v for k, v in fields.items() if not _empty(v)})
        if return_dict is None:  # as transformers' models: the config decides
            return_dict = self.config.return_dict is not False
        return result if return_dict else result.to_tuple()

    def _init_weights(self, module) -> None:  # no weights of our own
        pass


def _numpy(value):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _torch(value):
    if isinstance(value, tuple):
        return tuple(_torch(v) for v in value)
    return torch.from_numpy(np.ascontiguousarray(value))


def _empty(value) -> bool:
    return isinstance(value, tuple) and not value


def _class(head: str, name: str):
    return type(name, (MBCPreTrainedModel,), {"head": head, "__module__": __name__})


MBCModel = _class("base", "MBCModel")
MBCModelForMaskedLM = _class("masked-lm", "MBCModelForMaskedLM")
MBCModelForSequenceClassification = _class(
    "sequence-classification", "MBCModelForSequenceClassification"
)
MBCModelForTokenClassification = _class("token-classification", "MBCModelForTokenClassification")
MBCModelForQuestionAnswering = _class("question-answering", "MBCModelForQuestionAnswering")
MBCModelForMultipleChoice = _class("multiple-choice", "MBCModelForMultipleChoice")
MBCModelForNextSentencePrediction = _class("next-sentence", "MBCModelForNextSentencePrediction")
MBCModelForPreTraining = _class("pretraining", "MBCModelForPreTraining")

__all__ = [
    "MBCModel",
    "MBCModelForMaskedLM",
    "MBCModelForMultipleChoice",
    "MBCModelForNextSentencePrediction",
    "MBCModelForPreTraining",
    "MBCModelForQuestionAnswering",
    "MBCModelForSequenceClassification",
    "MBCModelForTokenClassification",
    "MBCPreTrainedModel",
]
