"""The runtime cross-checks an artifact's metadata with its library before trusting it: the
library's parameters by name and count before anything runs, the shapes it accepts, and what it
returns. Crafted or mismatched metadata ends in ArtifactError, never a TVM error or wrong
numbers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import mbcompile
from mbcompile import artifact


def _with_signature(source, tmp_path, name: str, **changes):
    art = artifact.read(source)
    signature = dataclasses.replace(art.metadata.signature, **changes)
    path = tmp_path / f"{name}.mbc"
    artifact.write(path, dataclasses.replace(art.metadata, signature=signature), art.lib)
    return path


def test_metadata_that_drops_an_input_of_the_library_is_refused_before_running(
    tiny_qa_artifact, tmp_path
):
    path = _with_signature(tiny_qa_artifact, tmp_path, "no-lengths", takes_lengths=False)
    with pytest.raises(mbcompile.ArtifactError, match=r"library's main takes \[.*'lengths'\]"):
        mbcompile.load(path)(np.arange(1, 6)[None])


def test_metadata_with_another_sequence_length_is_refused(tiny_qa_artifact, tmp_path):
    sig = artifact.read(tiny_qa_artifact).metadata.signature
    path = _with_signature(tiny_qa_artifact, tmp_path, "longer", seq_len=sig.seq_len * 2,
                           outputs=tuple(dataclasses.replace(o, shape=(o.shape[0], sig.seq_len * 2))
                                         for o in sig.outputs))
    with pytest.raises(mbcompile.ArtifactError, match="refused inputs shaped as the metadata"):
        mbcompile.load(path)(np.arange(1, 6)[None])


def test_metadata_with_other_output_shapes_is_refused(tiny_qa_artifact, tmp_path):
    sig = artifact.read(tiny_qa_artifact).metadata.signature
    outputs = (dataclasses.replace(sig.outputs[0], shape=(sig.outputs[0].shape[0], 3)),)
    path = _with_signature(tiny_qa_artifact, tmp_path, "outs", outputs=outputs + sig.outputs[1:])
    with pytest.raises(mbcompile.ArtifactError, match="the library returned"):
        mbcompile.load(path)(np.arange(1, 6)[None])
