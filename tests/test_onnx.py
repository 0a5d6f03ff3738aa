"""ONNX files in: ``compile("model.onnx")`` imports an export of a MobileBERT (torch.onnx's
TorchScript exporter at opsets 14 and 17, its dynamo exporter, with dynamic axes) with TVM's
Relax ONNX frontend, runs the same passes as on a torch.export capture, and matches ONNX Runtime
on the file within 1e-4 at every length, with padding, two segments and a non-zero [PAD] row.
Every model here is exported by the test from a seeded tiny MobileBERT (no network)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import TOL, make_model, tiny_config, trained_pad_row

import mbcompile
from mbcompile.capture import load_onnx
from mbcompile.errors import ModelError, OptionError
from mbcompile.heads import HEADS

pytest.importorskip("onnx", reason="ONNX files need onnx (pip install 'mbcompile[onnx]')")
pytest.importorskip("onnxruntime", reason="ONNX files need onnxruntime (the onnx extra)")

NAMES = ("input_ids", "attention_mask", "token_type_ids")
# The MobileBERT passes that rewrite the model; the clean-up passes (RemoveLinearReshapes,
# RemoveLayoutNoise) fire on what layout noise each importer leaves, and are judged by the
# layout ops left in the end.
REWRITING = ("FoldNoNorm", "FoldAttentionScale", "MergeSharedInputLinears", "FoldAttentionMaskRows",
             "FuseAttention")


def export(model, path, exporter: str = "opset14", *, dynamic: bool = True, names=None):
    """``model`` as an ONNX file: ``opset14``/``opset17`` (TorchScript exporter) or
    ``dynamo``; batch and sequence axes dynamic unless ``dynamic=False``."""
    mc = type(model).__name__.endswith("MultipleChoice")
    shape = (1, 4, 16) if mc else (1, 16)
    ids = torch.randint(1, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    with torch.no_grad():
        out = model(*args)
    outputs = names or [k for k, v in out.items() if isinstance(v, torch.Tensor)]
    seq_axis = len(shape) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {0: torch.export.Dim("batch", max=64), seq_axis: torch.export.Dim("seq", min=2, max=64)}
            torch.onnx.export(
                model, args, str(path), dynamo=True, opset_version=18, input_names=list(NAMES),
                output_names=outputs, dynamic_shapes=(dims,) * 3 if dynamic else None,
            )
        else:
            axes = {0: "batch", seq_axis: "sequence"}
            torch.onnx.export(
                model, args, str(path), dynamo=False, opset_version=int(exporter[-2:]),
                input_names=list(NAMES), output_names=outputs,
                dynamic_axes={n: axes for n in NAMES} if dynamic else None,
            )
    return path


def _fired(report) -> dict[str, int]:
    return {row["pass"]: row["fired"] for row in report["passes"]}


def _layout_ops(mod) -> int:
    text = mod["main"].script()
    return text.count("R.reshape(") + text.count("R.permute_dims(") + text.count("R.broadcast_to(")


@pytest.mark.parametrize(
    "head,exporter",
    [(h, "opset14") for h in HEADS]
    + [("masked-lm", "opset17"), ("masked-lm", "dynamo"), ("question-answering", "dynamo")],
)
def test_the_passes_fire_on_the_onnx_import_as_on_torch_export(head, exporter, tmp_path):
    from mbcompile.compiler import prepare
    from mbcompile.options import CompileOptions

    model = make_model(head, tiny_config(), seed=1)
    onnx_model = load_onnx(export(model, tmp_path / "m.onnx", exporter))
    assert onnx_model.head == head or head == "next-sentence"  # its logits read as a classifier's
    options = CompileOptions(seq_len=16)
    from_torch = prepare(model, options)
    from_onnx = prepare(load_onnx(tmp_path / "m.onnx", head=head), options)
    fired_torch, fired_onnx = _fired(from_torch.report), _fired(from_onnx.report)
    for name in REWRITING:
        assert fired_onnx[name] == fired_torch[name], (name, fired_onnx, fired_torch)
    assert fired_onnx["FuseAttention"] == model.config.num_hidden_layers
    final_torch, final_onnx = from_torch.report["passes"][-1], from_onnx.report["passes"][-1]
    assert final_onnx["matmul_calls"] == final_torch["matmul_calls"]
    assert final_onnx["matmul_flops"] == final_torch["matmul_flops"]
    assert _layout_ops(from_onnx.mod) <= _layout_ops(from_torch.mod)


def _unpadded_errors(compiled, onnx_model, ids, mask, types) -> float:
    """The max abs error of the compiled outputs on a batch of rows padded together, given
    their ``lengths`` (as the pipelines do), against ONNX Runtime on each row alone at its real
    length; and of the outputs without ``lengths`` against ONNX Runtime on the same padded
    batch (every given position real, as in Hugging Face)."""
    real = mask.reshape(ids.shape[0], -1, ids.shape[-1]).any(axis=1)
    lengths = np.array([int(np.nonzero(r)[0].max()) + 1 for r in real])
    lengths = np.broadcast_to(lengths.reshape((-1,) + (1,) * (ids.ndim - 2)), ids.shape[:-1])
    same = onnx_model.outputs_for({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    plain = compiled(input_ids=ids, attention_mask=mask, token_type_ids=types)
    worst = max(float(np.abs(plain[k] - v).max()) for k, v in same.items())
    got = compiled(input_ids=ids, attention_mask=mask, token_type_ids=types, lengths=lengths)
    for b in range(ids.shape[0]):
        n = int(lengths.reshape(ids.shape[0], -1)[b, 0])
        ref = onnx_model.outputs_for(
            {"input_ids": ids[b : b + 1, ..., :n], "attention_mask": mask[b : b + 1, ..., :n],
             "token_type_ids": types[b : b + 1, ..., :n]}
        )
        for name, value in ref.items():
            mine = got[name][b : b + 1]
            spec = next(s for s in compiled.signature.outputs if s.name == name)
            for axis in spec.seq_axes:
                mine = np.take(mine, np.arange(n), axis=axis)
            worst = max(worst, float(np.abs(mine - value).max()))
    return worst


@pytest.mark.parametrize("exporter", ["opset14", "dynamo"])
def test_compiled_onnx_matches_onnx_runtime_at_every_length(exporter, tmp_path):
    model = trained_pad_row(make_model("masked-lm", tiny_config(), seed=2))
    path = export(model, tmp_path / "m.onnx", exporter)
    compiled = mbcompile.compile(path, max_seq_len=64)
    assert compiled.signature.lengths == (8, 16, 32, 64)
    assert compiled.metadata.source["name_or_path"] == str(path)
    check = compiled.metadata.report["accuracy"]
    assert check["reference"] == "ONNX Runtime fp32"
    assert check["outputs"]["logits"]["max_abs_error"] <= TOL
    onnx_model = load_onnx(path)
    rng = np.random.default_rng(0)
    for n in (2, 5, 8, 9, 17, 33, 64):
        ids = rng.integers(1, 211, (3, n))
        mask = np.ones_like(ids)
        types = np.zeros_like(ids)
        types[:, n // 2 :] = 1
        for b, cut in ((1, n // 3), (2, n // 2)):  # rows padded (with the [PAD] id) at the end
            if cut:
                ids[b, n - cut :], mask[b, n - cut :] = 0, 0
        assert _unpadded_errors(compiled, onnx_model, ids, mask, types) <= TOL, n


def test_question_answering_and_multiple_choice_from_onnx(tmp_path):
    rng = np.random.default_rng(1)
    qa = trained_pad_row(make_model("question-answering", tiny_config(), seed=3))
    compiled = mbcompile.compile(export(qa, tmp_path / "qa.onnx", "opset17"), max_seq_len=32)
    assert compiled.signature.output_names == ("start_logits", "end_logits")
    ids = rng.integers(1, 211, (2, 21))
    mask = np.ones_like(ids)
    ids[1, 15:], mask[1, 15:] = 0, 0
    onnx_qa = load_onnx(tmp_path / "qa.onnx")
    assert _unpadded_errors(compiled, onnx_qa, ids, mask, np.zeros_like(ids)) <= TOL

    mc = make_model("multiple-choice", tiny_config(), seed=4)
    compiled = mbcompile.compile(export(mc, tmp_path / "mc.onnx"), max_seq_len=16)
    assert compiled.signature.num_choices == 4
    ids = rng.integers(1, 211, (1, 4, 11))
    ref = load_onnx(tmp_path / "mc.onnx").outputs_for(
        {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    )
    got = compiled(input_ids=ids, attention_mask=np.ones_like(ids))
    assert np.abs(got["logits"] - ref["logits"]).max() <= TOL


def test_fill_mask_build_from_onnx(tmp_path):
    model = make_model("masked-lm", tiny_config(), seed=5)
    path = export(model, tmp_path / "m.onnx")
    compiled = mbcompile.compile(path, max_seq_len=32, logits_for="masked", mask_token_id=4)
    ids = np.random.default_rng(2).integers(5, 211, (1, 12))
    ids[0, 3] = 4
    got = compiled(input_ids=ids, attention_mask=np.ones_like(ids))
    ref = load_onnx(path).outputs_for(
        {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    )
    assert got["masked_positions"][0, 0] == 3
    assert np.abs(got["logits"][0, 0] - ref["logits"][0, 3]).max() <= TOL


def test_an_optimum_style_folder_gives_head_config_and_tokenizer(tmp_path):
    """Optimum writes model.onnx beside config.json and the tokenizer: compile reads the head
    from config.json, keeps the config and saves the tokenizer, so a pipeline runs."""
    from test_hub import WORDS

    model = make_model("masked-lm", tiny_config(), seed=6)
    model.save_pretrained(tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()  # an Optimum export folder has the ONNX file, not the weights
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    export(model, tmp_path / "model.onnx", names=["an_unnamed_output"])
    compiled = mbcompile.compile(tmp_path / "model.onnx", max_seq_len=16)
    assert compiled.signature.head == "masked-lm"
    assert compiled.signature.output_names == ("logits",)
    assert compiled.metadata.config["architectures"] == ["MobileBertForMaskedLM"]
    assert "tokenizer.json" in compiled.tokenizer_files
    fill = mbcompile.pipeline("fill-mask", compiled)
    answers = fill("w1 w2 [MASK] w3")
    assert len(answers) == 5 and all(a["token_str"] for a in answers)
    # pipeline(task, "model.onnx") compiles the file for the task (fill-mask: the masked build)
    direct = mbcompile.pipeline("fill-mask", tmp_path / "model.onnx", max_seq_len=16)
    assert direct.model.signature.max_masked is not None
    again = direct("w1 w2 [MASK] w3")
    assert [a["token"] for a in again] == [a["token"] for a in answers]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(again, answers)) <= TOL
    with pytest.raises(mbcompile.PipelineError, match="question-answering"):
        mbcompile.pipeline("question-answering", tmp_path / "model.onnx", max_seq_len=16)


def test_a_file_exported_at_one_length_compiles_at_that_length(tmp_path):
    model = make_model("sequence-classification", tiny_config(), seed=7)
    path = export(model, tmp_path / "static.onnx", dynamic=False)
    compiled = mbcompile.compile(path)
    assert compiled.signature.lengths == (16,)
    ids = np.random.default_rng(3).integers(1, 211, (1, 16))
    ref = load_onnx(path).outputs_for(
        {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    )
    assert np.abs(compiled(input_ids=ids)["logits"] - ref["logits"]).max() <= TOL
    with pytest.raises(OptionError, match="exported for 16 tokens only.*seq_len=16"):
        mbcompile.compile(path, max_seq_len=32)


def test_bad_onnx_files_are_refused_naming_what_is_wrong(tmp_path):
    model = make_model("masked-lm", tiny_config(), seed=8)
    good = export(model, tmp_path / "good.onnx")
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError, match="damaged.onnx: not a valid ONNX model"):
        mbcompile.compile(damaged)
    text = tmp_path / "text.onnx"
    text.write_text("not a model")
    with pytest.raises(ModelError, match="text.onnx: not a valid ONNX model"):
        mbcompile.compile(text)
    with pytest.raises(ModelError, match="no such ONNX file"):
        mbcompile.compile(tmp_path / "missing.onnx")

    import onnx

    proto = onnx.load(str(good))
    no_mask = tmp_path / "no_mask.onnx"
    graph = proto.graph
    mask = next(i for i in graph.input if i.name == "attention_mask")
    mask.name = "attention_mask_renamed"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == "attention_mask":
                node.input[i] = "attention_mask_renamed"
    onnx.save(proto, str(no_mask))
    with pytest.raises(ModelError, match=r"takes \['attention_mask_renamed'\]"):
        mbcompile.compile(no_mask)
    with pytest.raises(ModelError, match="Unknown head"):
        mbcompile.compile(good, head="translation")
    half = export(make_model("masked-lm", tiny_config(), seed=8).half(), tmp_path / "half.onnx")
    with pytest.raises(ModelError, match="half.onnx: its weights are float16; mbcompile imports "
                                         "float32 ONNX exports"):
        mbcompile.compile(half)


def test_the_cli_compiles_an_onnx_file_and_refuses_a_damaged_one_in_one_line(tmp_path):
    model = make_model("masked-lm", tiny_config(), seed=9)
    path = export(model, tmp_path / "m.onnx")
    out = tmp_path / "m.mbc"
    proc = subprocess.run(
        [sys.executable, "-m", "mbcompile.cli", "compile", str(path), "--seq-len", "16",
         "-o", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = subprocess.run(
        [sys.executable, "-m", "mbcompile.cli", "info", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert info.returncode == 0, info.stderr[-2000:]
    assert "against ONNX Runtime fp32" in info.stdout
    damaged = tmp_path / "bad.onnx"
    shutil.copy(path, damaged)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    proc = subprocess.run(
        [sys.executable, "-m", "mbcompile.cli", "compile", str(damaged), "-o", str(tmp_path / "x.mbc")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "bad.onnx: not a valid ONNX model" in proc.stderr


def test_a_graph_taking_int32_ids_runs_on_the_runtime_int64_inputs(tmp_path):
    """tf2onnx-style graphs take int32 ids: the import casts the runtime's int64 to them."""
    import onnx
    from onnx import TensorProto, helper

    model = make_model("token-classification", tiny_config(), seed=10)
    proto = onnx.load(str(export(model, tmp_path / "m.onnx")))
    graph = proto.graph
    for inp in graph.input:
        for node in graph.node:
            for i, used in enumerate(node.input):
                if used == inp.name:
                    node.input[i] = inp.name + "_64"
        graph.node.insert(0, helper.make_node("Cast", [inp.name], [inp.name + "_64"], to=TensorProto.INT64))
        inp.type.tensor_type.elem_type = TensorProto.INT32
    onnx.save(proto, str(tmp_path / "int32.onnx"))
    compiled = mbcompile.compile(tmp_path / "int32.onnx", max_seq_len=16)
    ids = np.random.default_rng(4).integers(1, 211, (1, 13))
    ref = load_onnx(tmp_path / "int32.onnx").outputs_for(
        {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    )
    assert np.abs(compiled(input_ids=ids)["logits"] - ref["logits"]).max() <= TOL
