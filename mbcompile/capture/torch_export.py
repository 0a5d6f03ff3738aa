"""Capture a Hugging Face MobileBERT with ``torch.export`` and import it into Relax.

The model is wrapped so that the exported function always takes the four inputs
``(input_ids, attention_mask, token_type_ids, lengths)`` at the compiled static shape and returns
the ModelOutput's tensors as a flat tuple (``lengths``: see ``_FlatOutputs``). Weights are bound into the Relax module as constants, so
later passes can fold them.
"""

from __future__ import annotations

import logging

import torch
import tvm
from tvm.relax.frontend.torch import from_exported_program

from mbcompile.capture.captured import DEFAULT_NUM_CHOICES, Captured
from mbcompile.capture.relax_forms import bounded_gathers
from mbcompile.errors import ModelError, OptionError
from mbcompile.heads import head_of_class
from mbcompile.options import check_shape
from mbcompile.signature import OutputSpec, Signature

logger = logging.getLogger(__name__)


class _FlatOutputs(torch.nn.Module):
    """Calls the HF model with all its inputs and returns its outputs as a flat tuple.

    The exported function takes a fourth input, ``lengths``: each row's real length (the rest is
    padding the runtime added). The word embeddings are looked up here and zeroed past it before
    the model reads them (as ``inputs_embeds``): MobileBERT's trigram input concatenates each
    token's embedding with its neighbours', so the embedding of the padding id (not zero in
    trained checkpoints) would otherwise leak into the last real token whenever an input is
    padded. With ``lengths`` at full length the product is by 1.0, HF's result bit for bit.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def outputs(self, input_ids, attention_mask, token_type_ids, lengths) -> dict:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        real = (positions < lengths.unsqueeze(-1)).unsqueeze(-1)
        embeds = self.model.get_input_embeddings()(input_ids)
        return self.model(
            inputs_embeds=embeds * real.to(embeds.dtype),
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
        )

    def forward(self, input_ids, attention_mask, token_type_ids, lengths):
        return tuple(_flatten(self.outputs(input_ids, attention_mask, token_type_ids, lengths)))


def _flatten(out) -> list:
    flat = []
    for value in out.values():
        if isinstance(value, (tuple, list)):
            flat.extend(value)
        else:
            flat.append(value)
    return flat


def _bounded_gathers(mod: tvm.IRModule) -> tvm.IRModule:
    mod = mod.clone()
    mod["main"] = bounded_gathers(mod["main"])
    return mod


def check_model(model) -> str:
    """The head name of ``model``, or ModelError if it is not a Hugging Face MobileBERT (or
    an ONNX one, ``OnnxModel``)."""
    from mbcompile.capture.onnx_model import OnnxModel

    if isinstance(model, OnnxModel):
        return model.head
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


def _export_inputs(config, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` and every row's length (all full) for the exported function."""
    lengths = torch.full(shape[:-1], shape[-1], dtype=torch.long)
    return (*example_inputs(config, shape, seed), lengths)


def _output_specs(
    wrapper, config, shape: tuple[int, ...]
) -> tuple[tuple[OutputSpec, ...], tuple[str, ...]]:
    """Names, shapes and sequence axes of the outputs, found by running eager at two lengths."""
    seq_len = shape[-1]
    other = seq_len - 1 if seq_len > 1 else seq_len + 1
    with torch.no_grad():
        out = wrapper.outputs(*_export_inputs(config, shape))
        out_other = wrapper.outputs(*_export_inputs(config, shape[:-1] + (other,)))
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


def _export_static(wrapper, args: tuple) -> tvm.IRModule:
    with torch.no_grad():
        exported = torch.export.export(wrapper, args)
    return _bounded_gathers(from_exported_program(exported))


