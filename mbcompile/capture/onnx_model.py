"""An ONNX export of a Hugging Face MobileBERT, as ``compile`` takes it: ``load_onnx(path)``.

Exports from ``torch.onnx.export`` (the TorchScript exporter at opset 14+ and the dynamo
exporter) and from Optimum (``optimum-cli export onnx``) are covered, with static or dynamic
batch and sequence axes. What the file holds is read from the graph, not from node names:

- inputs: ``input_ids`` and ``attention_mask`` (``token_type_ids`` optional), by the names
  transformers, Optimum and ``torch.onnx`` give them; a 3-D ``input_ids`` is multiple choice;
- the embedding tables: the constant 2-D tables gathered by ``input_ids`` (the vocabulary),
  by ``token_type_ids`` and by constant positions (``max_position_embeddings``);
- the head: ``head=``, else the ``architectures`` of a ``config.json`` beside the file (Optimum
  writes one), else the outputs: their names when they are Hugging Face's
  (``start_logits``, ``last_hidden_state``, ...), their shapes otherwise.

``OnnxModel.outputs_for`` runs the file with ONNX Runtime: the reference ``compile`` checks the
compiled model against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mbcompile.errors import ModelError
from mbcompile.heads import HEADS, head_class_name, head_of_class
from mbcompile.signature import INPUT_NAMES

# Each head's ModelOutput tensors, in Hugging Face's order.
HEAD_OUTPUTS: dict[str, tuple[str, ...]] = {
    "base": ("last_hidden_state", "pooler_output"),
    "pretraining": ("prediction_logits", "seq_relationship_logits"),
    "masked-lm": ("logits",),
    "next-sentence": ("logits",),
    "sequence-classification": ("logits",),
    "multiple-choice": ("logits",),
    "token-classification": ("logits",),
    "question-answering": ("start_logits", "end_logits"),
}
REQUIRED_INPUTS = ("input_ids", "attention_mask")


@dataclass
class Axis:
    """One dimension of a graph input or output: a number, or a name (dynamic)."""

    size: int | None
    name: str | None = None


@dataclass
class OnnxModel:
    """A loaded, checked ONNX MobileBERT (see the module's docstring)."""

    path: Path
    proto: Any  # onnx.ModelProto
    head: str
    inputs: tuple[str, ...]  # the graph's inputs, in its order
    input_axes: tuple[Axis, ...]  # input_ids's axes
    onnx_outputs: tuple[str, ...]  # the graph's output names
    fields: tuple[str, ...]  # the Hugging Face name of each output
    config: Any  # transformers MobileBertConfig
    word_embeddings: str  # the output of the Gather of the word-embedding table by input_ids
    _session: Any = field(default=None, repr=False, compare=False)

    @property
    def model_class(self) -> str:
        return head_class_name(self.head)

    @property
    def fixed_seq_len(self) -> int | None:
        """The sequence length the file is exported for, None when its axis is dynamic."""
        return self.input_axes[-1].size

    @property
    def fixed_batch_size(self) -> int | None:
        return self.input_axes[0].size

    def session(self):
        """An ONNX Runtime session on the file (made once)."""
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(
                self.proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        return self._session

    def outputs_for(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The file's outputs on ``batch`` (numpy, the inputs the file takes), by Hugging
        Face name, computed by ONNX Runtime (in chunks of the file's batch size, if fixed)."""
        rows = int(np.asarray(batch["input_ids"]).shape[0])
        fixed = self.fixed_batch_size
        if fixed is not None and rows != fixed and rows % fixed == 0:
            parts = [
                self.outputs_for({k: np.asarray(v)[i : i + fixed] for k, v in batch.items()})
                for i in range(0, rows, fixed)
            ]
            return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        feeds = {}
        for inp in self.session().get_inputs():
            value = np.asarray(batch[inp.name])
            feeds[inp.name] = value.astype(np.int32 if "int32" in inp.type else np.int64)
        values = self.session().run(list(self.onnx_outputs), feeds)
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.fields, values)}

    __call__ = outputs_for


def is_onnx_path(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".onnx")


def load_onnx(path: str | os.PathLike, head: str | None = None) -> OnnxModel:
    """Load and check ``path`` (ModelError names what is wrong with it)."""
    try:
        import onnx
    except ImportError as err:
        raise ModelError("compiling an ONNX file needs onnx: pip install 'mbcompile[onnx]'") from err
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as err:  # noqa: BLE001 - protobuf's and onnx's errors have no common base
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise ModelError(f"{path}: not a valid ONNX model ({reason})") from None
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    inputs = tuple(i.name for i in graph.input if i.name not in initializers)
    unknown = [name for name in inputs if name not in INPUT_NAMES]
    if unknown:
        raise ModelError(
            f"{path}: the graph takes {unknown}; mbcompile compiles MobileBERT graphs whose "
            f"inputs are among {list(INPUT_NAMES)}"
        )
    missing = [name for name in REQUIRED_INPUTS if name not in inputs]
    if missing:
        raise ModelError(
            f"{path}: the graph has no {' or '.join(missing)} input; export it with "
            f"{' and '.join(REQUIRED_INPUTS)} (padded inputs need the mask)"
        )
    by_name = {i.name: i for i in graph.input}
    axes = _axes(by_name["input_ids"])
    if len(axes) not in (2, 3):
        raise ModelError(f"{path}: input_ids has {len(axes)} axes, expected 2 (or 3: choices)")
    for name in inputs:
        if len(_axes(by_name[name])) != len(axes):
            raise ModelError(f"{path}: {name} and input_ids have different ranks")
    _check_float32(path, graph)
    tables = _embedding_tables(proto)
    if "input_ids" not in tables:
        raise ModelError(
            f"{path}: found no embedding table gathered by input_ids: not a MobileBERT export"
        )
    config = _config(path, proto, tables)
    out_names = tuple(o.name for o in graph.output)
    out_axes = [_axes(o) for o in graph.output]
    head = _head(path, head, config, out_names, out_axes, len(axes))
    fields = _fields(path, head, out_names)
    config.architectures = [head_class_name(head)]
    return OnnxModel(
        path, proto, head, inputs, tuple(axes), out_names, fields, config,
        tables["input_ids"].gathered,
    )


def _check_float32(path: Path, graph) -> None:
    """ModelError when the graph's weights are float16 or bfloat16 (an fp16 export, e.g.
    Optimum's ``--dtype fp16``): its import is float32's."""
    import onnx

    half = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}
    found = sorted({half[i.data_type] for i in graph.initializer if i.data_type in half})
    if found:
        raise ModelError(
            f"{path}: its weights are {' and '.join(found)}; mbcompile imports float32 ONNX "
            "exports (precision='bf16' or 'int8' then picks the matmuls' dtype): export the "
            "model in float32, or compile its PyTorch checkpoint, whose half-precision weights "
            "are converted"
        )


def _axes(value_info) -> list[Axis]:
    dims = value_info.type.tensor_type.shape.dim
    return [Axis(d.dim_value or None, d.dim_param or None) for d in dims]


class Table(NamedTuple):
    """A constant fp32 embedding table the graph gathers rows of."""

    rows: int
    width: int
    gathered: str  # the Gather's output


def _embedding_tables(proto) -> dict[str, Table]:
    """The constant 2-D tables the graph gathers rows of, by what indexes them: a graph input's
    name, or ``"positions"`` for constant indices."""
    from onnx import TensorProto

    graph = proto.graph
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                constants[node.output[0]] = attr.t
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {i.name for i in graph.input}
    seen: dict[str, str | None] = {}

    def source(name: str, depth: int = 0) -> str | None:
        """The graph input an index tensor comes from, "positions" if from constants only."""
        if name not in seen:
            seen[name] = None  # a cycle (none in a valid graph) or too deep: no answer
            seen[name] = _source(name, depth)
        return seen[name]

    def _source(name: str, depth: int) -> str | None:
        if name in inputs and name not in constants:
            return name
        if name in constants:
            return "positions"
        node = producers.get(name)
        if node is None or depth > 32:
            return None
        found = {source(i, depth + 1) for i in node.input if i}
        found.discard(None)
        if node.op_type in ("Shape", "Size"):
            return "positions"  # a shape is known once the input's shape is
        named = found - {"positions"}
        if len(named) == 1:
            return named.pop()
        return "positions" if found == {"positions"} else None

    tables: dict[str, Table] = {}
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in constants:
            continue
        table = constants[node.input[0]]
        if len(table.dims) != 2 or table.data_type != TensorProto.FLOAT:
            continue
        role = source(node.input[1])
        if role is not None and role not in tables:
            tables[role] = Table(int(table.dims[0]), int(table.dims[1]), node.output[0])
    return tables


def _config(path: Path, proto, tables: dict[str, Table]):
    """The config.json beside the file (if it is a MobileBERT's), else one built from the
    embedding tables' shapes."""
    from transformers import MobileBertConfig

    config_file = path.parent / "config.json"
    if config_file.is_file():
        try:
            config = MobileBertConfig.from_pretrained(str(path.parent), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelError(f"{config_file}: cannot be read ({err})") from None
        if config.model_type != "mobilebert" or config.vocab_size != tables["input_ids"].rows:
            raise ModelError(
                f"{config_file} is not the config of {path.name} (model_type "
                f"{config.model_type!r}, vocab_size {config.vocab_size})"
            )
    else:
        words = tables["input_ids"]
        extra: dict[str, int] = {}
        if "token_type_ids" in tables:
            extra["type_vocab_size"] = tables["token_type_ids"].rows
        if "positions" in tables:
            extra["max_position_embeddings"] = tables["positions"].rows
        config = MobileBertConfig(
            vocab_size=words.rows, embedding_size=words.width, **extra
        )
    config._name_or_path = str(path)
    return config


def _head(path, head, config, out_names, out_axes: list[list[Axis]], input_rank: int) -> str:
    if head is not None:
        return head if head in HEADS else head_of_class(head_class_name(head))
    archs = [a for a in (config.architectures or []) if a in HEADS.values()]
    if archs:
        return head_of_class(archs[0])
    names = set(out_names)
    if input_rank == 3:
        return "multiple-choice"
    for candidate in ("question-answering", "pretraining", "base"):
        if set(HEAD_OUTPUTS[candidate]) <= names:
            return candidate
    if len(out_names) == 1 and len(out_axes[0]) == 2:
        return "sequence-classification"  # pooled logits; next-sentence needs head=
    if len(out_names) == 1 and len(out_axes[0]) == 3:
        vocabulary = out_axes[0][-1].size == config.vocab_size
        return "masked-lm" if vocabulary else "token-classification"
    raise ModelError(
        f"{path}: cannot tell the head from the outputs {list(out_names)}; "
        f"give it with head=..., one of {list(HEADS)}"
    )


def _fields(path, head: str, out_names: tuple[str, ...]) -> tuple[str, ...]:
    """The Hugging Face name of each output: the graph's when they are the head's names, else
    the head's names in order."""
    expected = HEAD_OUTPUTS[head]
    if set(out_names) <= set(expected):
        return out_names
    known = {name for names in HEAD_OUTPUTS.values() for name in names}
    if len(out_names) <= len(expected) and not set(out_names) <= known:
        return expected[: len(out_names)]
    raise ModelError(
        f"{path}: {len(out_names)} outputs {list(out_names)}, but a {head} model returns "
        f"{list(expected)}"
    )
