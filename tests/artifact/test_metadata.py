"""Crafted metadata.json: every wrong value ends in an ArtifactError naming the file, the key and
what was expected; valid metadata (old and new) reads back equal."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from crafting import DELETE, TOKENIZER, metadata_dict, metadata_json, set_key, write_artifact

from mbcompile import artifact
from mbcompile.artifact import Metadata
from mbcompile.artifact import metadata as metadata_module
from mbcompile.errors import ArtifactError
from mbcompile.signature import OutputSpec, Signature

# (key path, bad value, what the message says besides the key path)
SIGNATURE_CASES = [
    ("signature", "qa", "an object"),
    ("signature", DELETE, "signature is missing"),
    ("signature.model_class", 3, "a non-empty string"),
    ("signature.model_class", "", "a non-empty string"),
    ("signature.head", None, "a non-empty string"),
    ("signature.batch_size", "1", "an integer in [1, 2147483647]"),
    ("signature.batch_size", 0, "an integer in [1,"),
    ("signature.batch_size", -1, "an integer in [1,"),
    ("signature.batch_size", True, "an integer in [1,"),
    ("signature.batch_size", 1.0, "an integer in [1,"),
    ("signature.batch_size", 10**30, "an integer in [1,"),
    ("signature.batch_size", 2**28, "expected at most 2147483647"),  # × seq_len 16
    ("signature.seq_len", DELETE, "signature.seq_len is missing"),
    ("signature.seq_len", math.nan, "an integer in [1,"),
    ("signature.num_choices", 2, "null for others"),
    ("signature.num_choices", "2", "an integer in [1,"),
    ("signature.vocab_size", 0, "an integer in [1,"),
    ("signature.type_vocab_size", [2], "an integer in [1,"),
    ("signature.takes_lengths", "yes", "true or false"),
    ("signature.takes_lengths", 1, "true or false"),
    ("signature.pad_id", 0, "unknown keys ['pad_id']"),
    ("signature.fields", "start_logits", "a list"),
    ("signature.fields", [1, 2], "a non-empty string"),
    ("signature.fields", ["start_logits", "start_logits", "end_logits"], "distinct names"),
    ("signature.fields", ["logits"], "one of signature.fields ['logits']"),
    ("signature.max_masked", 3, "set exactly when max_masked is set"),
    ("signature.mask_token_id", 4, "set exactly when max_masked is set"),
    ("signature.outputs", {}, "a list"),
    ("signature.outputs", [], "at least one output"),
    ("signature.outputs.0", "start_logits", "an object"),
    ("signature.outputs.0.stride", [1], "unknown keys ['stride']"),
    ("signature.outputs.0.name", DELETE, "signature.outputs[0].name is missing"),
    ("signature.outputs.0.name", "bogus", "one of signature.fields"),
    ("signature.outputs.0.shape", [1, -16], "an integer in [1,"),
    ("signature.outputs.0.shape", [1, 16.0], "an integer in [1,"),
    ("signature.outputs.0.shape", [1, "16"], "an integer in [1,"),
    ("signature.outputs.0.shape", [1, 2**40], "an integer in [1,"),
    ("signature.outputs.0.shape", [], "1 to 32 dimensions"),
    ("signature.outputs.0.shape", [1] * 33, "1 to 32 dimensions"),
    ("signature.outputs.0.shape", "1x16", "a list"),
    ("signature.outputs.0.dtype", "float128", "one of ['bool',"),
    ("signature.outputs.0.dtype", 32, "one of ['bool',"),
    ("signature.outputs.0.seq_axes", [2], "an axis of the shape [1, 16]"),
    ("signature.outputs.0.seq_axes", [-1], "an integer in [0,"),
    ("signature.outputs.0.seq_axes", [1, 1], "distinct axes"),
    ("signature.outputs.0.seq_axes", 1, "a list"),
    ("signature.outputs.0.index", -1, "an integer in [0,"),
    ("signature.outputs.0.index", "0", "an integer in [0,"),
    ("signature.outputs.0.index", 1, "indices 0, 1, 2, ... in order"),
    ("signature.outputs.0.masked_axis", 0, "signature.max_masked is null"),
    ("signature.outputs.0.masked_axis", 5, "an axis of the shape"),
]

METADATA_CASES = [
    ("config", [], "an object"),
    ("config", DELETE, "config is missing"),
    ("target", "host", "an object"),
    ("target", DELETE, "target is missing"),
    ("target.name", 1, "a non-empty string"),
    ("target.description", DELETE, "target.description is missing"),
    ("target.features", "avx2", "a list"),
    ("target.features", [None], "a non-empty string"),
    ("target.llvm", "x86", "an object"),
    ("target.num_cores", 0, "an integer in [1,"),
    ("tvm_target", 1, "a string"),
    ("tuning_db", 3, "a string"),
    ("tuned_kernels", -1, "an integer in [0,"),
    ("tuned_kernels", 1.5, "an integer in [0,"),
    ("tuned_kernels", True, "an integer in [0,"),
    ("versions", {"tvm": 0.27}, "a string"),
    ("versions", ["tvm"], "an object"),
    ("report", [], "an object"),
    ("compile_seconds", {"build": "2"}, "a finite number of seconds"),
    ("compile_seconds", {"build": -1}, "a finite number of seconds"),
    ("compile_seconds", {"build": math.nan}, "a finite number of seconds"),
    ("compile_seconds", {"build": math.inf}, "a finite number of seconds"),
    ("options", "seq_len=16", "an object"),
    ("model_class", "MobileBertForMaskedLM", "as in signature.model_class"),
    ("head", "fill-mask", "as in signature.head"),
]


def _key_in_message(path: str) -> str:
    """signature.outputs.0.shape → signature.outputs[0].shape, as messages spell it."""
    parts = []
    for part in path.split("."):
        parts.append(f"[{part}]" if part.isdigit() else f".{part}")
    return "".join(parts).lstrip(".")


@pytest.mark.parametrize("key, value, expected", SIGNATURE_CASES + METADATA_CASES)
def test_crafted_metadata_value_is_refused_naming_file_key_and_expectation(
    tmp_path, key, value, expected
):
    meta = set_key(metadata_dict(), key, value)
    path = write_artifact(tmp_path / "crafted.mbc", meta)
    with pytest.raises(ArtifactError) as caught:
        artifact.read(path)
    message = str(caught.value)
    assert f"{path}: metadata.json: " in message
    assert expected in message, message
    name = _key_in_message(key)
    assert name.split(".")[-1].split("[")[0] in message, message


@pytest.mark.parametrize(
    "edit, expected",
    [
        ({"max_masked": 17, "mask_token_id": 4}, "max_masked is 17"),  # > seq_len
        ({"max_masked": 2, "mask_token_id": 211}, "mask_token_id is 211"),  # >= vocab_size
        ({"head": "multiple-choice", "num_choices": None}, "null for others"),
    ],
)
def test_inconsistent_signature_is_refused(tmp_path, edit, expected):
    meta = metadata_dict()
    meta["signature"].update(edit)
    meta["head"] = meta["signature"]["head"]
    with pytest.raises(ArtifactError, match=expected):
        artifact.read(write_artifact(tmp_path / "x.mbc", meta))


def _masked_lm(**logits) -> dict:
    meta = metadata_dict()
    sig = meta["signature"]
    sig.update(
        model_class="MobileBertForMaskedLM",
        head="masked-lm",
        max_masked=3,
        mask_token_id=4,
        fields=["logits", "masked_positions"],
        outputs=[
            {
                "name": "logits",
                "shape": [1, 3, 211],
                "dtype": "float32",
                "seq_axes": [],
                "index": None,
                "masked_axis": 1,
                **logits,
            },
            {
                "name": "masked_positions",
                "shape": [1, 3],
                "dtype": "int64",
                "seq_axes": [],
                "index": None,
                "masked_axis": None,
            },
        ],
    )
    meta.update(model_class=sig["model_class"], head=sig["head"])
    return meta


def test_masked_logits_signature_reads(tmp_path):
    sig = artifact.read(write_artifact(tmp_path / "x.mbc", _masked_lm())).metadata.signature
    assert sig.max_masked == 3 and sig.outputs[0].masked_axis == 1


@pytest.mark.parametrize(
    "logits, expected",
    [
        ({"masked_axis": 2}, "masked_axis is 2"),
        ({"shape": [1, 4, 211]}, "shape[1] == max_masked (3)"),
        ({"dtype": "int64"}, "a float dtype"),
        ({"seq_axes": [1]}, "none the masked_axis"),
    ],
)
def test_masked_logits_the_runtime_cannot_cut_are_refused(tmp_path, logits, expected):
    with pytest.raises(ArtifactError) as caught:
        artifact.read(write_artifact(tmp_path / "x.mbc", _masked_lm(**logits)))
    assert "signature.outputs[0]" in str(caught.value) and expected in str(caught.value)


def test_tuple_field_outputs_read_in_index_order(tmp_path):
    meta = metadata_dict()
    hidden = {"name": "hidden_states", "shape": [1, 16, 64], "dtype": "float32", "seq_axes": [1]}
    meta["signature"]["fields"] += ["hidden_states", "attentions"]  # attentions: no tensors
    meta["signature"]["outputs"] += [{**hidden, "index": i} for i in range(3)]
    sig = artifact.read(write_artifact(tmp_path / "x.mbc", meta)).metadata.signature
    assert [o.index for o in sig.outputs] == [None, None, 0, 1, 2]
    meta["signature"]["outputs"][3]["index"] = 2  # 0, 2, 2
    with pytest.raises(ArtifactError, match="'hidden_states'.*in order"):
        artifact.read(write_artifact(tmp_path / "y.mbc", meta))


def test_nesting_deeper_than_the_bound_is_refused(tmp_path):
    deep: dict = {}
    node = deep
    for _ in range(metadata_module.MAX_DEPTH):
        node["next"] = {}
        node = node["next"]
    path = write_artifact(tmp_path / "x.mbc", {**metadata_dict(), "report": deep})
    with pytest.raises(ArtifactError, match=f"{path}: metadata.json: .*deeper than 64"):
        artifact.read(path)


def test_huge_and_non_finite_json_numbers(tmp_path):
    """NaN, Infinity and 10**30 are refused wherever a number is typed; in descriptive data
    (report, config) they are kept as written."""
    text = metadata_json(metadata_dict(), {"lib.so": b"x"}).decode()
    cases = {
        '"build": 2.28': ('"build": NaN', "compile_seconds['build'] is nan"),
        '"tuned_kernels": 0': ('"tuned_kernels": 1e999', "tuned_kernels is inf"),
        '"seq_len": 16': ('"seq_len": 1' + "0" * 30, "seq_len is 1000000000"),
    }
    for i, (old, (new, expected)) in enumerate(cases.items()):
        assert old in text
        path = write_artifact(tmp_path / f"{i}.mbc", lib=b"x", text=text.replace(old, new).encode())
        with pytest.raises(ArtifactError, match=expected.replace("[", r"\[")):
            artifact.read(path)
    described = text.replace('"kernel_calls": 82', '"kernel_calls": NaN')
    path = write_artifact(tmp_path / "report.mbc", lib=b"x", text=described.encode())
    assert math.isnan(artifact.read(path).metadata.report["final"]["kernel_calls"])


def test_unknown_top_level_keys_are_ignored(tmp_path):
    meta = {**metadata_dict(), "built_by": "ci-42", "signed": {"by": "someone"}}
    art = artifact.read(write_artifact(tmp_path / "x.mbc", meta))
    assert art.metadata == artifact.read(write_artifact(tmp_path / "y.mbc")).metadata


def test_from_dict_refuses_what_is_not_an_object():
    for data in (None, [], "metadata", 3):
        with pytest.raises(ArtifactError, match="model.mbc: the metadata is"):
            Metadata.from_dict(data, "model.mbc")


def test_every_field_of_the_types_has_a_check():
    """Adding a field to Signature, OutputSpec or Metadata needs a check in metadata.py (else
    artifacts carrying it are refused as having an unknown key)."""
    checks = metadata_module
    assert set(checks._SIGNATURE_CHECKS) == {f.name for f in dataclasses.fields(Signature)}
    assert set(checks._OUTPUT_CHECKS) == {f.name for f in dataclasses.fields(OutputSpec)}
    assert set(checks._METADATA_CHECKS) == {f.name for f in dataclasses.fields(Metadata)}


# -- valid metadata reads back equal ----------------------------------------------------------


def test_compiled_metadata_round_trips(tiny_qa, tiny_qa_artifact):
    metadata = tiny_qa[1].metadata
    assert Metadata.from_dict(metadata.to_dict()) == metadata
    again = artifact.read(tiny_qa_artifact).metadata
    assert again.signature == metadata.signature
    assert Metadata.from_dict(again.to_dict()) == again
    assert again == Metadata.from_dict(json.loads(json.dumps(metadata.to_dict())))


def test_version_1_metadata_as_the_old_code_wrote_it_still_reads(tiny_qa_artifact, tmp_path):
    """Before the typed Metadata: no ``options`` nor ``source`` key, and signatures without
    ``seq_lens``, ``takes_lengths`` (nor, earlier still, ``max_masked``/``mask_token_id``).
    Read, not run: the library is new."""
    current = artifact.read(tiny_qa_artifact)
    old = current.metadata.to_dict()
    del old["options"]
    del old["source"]
    for key in ("takes_lengths", "max_masked", "mask_token_id", "seq_lens"):
        old["signature"].pop(key, None)
    old_keys = {
        "model_class",
        "head",
        "config",
        "target",
        "tvm_target",
        "tuning_db",
        "tuned_kernels",
        "versions",
        "report",
        "compile_seconds",
        "signature",
    }
    assert set(old) == old_keys
    path = write_artifact(
        tmp_path / "v1.mbc", json.loads(json.dumps(old)), lib=current.lib, tokenizer=TOKENIZER
    )
    art = artifact.read(path)
    assert art.metadata.options == {} and art.metadata.source == {}
    assert art.metadata.signature.lengths == (art.metadata.signature.seq_len,)
    assert art.metadata.signature.takes_lengths is False
    assert art.metadata.signature.max_masked is None
    assert art.metadata.signature.outputs == current.metadata.signature.outputs
    assert art.metadata.config == current.metadata.config
    assert art.lib == current.lib and art.tokenizer == TOKENIZER