def _export_dynamic(wrapper, args: tuple, seq_lens: tuple[int, ...]):
    """``main`` imported with a symbolic sequence length, and that length's variable; None when
    torch.export or the importer cannot keep the length symbolic for this model."""
    seq = torch.export.Dim("seq", min=min(seq_lens), max=max(seq_lens))
    axis = args[0].ndim - 1
    dynamic = ({axis: seq}, {axis: seq}, {axis: seq}, None)
    try:
        with torch.no_grad():
            exported = torch.export.export(wrapper, args, dynamic_shapes=dynamic)
        main = _bounded_gathers(from_exported_program(exported))["main"]
    except Exception as err:  # noqa: BLE001 - torch's and TVM's errors have no common base
        logger.info("dynamic-length capture failed, exporting each length: %s", err)
        return None
    symbolic = list(tvm.relax.analysis.defined_symbolic_vars(main))
    return (main, symbolic[0]) if len(symbolic) == 1 else None


def _export(wrapper, config, shape: tuple[int, ...], seq_lens: tuple[int, ...]) -> tvm.IRModule:
    """The exported program in Relax: one function per length of ``seq_lens``, each with
    static shapes (``Signature.function_name``).

    Several lengths are exported once, with the sequence axis dynamic, and the imported
    function is specialised to each length: one export and one import instead of one per
    length, and the passes then see static shapes, as for a single length. Where the length
    cannot stay symbolic (the multiple-choice head's reshapes, in TVM 0.27's importer), each
    length is exported on its own.
    """
    longest = max(seq_lens)
    if len(seq_lens) == 1:
        return _export_static(wrapper, _export_inputs(config, shape))
    functions = {}
    dynamic = _export_dynamic(wrapper, _export_inputs(config, shape), seq_lens)
    for n in seq_lens:
        name = Signature.function_name(n, longest)
        if dynamic is not None:
            main, length = dynamic
            # Fresh variables: Relax functions of one module must not share them.
            func = tvm.relax.utils.copy_with_new_vars(main.bind_symbolic_vars({length: n}))
        else:
            func = _export_static(wrapper, _export_inputs(config, shape[:-1] + (n,)))["main"]
        functions[tvm.ir.GlobalVar(name)] = func.with_attr("global_symbol", name)
    return tvm.IRModule(functions)


def capture(
    model: torch.nn.Module,
    *,
    seq_len: int | None = None,
    batch_size: int = 1,
    num_choices: int | None = None,
    seq_lens: tuple[int, ...] | None = None,
) -> Captured:
    """Export ``model`` at static ``(batch, [choices,] seq)`` shapes and import it into Relax.

    ``seq_lens``: the sequence lengths to compile, each a function of the module (``main``
    for the longest, ``seq_<n>`` for the others); or ``seq_len`` alone. The module computes
    everything the model returns (logits at every position included);
    ``compile(..., logits_for="masked")`` prunes the vocabulary projection afterwards with the
    ``PruneMaskedLMHead`` pass.
    """
    head = check_model(model)
    config = model.config
    if head == "multiple-choice" and num_choices is None:
        num_choices = DEFAULT_NUM_CHOICES
    if seq_lens is None:
        seq_lens = (seq_len,)
    seq_lens = tuple(sorted(set(seq_lens)))
    for n in seq_lens:
        check_shape(n, batch_size, num_choices)
    seq_len = seq_lens[-1]
    if seq_len > config.max_position_embeddings:
        raise OptionError(
            f"seq_len={seq_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    if head == "multiple-choice":
        shape: tuple[int, ...] = (batch_size, num_choices, seq_len)
    else:
        if num_choices is not None:
            raise OptionError(
                f"num_choices applies to the multiple-choice head only, not {head!r}"
            )
        shape = (batch_size, seq_len)

    was_training = model.training
    model.eval()
    try:
        wrapper = _FlatOutputs(model)
        outputs, fields = _output_specs(wrapper, config, shape)
        mod = _export(wrapper, config, shape, seq_lens)
    finally:
        model.train(was_training)

    signature = Signature(
        model_class=type(model).__name__,
        head=head,
        batch_size=batch_size,
        seq_len=seq_len,
        seq_lens=seq_lens if len(seq_lens) > 1 else (),
        num_choices=num_choices,
        vocab_size=config.vocab_size,
        type_vocab_size=config.type_vocab_size,
        outputs=outputs,
        fields=fields,
        takes_lengths=True,
    )
    return Captured(mod=mod, signature=signature, config=config.to_dict())
