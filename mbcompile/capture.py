"""Capture a Hugging Face MobileBERT with ``torch.export`` and import it into Relax.

The model is wrapped so that the exported function always takes the three inputs
``(input_ids, attention_mask, token_type_ids)`` at the compiled static shape and returns the
ModelOutput's tensors as a flat tuple. Weights are bound into the Relax module as constants, so
later passes can fold them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tvm
from tvm.relax.frontend.torch import from_exported_program

from .errors import ModelError
from .heads import head_of_class
from .signature import OutputSpec, Signature

DEFAULT_NUM_CHOICES = 4


@dataclass
class Captured:
    mod: tvm.IRModule
    signature: Signature
    config: dict


class _FlatOutputs(torch.nn.Module):
    """Calls the HF model with all three inputs and returns its outputs as a flat tuple."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def outputs(self, input_ids, attention_mask, token_type_ids) -> dict:
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
        )

    def forward(self, input_ids, attention_mask, token_type_ids):
        return tuple(_flatten(self.outputs(input_ids, attention_mask, token_type_ids)))


def _flatten(out) -> list:
    flat = []
    for value in out.values():
        if isinstance(value, (tuple, list)):
            flat.extend(value)
        else:
            flat.append(value)
    return flat


def _bounded_gathers(mod: tvm.IRModule) -> tvm.IRModule:
    """``R.take(mode="fast")`` → ``mode="clip"``.

    The importer's gathers (embedding tables, the pooler's first token) skip the bounds check.
    The runtime range-checks token and type ids before anything runs; clipped gathers keep even
    an unchecked caller (a remote program, a hand-made call) from reading outside a table, for
    the cost of two integer compares per index.
    """
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    data, indices = wildcard(), wildcard()
    pattern = is_op("relax.take")(data, indices)

    def clip(call, matches):
        if call.attrs.mode != "fast":
            return call
        axis = None if call.attrs.axis is None else int(call.attrs.axis)
        return tvm.relax.op.take(matches[data], matches[indices], axis=axis, mode="clip")

    mod = mod.clone()
    mod["main"] = rewrite_call(pattern, clip, mod["main"])
    return mod


def check_model(model) -> str:
    """The head name of ``model``, or ModelError if it is not a Hugging Face MobileBERT."""
    try:
        from transformers import MobileBertPreTrainedModel
    except ImportError as err:  # pragma: no cover - transformers is a compile dependency
        raise ModelError("compiling needs transformers: pip install 'mbcompile[compile]'") from err
    if not isinstance(model, MobileBertPreTrainedModel):
        raise ModelError(
            f"expected a transformers MobileBERT model (MobileBertPreTrainedModel), "
            f"got {type(model).__module__}.{type(model).__name__}"
        )
    return head_of_class(type(model).__name__)


def example_inputs(config, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Valid random inputs of ``shape``: token ids, a mask of ones, one segment."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, shape, generator=gen)
    return ids, torch.ones(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)


def _output_specs(
    wrapper, config, shape: tuple[int, ...]
) -> tuple[tuple[OutputSpec, ...], tuple[str, ...]]:
    """Names, shapes and sequence axes of the outputs, found by running eager at two lengths."""
    seq_len = shape[-1]
    other = seq_len - 1 if seq_len > 1 else seq_len + 1
    with torch.no_grad():
        out = wrapper.outputs(*example_inputs(config, shape))
        out_other = wrapper.outputs(*example_inputs(config, shape[:-1] + (other,)))
    specs = []
    for (name, value), value_other in zip(out.items(), out_other.values()):
        grouped = isinstance(value, (tuple, list))
        tensors = list(value) if grouped else [value]
        others = list(value_other) if grouped else [value_other]
        for i, (t, t_other) in enumerate(zip(tensors, others)):
            seq_axes = tuple(a for a, (n, m) in enumerate(zip(t.shape, t_other.shape)) if n != m)
            specs.append(
                OutputSpec(
                    name=name,
                    shape=tuple(t.shape),
                    dtype=str(t.dtype).removeprefix("torch."),
                    seq_axes=seq_axes,
                    index=i if grouped else None,
                )
            )
    return tuple(specs), tuple(out.keys())


def capture(
    model: torch.nn.Module,
    *,
    seq_len: int,
    batch_size: int = 1,
    num_choices: int | None = None,
) -> Captured:
    """Export ``model`` at a static ``(batch, [choices,] seq)`` shape and import it into Relax.

    The module computes everything the model returns (logits at every position included);
    ``compile(..., logits_for="masked")`` prunes the vocabulary projection afterwards with the
    ``PruneMaskedLMHead`` pass.
    """
    head = check_model(model)
    config = model.config
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if seq_len > config.max_position_embeddings:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if head == "multiple-choice":
        num_choices = DEFAULT_NUM_CHOICES if num_choices is None else num_choices
        if not isinstance(num_choices, int) or num_choices < 1:
            raise ValueError(f"num_choices must be a positive integer, got {num_choices!r}")
        shape: tuple[int, ...] = (batch_size, num_choices, seq_len)
    else:
        if num_choices is not None:
            raise ValueError(f"num_choices applies to the multiple-choice head only, not {head!r}")
        shape = (batch_size, seq_len)

    was_training = model.training
    model.eval()
    try:
        wrapper = _FlatOutputs(model)
        outputs, fields = _output_specs(wrapper, config, shape)
        with torch.no_grad():
            exported = torch.export.export(wrapper, example_inputs(config, shape))
        mod = _bounded_gathers(from_exported_program(exported))
    finally:
        model.train(was_training)

    signature = Signature(
        model_class=type(model).__name__,
        head=head,
        batch_size=batch_size,
        seq_len=seq_len,
        num_choices=num_choices,
        vocab_size=config.vocab_size,
        type_vocab_size=config.type_vocab_size,
        outputs=outputs,
        fields=fields,
    )
    return Captured(mod=mod, signature=signature, config=config.to_dict())
