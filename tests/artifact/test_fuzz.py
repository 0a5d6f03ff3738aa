"""Property tests: valid metadata round-trips; mutated zips and metadata only ever read or end
in ArtifactError (200 examples each, a few seconds in all)."""

from __future__ import annotations

import contextlib
import json
import math

import crafting
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbcompile import artifact
from mbcompile.artifact import Metadata
from mbcompile.artifact.metadata import DTYPES
from mbcompile.errors import ArtifactError
from mbcompile.signature import OutputSpec, Signature

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FIELD_NAMES = ["logits", "start_logits", "end_logits", "hidden_states", "attentions", "pooler"]
HEADS = ["question-answering", "multiple-choice", "masked-lm", "sequence-classification", "base"]

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def output_specs(draw, name: str, index: int | None, max_masked: int | None) -> OutputSpec:
    shape = draw(st.lists(st.integers(1, 64), min_size=1, max_size=4))
    dtype = draw(st.sampled_from(DTYPES))
    masked_axis = None
    can_mask = max_masked is not None and len(shape) >= 2 and dtype.startswith("float")
    if can_mask and draw(st.booleans()):
        masked_axis, shape[1] = 1, max_masked
    axes = [a for a in range(len(shape)) if a != masked_axis]
    seq_axes = draw(st.lists(st.sampled_from(axes), unique=True)) if axes else []
    return OutputSpec(name, tuple(shape), dtype, tuple(seq_axes), index, masked_axis)


@st.composite
def signatures(draw) -> Signature:
    head = draw(st.sampled_from(HEADS))
    seq_len = draw(st.integers(1, 512))
    vocab_size = draw(st.integers(1, 50_000))
    masked = draw(st.booleans())
    max_masked = draw(st.integers(1, seq_len)) if masked else None
    fields = draw(st.lists(st.sampled_from(FIELD_NAMES), min_size=1, max_size=4, unique=True))
    outputs = []
    for name in fields:
        count = draw(st.sampled_from([None, None, 0, 1, 3]))  # None: one tensor, not a tuple
        for index in [None] if count is None else range(count):
            outputs.append(draw(output_specs(name, index, max_masked)))
    if not outputs:
        outputs.append(draw(output_specs(fields[0], None, max_masked)))
    return Signature(
        model_class=draw(st.text(min_size=1, max_size=30)),
        head=head,
        batch_size=draw(st.integers(1, 64)),
        seq_len=seq_len,
        num_choices=draw(st.integers(1, 8)) if head == "multiple-choice" else None,
        vocab_size=vocab_size,
        type_vocab_size=draw(st.integers(1, 4)),
        outputs=tuple(outputs),
        fields=tuple(fields),
        max_masked=max_masked,
        mask_token_id=draw(st.integers(0, vocab_size - 1)) if masked else None,
        takes_lengths=draw(st.booleans()),
    )


@st.composite
def metadatas(draw) -> Metadata:
    text = st.text(max_size=12)
    return Metadata(
        signature=draw(signatures()),
        config=draw(st.dictionaries(text, json_values, max_size=4)),
        target={**crafting.TARGET, "num_cores": draw(st.none() | st.integers(1, 256))},
        tvm_target=draw(text),
        tuning_db=draw(st.none() | text),
        tuned_kernels=draw(st.integers(0, 10_000)),
        versions=draw(st.dictionaries(text, text, max_size=3)),
        report=draw(st.dictionaries(text, json_values, max_size=3)),
        compile_seconds=draw(
            st.dictionaries(text, st.floats(0, 1e6) | st.integers(0, 10**6), max_size=4)
        ),
        options=draw(st.dictionaries(text, json_values, max_size=3)),
    )


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(metadata=metadatas())
def test_valid_metadata_round_trips_through_dict_json_and_file(fuzz_dir, metadata):
    assert Metadata.from_dict(metadata.to_dict()) == metadata
    assert Metadata.from_dict(json.loads(json.dumps(metadata.to_dict()))) == metadata
    path = artifact.write(fuzz_dir / "valid.mbc", metadata, b"lib")
    assert artifact.read(path).metadata == metadata


def _read_or_refuse(path):
    """What a reader may see: an Artifact, or ArtifactError. Anything else fails the test."""
    try:
        art = artifact.read(path)
    except ArtifactError:
        return None
    # If it reads, re-reading its own metadata must also pass every check.
    assert Metadata.from_dict(art.metadata.to_dict()) is not None
    return art


BASE = crafting.build_zip(crafting.artifact_parts(lib=b"L" * 512, tokenizer=crafting.TOKENIZER))
# Where headers lie: the first local header, and the central directory with its end record.
positions = (
    st.integers(0, len(BASE) - 1) | st.integers(0, 80) | st.integers(len(BASE) - 400, len(BASE) - 1)
)


@FUZZ
@given(
    flips=st.lists(st.tuples(positions, st.integers(1, 255)), max_size=6),
    words=st.lists(
        st.tuples(positions, st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF])),
        max_size=2,
    ),
    keep=st.none() | st.integers(0, len(BASE)),
)
def test_mutated_zip_reads_or_is_refused(fuzz_dir, flips, words, keep):
    data = bytearray(BASE)
    for position, mask in flips:
        data[position] ^= mask
    for position, value in words:  # a 32-bit field: a size, an offset, a CRC ...
        data[position : position + 4] = value.to_bytes(4, "little")
    path = fuzz_dir / "mutated.mbc"
    path.write_bytes(bytes(data[:keep] if keep is not None else data))
    art = _read_or_refuse(path)
    if art is not None:  # only harmless bytes changed (a timestamp, an attribute)
        assert art.lib == b"L" * 512 and art.tokenizer == crafting.TOKENIZER
    with contextlib.suppress(ArtifactError):
        artifact.read_tokenizer(path)


odd_values = (
    json_values
    | st.sampled_from([math.nan, math.inf, -math.inf, 10**30, -(2**63), 2**31, 0, -1, ""])
    | st.sampled_from(["float32", "int64", "multiple-choice", "start_logits", "logits"])
    | st.integers(1, 300).map(lambda n: json.loads("[" * n + "]" * n))
)


def _key_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _key_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _key_paths(value, (*prefix, i))


def _mutate(meta: dict, path: tuple, action: str, value):
    if not path:
        return value if action == "replace" else meta
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[f"extra_{last}"] = value
    else:
        parent.append(value)
    return meta


@FUZZ
@given(data=st.data())
def test_mutated_metadata_reads_or_is_refused(fuzz_dir, data):
    meta = crafting.metadata_dict()
    for _ in range(data.draw(st.integers(1, 3))):
        if not isinstance(meta, dict):
            break
        path = data.draw(st.sampled_from(list(_key_paths(meta))))
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        meta = _mutate(meta, path, action, data.draw(odd_values))
    text = crafting.metadata_json(meta, {"lib.so": b"x"}) if isinstance(meta, dict) else b"[]"
    path = crafting.write_artifact(fuzz_dir / "crafted.mbc", lib=b"x", text=text)
    _read_or_refuse(path)


@FUZZ
@given(value=odd_values)
def test_from_dict_of_any_json_reads_or_is_refused(value):
    with contextlib.suppress(ArtifactError):
        Metadata.from_dict(value)
