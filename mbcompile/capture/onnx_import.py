"""Import an ONNX MobileBERT (``OnnxModel``) into Relax: the same interface and op forms as a
torch.export capture, so the same passes, targets and runtime apply.

For each compiled length:

1. the graph gets the interface of ``torch_export``: inputs ``(input_ids, attention_mask,
   token_type_ids, lengths)`` (a ``token_type_ids`` the file lacks is taken and unused), and the
   word embeddings are zeroed past each row's ``lengths`` before anything reads them (the
   trigram input would otherwise carry the [PAD] row's embedding into the last real token);
2. its inputs get static shapes and ONNX Runtime's basic level folds the shape arithmetic
   into constants (TVM's importer refuses a ``Pad`` whose pads are computed, which is how
   exporters write the trigram's shifts with a dynamic length);
3. ``tvm.relax.frontend.onnx.from_onnx`` imports it with the weights bound as constants;
4. ``relax_forms`` brings the module to torch.export's forms: shape arithmetic folded, gather
   indices as given, the 4-D attention matmuls between reshapes, decomposed layer norms as one
   op, gathers bounded.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import tvm

from mbcompile.capture.captured import DEFAULT_NUM_CHOICES, Captured
from mbcompile.capture.onnx_model import OnnxModel
from mbcompile.capture.relax_forms import (
    batched_matmuls_as_3d,
    bounded_gathers,
    layer_norms,
    plain_gather_indices,
    static_shapes_as_constants,
    tuple_output,
)
from mbcompile.errors import ModelError, OptionError
from mbcompile.options import check_shape
from mbcompile.signature import INPUT_NAMES, OutputSpec, Signature

_PREFIX = "mbcompile_"


def with_lengths(model: OnnxModel):
    """A copy of the model's graph with the interface of step 1 (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    by_name = {i.name: i for i in graph.input}
    ids = by_name["input_ids"]
    dims = [d.dim_param or d.dim_value for d in ids.type.tensor_type.shape.dim]
    for name in INPUT_NAMES:  # int64 in, as the runtime passes them; cast to what the graph takes
        tensor_type = by_name[name].type.tensor_type if name in by_name else None
        if tensor_type is None or tensor_type.elem_type == TensorProto.INT64:
            continue
        given = _PREFIX + name
        for node in graph.node:
            for i, used in enumerate(node.input):
                if used == name:
                    node.input[i] = given
        graph.node.insert(0, helper.make_node("Cast", [name], [given], to=tensor_type.elem_type))
        tensor_type.elem_type = TensorProto.INT64
    if "token_type_ids" not in by_name:
        by_name["token_type_ids"] = helper.make_tensor_value_info(
            "token_type_ids", TensorProto.INT64, dims
        )
    by_name["lengths"] = helper.make_tensor_value_info("lengths", TensorProto.INT64, dims[:-1])
    others = [i for i in graph.input if i.name not in by_name]  # initializers listed as inputs
    del graph.input[:]
    graph.input.extend([by_name[n] for n in (*INPUT_NAMES, "lengths")] + others)

    words = model.word_embeddings
    masked = _PREFIX + "masked_words"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == words:
                node.input[i] = masked
    if any(out.name == words for out in graph.output):
        raise ModelError(f"{model.path}: the word embeddings are an output of the graph")

    def name(s: str) -> str:
        return _PREFIX + s

    graph.initializer.extend(
        [
            helper.make_tensor(name("zero"), TensorProto.INT64, [], [0]),
            helper.make_tensor(name("one"), TensorProto.INT64, [], [1]),
            helper.make_tensor(name("last"), TensorProto.INT64, [], [-1]),
            helper.make_tensor(name("column"), TensorProto.INT64, [2], [-1, 1]),
            helper.make_tensor(name("start"), TensorProto.INT64, [1], [0]),
            helper.make_tensor(name("stop"), TensorProto.INT64, [1], [-1]),
            helper.make_tensor(name("unit"), TensorProto.INT64, [1], [1]),
        ]
    )
    nodes = [
        helper.make_node("Shape", ["input_ids"], [name("ids_shape")]),
        helper.make_node("Gather", [name("ids_shape"), name("last")], [name("seq")], axis=0),
        helper.make_node("Range", [name("zero"), name("seq"), name("one")], [name("positions")]),
        helper.make_node("Reshape", ["lengths", name("column")], [name("row_lengths")]),
        helper.make_node("Less", [name("positions"), name("row_lengths")], [name("real")]),
        helper.make_node("Cast", [name("real")], [name("real_f")], to=TensorProto.FLOAT),
        helper.make_node("Shape", [words], [name("words_shape")]),
        helper.make_node(
            "Slice", [name("words_shape"), name("start"), name("stop")], [name("lead")]
        ),
        helper.make_node("Concat", [name("lead"), name("unit")], [name("mask_shape")], axis=0),
        helper.make_node("Reshape", [name("real_f"), name("mask_shape")], [name("mask")]),
        helper.make_node("Mul", [words, name("mask")], [masked]),
    ]
    position = next(i for i, node in enumerate(graph.node) if words in node.output) + 1
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    return proto


