"""Reduced precision (``precision="bf16"`` and ``"int8"``) and the accuracy report against
PyTorch fp32.

bf16 runs where the host has AVX512_BF16, int8 where it has AVX512_VNNI; elsewhere those tests
skip, saying so. The bounds (``BOUNDS``: largest error over the output's largest value, smallest
cosine similarity of its vectors) hold on these models: bf16 rounds weights and activations to
8 significant bits, int8 to 127 steps of each row's (activations) or column's (weights)
largest value, each sum exact (int32) or fp32. The default architecture's numbers, against
OpenVINO's bf16 and ONNX Runtime's int8 on the same weights, are in the README.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TOL, make_model, random_inputs, tiny_config, trained_pad_row

import mbcompile
from mbcompile.cli import main
from mbcompile.cpu import cpu_info
from mbcompile.errors import InputError, InputTypeError, OptionError, TargetError
from mbcompile.targets.registry import host_features, host_target

BOUNDS = {"bf16": (3e-2, 0.999), "int8": (8e-2, 0.998)}  # (max_rel_error, min_cosine)

_HOST = cpu_info(host_target().tvm_target())
_MISSING = {"bf16": None if _HOST.bf16_dot else "AVX512_BF16 (bf16 dot products)",
            "int8": None if _HOST.int8_dot else "int8 dot product (AVX2, AVX512_VNNI, dotprod)"}


def runnable(precision: str, target: str = "host"):
    """``(precision, target)`` as a test parameter, skipped (saying why) where this CPU cannot
    run it. ``x86-64-zen3`` is the AVX2 build (int8 on ``vpmaddubsw``), which any AVX2 CPU runs."""
    missing = _MISSING[precision]
    if target == "x86-64-zen3" and "avx2" not in host_features():
        missing = "AVX2"
    if target == "x86-64-zen4" and "avx512_vnni" not in host_features():
        missing = "AVX512_VNNI"
    reason = f"this CPU has no {missing} to run {precision} builds for {target} on"
    return pytest.param(
        precision, target, id=f"{precision}-{target}",
        marks=pytest.mark.skipif(missing is not None, reason=reason),
    )


BUILDS = [runnable("bf16"), runnable("int8"), runnable("int8", "x86-64-zen3")]

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(206)]


def stress(model, seed: int = 2):
    """Trained-like outliers: NoNorm γ and β spread over three orders of magnitude, and a
    non-zero [PAD] embedding row."""
    from transformers.models.mobilebert.modeling_mobilebert import NoNorm

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NoNorm):
                spread = 10 ** (torch.rand(module.weight.shape, generator=gen) * 3 - 1.5)
                module.weight.mul_(spread)
                shift = torch.randn(module.bias.shape, generator=gen)
                module.bias.add_(shift * 10 ** (torch.rand(module.bias.shape, generator=gen) * 2 - 1))
    return trained_pad_row(model)


def _inputs(config, shape, pad=0, masks=0):
    ids, mask, types = random_inputs(config, shape, pad=pad)
    ids[..., 1 : 1 + masks] = 4  # [MASK] of WORDS
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()}


@pytest.fixture(scope="module")
def stressed_encoder():
    return stress(make_model("base", tiny_config()))


@pytest.fixture(scope="module")
def encoder():
    return trained_pad_row(make_model("base", tiny_config()))


@pytest.mark.parametrize("precision, target", BUILDS)
@pytest.mark.parametrize("stressed", [False, True])
def test_encoder_is_within_its_bound_at_every_length(
    precision, target, stressed, encoder, stressed_encoder
):
    model = stressed_encoder if stressed else encoder
    compiled = mbcompile.compile(model, max_seq_len=16, precision=precision, target=target)
    assert compiled.metadata.precision == precision
    batches = [_inputs(model.config, (2, n), pad=n // 3) for n in (5, 16)]  # both lengths
    report = compiled.accuracy(batches)
    assert report["precision"] == precision and report["rows"] == 4
    max_rel, min_cosine = BOUNDS[precision]
    # The stress model's pooler input is ~1e5: tanh saturates, and a rounding flips the sign of
    # the few values near zero. Its hidden states are the comparison that means something.
    outputs = ["last_hidden_state"] if stressed else ["last_hidden_state", "pooler_output"]
    for name in outputs:
        m = report["outputs"][name]
        assert m["max_rel_error"] <= max_rel, (name, m)
        assert m["min_cosine"] >= min_cosine, (name, m)
    # the reduced-precision kernels ran: fp32 is exact to ~1e-6 where they are not
    assert report["outputs"]["last_hidden_state"]["max_rel_error"] > 1e-4
    recorded = compiled.metadata.report["accuracy"]
    assert recorded["precision"] == precision
    assert recorded["outputs"]["last_hidden_state"]["max_rel_error"] <= max_rel


@pytest.mark.parametrize("precision, target", BUILDS)
@pytest.mark.parametrize("stressed", [False, True])
def test_no_worse_than_the_peers_on_the_same_weights(
    precision, target, stressed, encoder, stressed_encoder, tmp_path
):
    """bf16 against OpenVINO's bf16, int8 against ONNX Runtime's quantize_dynamic (int8 weights
    per channel), on every metric of the encoder's hidden states."""
    from bench import peers

    model = stressed_encoder if stressed else encoder
    inputs = _inputs(model.config, (2, 32), pad=7)
    example = tuple(inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
    if precision == "int8":
        peer = peers.onnxruntime(model, example, 2, int8=True, workdir=str(tmp_path))
    else:
        peer = peers.openvino(model, example, 2, precision="bf16", workdir=str(tmp_path))
        assert peer.precision == "bf16"
    compiled = mbcompile.compile(model, seq_len=32, precision=precision, target=target)
    ours = compiled.accuracy(inputs)["outputs"]["last_hidden_state"]
    from mbcompile.runtime.accuracy import Totals, reference_outputs

    theirs = Totals()
    reference = reference_outputs(model, inputs)["last_hidden_state"]
    theirs.add(peer(*example)[0], reference, None, top1=False)
    theirs = theirs.report(top1=False)
    assert ours["max_abs_error"] <= theirs["max_abs_error"], (ours, theirs)
    assert ours["min_cosine"] >= theirs["min_cosine"], (ours, theirs)


@pytest.mark.parametrize("precision, target", BUILDS)
@pytest.mark.parametrize("head", ["masked-lm", "sequence-classification"])
def test_predictions_agree_with_fp32(precision, target, head):
    # weights at their default scale: at initializer_range=0.2 the two layers amplify any
    # rounding (bf16 logits 3-20% off; fp32 stays within 1e-5)
    model = trained_pad_row(make_model(head, tiny_config(num_labels=3)))
    options = {"logits_for": "masked", "max_masked": 2, "mask_token_id": 4} if head == "masked-lm" else {}
    compiled = mbcompile.compile(model, seq_len=16, precision=precision, target=target, **options)
    report = compiled.accuracy([_inputs(model.config, (4, 16), pad=3, masks=2)])
    logits = report["outputs"]["logits"]
    assert logits["top1_positions"] == (8 if head == "masked-lm" else 4)
    assert logits["top1_agreement"] >= 0.75, logits
    assert logits["max_rel_error"] <= BOUNDS[precision][0], logits


def test_fp32_accuracy_report_on_a_stress_checkpoint(stressed_encoder, tmp_path):
    compiled = mbcompile.compile(stressed_encoder, seq_len=16)
    report = compiled.accuracy(_inputs(stressed_encoder.config, (3, 16), pad=5))
    # hidden states of ~1e5: fp32's own rounding is ~1e-2 there, so the bound is relative
    hidden = report["outputs"]["last_hidden_state"]
    assert hidden["max_rel_error"] <= 1e-5 and hidden["min_cosine"] >= 1 - 1e-9, hidden
    recorded = compiled.metadata.report["accuracy"]["outputs"]["last_hidden_state"]
    assert recorded["max_rel_error"] <= 1e-5

    # a loaded artifact: the reference is given, as a model or a checkpoint folder
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    stressed_encoder.save_pretrained(tmp_path / "ckpt")
    path = mbcompile.compile(stressed_encoder, seq_len=16, tokenizer=tmp_path).save(tmp_path / "m.mbc")
    loaded = mbcompile.load(path)
    with pytest.raises(InputError, match="reference=MODEL"):
        loaded.accuracy(_inputs(stressed_encoder.config, (1, 16)))
    texts = loaded.accuracy(["w1 w2 w3", "w4"], reference=str(tmp_path / "ckpt"))
    assert texts["rows"] == 2 and texts["precision"] == "fp32"
    assert texts["outputs"]["last_hidden_state"]["max_rel_error"] <= 1e-5


def test_info_shows_precision_and_the_recorded_accuracy(encoder, tmp_path, capsys):
    path = mbcompile.compile(encoder, seq_len=8).save(tmp_path / "m.mbc")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "precision:  fp32" in out
    line = next(x for x in out.splitlines() if x.startswith("accuracy:   last_hidden_state"))
    error = float(line.split("max abs error ")[1].split(",")[0])
    assert error <= TOL and "against PyTorch fp32" in out


@pytest.mark.parametrize("target", ["x86-64-zen3", "aarch64"])
def test_bf16_is_refused_where_the_cpu_has_no_bf16_dot_product(target):
    model = make_model("base", tiny_config())
    with pytest.raises(TargetError, match="avx512bf16.*precision='fp32'"):
        mbcompile.compile(model, seq_len=8, target=target, precision="bf16")


def test_unknown_precision_is_refused():
    with pytest.raises(OptionError, match="precision must be one of fp32, bf16, int8"):
        mbcompile.compile(make_model("base", tiny_config()), seq_len=8, precision="fp16")


def test_accuracy_refuses_inputs_it_cannot_read(encoder):
    compiled = mbcompile.compile(encoder, seq_len=8)
    with pytest.raises(InputError, match="no tokenizer|has none"):
        compiled.accuracy(["some text"])
    with pytest.raises(InputTypeError, match="dict holding at least input_ids"):
        compiled.accuracy([{"attention_mask": np.ones((1, 8))}])
    with pytest.raises(InputError, match="unknown inputs"):
        compiled.accuracy({"input_ids": np.ones((1, 8), np.int64), "labels": np.ones(1)})


# The tunable int8 kernels are the dot-product ones; on a CPU with AMX tiles (whose kernels have
# nothing to tune) they are those of the Zen 4 build, which such a CPU runs.
DOT_TARGET = "x86-64-zen4" if _HOST.tile_kinds else "host"


@pytest.mark.parametrize("precision, target", [runnable("int8", DOT_TARGET)])
def test_tuning_covers_the_reduced_precision_kernels(precision, target, encoder, tmp_path):
    summary = mbcompile.tune(
        encoder, work_dir=tmp_path, seq_len=8, precision=precision, trials=2, max_tasks=1,
        target=target, log=lambda _line: None,
    )
    # the dot-product tiles' knobs (rows, K unroll) give several records; a kernel on panel
    # steps (K a multiple of 128, 512-bit VNNI) has one schedule, measured once
    assert summary["tuned"] == 1 and summary["records"] >= 1
    compiled = mbcompile.compile(encoder, seq_len=8, precision=precision, tuning_db=tmp_path,
                                 target=target)
    assert compiled.metadata.tuned_kernels == 1
    report = compiled.accuracy(_inputs(encoder.config, (2, 8), pad=3))
    assert report["outputs"]["last_hidden_state"]["max_rel_error"] <= BOUNDS[precision][0]


@pytest.mark.parametrize("precision, target", [runnable("int8")])
def test_pipeline_compiles_a_checkpoint_in_reduced_precision(precision, target, tmp_path):
    model = trained_pad_row(make_model("masked-lm", tiny_config(vocab_size=len(WORDS))))
    model.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    quantized = mbcompile.pipeline("fill-mask", tmp_path, precision=precision, max_seq_len=16)
    assert quantized.model.metadata.precision == precision
    exact = mbcompile.pipeline("fill-mask", tmp_path, max_seq_len=16)
    got, want = quantized("w1 w2 [MASK] w3", top_k=3), exact("w1 w2 [MASK] w3", top_k=3)
    assert got[0]["token_str"] == want[0]["token_str"]
    assert got[0]["score"] == pytest.approx(want[0]["score"], rel=0.1)
    with pytest.raises(mbcompile.errors.PipelineError, match="compile options apply to a checkpoint"):
        mbcompile.pipeline("fill-mask", exact.model, precision=precision)
