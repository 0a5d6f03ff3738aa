"""Checkpoint folders as they arrive damaged (an interrupted download, a hand-edited config, the
wrong weights): compiling one raises ``ModelError`` naming the folder and what broke, and the
command line prints that in one error line, never "internal error" or a traceback."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_one_error_line, make_model, run_main, tiny_config

import mbcompile
from mbcompile.errors import ModelError


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _edit_config(folder, **fields):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **fields}))


def _pickled_weights(folder):
    """The weights as pytorch_model.bin (older checkpoints) instead of safetensors."""
    state = make_model("sequence-classification", tiny_config()).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


# (id, damage done to a good checkpoint folder, what the error must say)
DAMAGES = [
    ("safetensors_cut_short", lambda d: _truncate(d / "model.safetensors"), "SafetensorError"),
    ("safetensors_empty", lambda d: _truncate(d / "model.safetensors", 0), "SafetensorError"),
    ("safetensors_garbage", lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)),
     "SafetensorError"),
    ("pickle_cut_short", lambda d: _truncate(_pickled_weights(d)), "RuntimeError"),
    ("no_weights", lambda d: (d / "model.safetensors").unlink(), "no file named"),
    ("config_wrong_type", lambda d: _edit_config(d, hidden_size="big"), "hidden_size"),
    ("config_not_json", lambda d: (d / "config.json").write_text("{ not json"), "JSON"),
    ("weights_of_another_shape", lambda d: _edit_config(d, intermediate_size=40), "mismatch"),
]


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "checkpoint"
    make_model("sequence-classification", tiny_config()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage, says", [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_a_damaged_checkpoint_is_a_model_error_naming_the_folder_and_the_cause(
    checkpoint, damage, says
):
    mbcompile.compile(str(checkpoint), seq_len=8)  # the folder is good before the damage
    damage(checkpoint)
    with pytest.raises(ModelError) as caught:
        mbcompile.compile(str(checkpoint), seq_len=8)
    message = str(caught.value)
    assert str(checkpoint) in message and says.lower() in message.lower(), message


@pytest.mark.parametrize("which", ["safetensors_cut_short", "config_wrong_type"])
def test_the_command_line_names_a_damaged_checkpoint_in_one_error_line(
    checkpoint, tmp_path, capsys, which
):
    damage, says = {d[0]: d[1:] for d in DAMAGES}[which]
    damage(checkpoint)
    code, err = run_main(
        ["compile", str(checkpoint), "--seq-len", "8", "-o", str(tmp_path / "out.mbc")], capsys
    )
    assert code == 2, err
    line = assert_one_error_line(err, str(checkpoint))
    assert says in line and "internal error" not in line, line