def _static(proto, shape: tuple[int, ...]):
    """A copy of ``proto`` with its inputs at ``shape`` (``lengths`` at ``shape[:-1]``)."""
    import onnx

    static = onnx.ModelProto()
    static.CopyFrom(proto)
    for inp in static.graph.input:
        if inp.name not in (*INPUT_NAMES, "lengths"):
            continue
        dims = shape if inp.name != "lengths" else shape[:-1]
        tensor_shape = inp.type.tensor_type.shape
        del tensor_shape.dim[:]
        for n in dims:
            tensor_shape.dim.add().dim_value = n
    return static


def _folded(proto, workdir: Path):
    """``proto`` after ONNX Runtime's basic graph optimisations (constant folding, shapes
    included), as an onnx.ModelProto."""
    import onnx
    import onnxruntime as ort

    source, folded = workdir / "static.onnx", workdir / "folded.onnx"
    onnx.save(proto, str(source))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own unrelated types
        raise ModelError(f"ONNX Runtime cannot load the graph at a static shape: {err}") from None
    return onnx.load(str(folded))


@contextlib.contextmanager
def _native_warnings_silenced():
    """Standard error (file descriptor 2) sent to /dev/null: TVM logs a warning from C++ for
    every gather in the "fast" mode that the importer writes (``bounded_gathers`` replaces
    them) or constant folding evaluates. Errors still come back as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _import(model: OnnxModel, proto, shape: tuple[int, ...], workdir: Path, builder):
    """Relax ``main`` of ``proto`` at ``shape``; the TIR functions it calls (the importer
    writes ``Pad`` as one) are added to ``builder``'s module under names of their own."""
    from tvm.relax.dpl import is_op, rewrite_call, wildcard
    from tvm.relax.frontend.onnx import from_onnx

    folded = _folded(_static(proto, shape), workdir)
    try:
        with _native_warnings_silenced():
            mod = from_onnx(folded, keep_params_in_input=False)
    except Exception as err:  # noqa: BLE001 - the importer raises many unrelated types
        reason = " ".join(str(err).split())[:300]
        raise ModelError(f"{model.path}: TVM's ONNX importer refuses the graph ({reason})") from None
    renamed = {}
    for gvar, func in mod.functions_items():
        if gvar.name_hint != "main":
            renamed[gvar.name_hint] = builder.add_func(func, f"{gvar.name_hint}_{shape[-1]}")

    def rename(call, _matches):
        new = renamed.get(call.args[0].name_hint)
        if new is None:
            return call
        return tvm.relax.Call(call.op, [new, *call.args[1:]], call.attrs, call.ty_args)

    main = rewrite_call(is_op("relax.call_tir")(wildcard(), wildcard()), rename, mod["main"])
    rewrites = (
        static_shapes_as_constants, plain_gather_indices, bounded_gathers,
        batched_matmuls_as_3d, layer_norms, tuple_output,
    )
    with _native_warnings_silenced():  # FoldConstant evaluates "fast" gathers on constants
        for rewrite in rewrites:
            main = rewrite(main)
    return main.without_attr("num_input") if "num_input" in (main.attrs or {}) else main


def _output_specs(model: OnnxModel, shape: tuple[int, ...], dynamic: bool):
    """Names, shapes and sequence axes of the outputs, from ONNX Runtime at two lengths (at one
    when the file's length is fixed: the axes of that length then count as sequence axes)."""

    def run(n: int) -> dict[str, np.ndarray]:
        at = shape[:-1] + (n,)
        batch = {
            "input_ids": np.ones(at, np.int64),
            "attention_mask": np.ones(at, np.int64),
            "token_type_ids": np.zeros(at, np.int64),
        }
        return model.outputs_for(batch)

    seq_len = shape[-1]
    out = run(seq_len)
    other = run(seq_len - 1 if seq_len > 1 else seq_len + 1) if dynamic else None
    specs = []
    for name, value in out.items():
        if other is not None:
            seq_axes = tuple(
                a for a, (n, m) in enumerate(zip(value.shape, other[name].shape)) if n != m
            )
        else:
            seq_axes = tuple(a for a, n in enumerate(value.shape) if a > 0 and n == seq_len)[:1]
        specs.append(OutputSpec(name=name, shape=tuple(value.shape), dtype="float32",
                                seq_axes=seq_axes))
    return tuple(specs)


def capture_onnx(
    model: OnnxModel,
    *,
    seq_lens: tuple[int, ...],
    batch_size: int = 1,
    num_choices: int | None = None,
):
    """Import ``model`` at static ``(batch, [choices,] seq)`` shapes: one function per length
    of ``seq_lens`` (``Signature.function_name``), as ``torch_export.capture`` does."""
    seq_lens = tuple(sorted(set(seq_lens)))
    choices_axis = len(model.input_axes) == 3
    if choices_axis and num_choices is None:
        num_choices = model.input_axes[1].size or DEFAULT_NUM_CHOICES
    if not choices_axis and num_choices is not None:
        raise OptionError(f"num_choices applies to the multiple-choice head only, not {model.head!r}")
    for n in seq_lens:
        check_shape(n, batch_size, num_choices)
    fixed = model.fixed_seq_len
    if fixed is not None and seq_lens != (fixed,):
        raise OptionError(
            f"{model.path.name} is exported for {fixed} tokens only (its sequence axis is not "
            f"dynamic): compile it with seq_len={fixed}, or export it with dynamic axes"
        )
    if model.fixed_batch_size is not None and model.fixed_batch_size != batch_size:
        raise OptionError(
            f"{model.path.name} is exported for batch {model.fixed_batch_size}: compile it with "
            f"batch_size={model.fixed_batch_size}, or export it with a dynamic batch axis"
        )
    if choices_axis and model.input_axes[1].size not in (None, num_choices):
        raise OptionError(
            f"{model.path.name} is exported for {model.input_axes[1].size} choices: compile it "
            f"with num_choices={model.input_axes[1].size}"
        )
    max_positions = model.config.max_position_embeddings
    if seq_lens[-1] > max_positions:
        raise OptionError(
            f"seq_len={seq_lens[-1]} exceeds the model's max_position_embeddings={max_positions}"
        )
    prefix = (batch_size, num_choices) if choices_axis else (batch_size,)
    proto = with_lengths(model)
    functions = {}
    builder = tvm.relax.BlockBuilder()
    with tempfile.TemporaryDirectory(prefix="mbcompile-onnx-") as tmp:
        for n in seq_lens:
            name = Signature.function_name(n, seq_lens[-1])
            main = _import(model, proto, prefix + (n,), Path(tmp), builder)
            functions[name] = main.with_attr("global_symbol", name)
    mod = builder.get()
    for name, func in functions.items():
        mod[name] = func
    config = model.config
    signature = Signature(
        model_class=model.model_class,
        head=model.head,
        batch_size=batch_size,
        seq_len=seq_lens[-1],
        seq_lens=seq_lens if len(seq_lens) > 1 else (),
        num_choices=num_choices,
        vocab_size=config.vocab_size,
        type_vocab_size=config.type_vocab_size,
        outputs=_output_specs(model, prefix + (seq_lens[-1],), fixed is None),
        fields=model.fields,
        takes_lengths=True,
    )
    return Captured(mod=mod, signature=signature, config=config.to_dict())
