"""logits_for="masked": MaskedLM/PreTraining compute vocabulary logits only at [MASK] positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_model, tiny_config

import mbcompile
from mbcompile import InputError
from mbcompile.passes import DEFAULT_PASSES

MASK = 5


@pytest.fixture(scope="module", params=["masked-lm", "pretraining"])
def pruned(request):
    model = make_model(request.param, tiny_config())
    compiled = mbcompile.compile(
        model, seq_len=12, batch_size=2, logits_for="masked", max_masked=3, mask_token_id=MASK
    )
    return model, compiled


def _ids():
    ids = torch.randint(MASK + 1, 211, (3, 10), generator=torch.Generator().manual_seed(0))
    ids[0, 2] = ids[0, 7] = ids[2, 9] = MASK
    return ids


def test_logits_at_masked_positions_equal_eager(pruned):
    model, compiled = pruned
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    out = compiled(ids, mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
    name = "logits" if "logits" in out else "prediction_logits"
    assert out.masked_positions.tolist() == [[2, 7], [-1, -1], [9, -1]]
    for b, p in [(0, 2), (0, 7), (2, 9)]:
        slot = out.masked_positions[b].tolist().index(p)
        assert (out[name][b, slot] - ref[name][b, p]).abs().max() <= 1e-4
    assert torch.isnan(out[name][1]).all() and torch.isnan(out[name][2, 1]).all()
    if "seq_relationship_logits" in ref:
        assert (out.seq_relationship_logits - ref.seq_relationship_logits).abs().max() <= 1e-4


def test_explicit_positions_override_the_mask_token(pruned):
    model, compiled = pruned
    ids = _ids()
    out = compiled(ids.numpy(), masked_positions=np.array([[0, 1], [4, -1], [9, 3]]))
    with torch.no_grad():
        ref = model(input_ids=ids)
    name = "logits" if "logits" in out else "prediction_logits"
    assert isinstance(out[name], np.ndarray)
    assert np.abs(out[name][2, 1] - ref[name][2, 3].numpy()).max() <= 1e-4


def test_more_masks_than_compiled_is_refused(pruned):
    _, compiled = pruned
    ids = np.full((1, 10), MASK)
    with pytest.raises(InputError, match="max_masked=3"):
        compiled(ids)
    with pytest.raises(InputError, match=r"masked_positions: values must be in \[0, 10\)"):
        compiled(np.ones((1, 10), dtype=np.int64), masked_positions=np.array([[10]]))


def test_pruning_is_refused_for_heads_without_vocabulary_logits():
    model = make_model("question-answering", tiny_config())
    with pytest.raises(ValueError, match="logits_for='masked' applies to"):
        mbcompile.compile(model, seq_len=8, logits_for="masked")


def test_pruned_head_is_saved_and_loaded(pruned, tmp_path):
    _, compiled = pruned
    again = mbcompile.load(compiled.save(tmp_path / "p.mbc"))
    ids = _ids().numpy()
    a, b = compiled(ids), again(ids)
    assert list(a.keys()) == list(b.keys())
    assert np.array_equal(a.masked_positions, b.masked_positions)


def test_report_and_explain_show_the_pruning_pass_fired(pruned):
    from mbcompile.report import format_report

    _, compiled = pruned
    report = compiled.report()
    first = report["passes"][0]
    assert (first["pass"], first["fired"]) == ("PruneMaskedLMHead", 1)
    # The vocabulary projection now runs on 2·3 rows instead of 2·12.
    assert first["matmul_flops"] < report["imported"]["matmul_flops"]
    assert [row["pass"] for row in report["passes"][1:]] == [
        cls.__name__ for cls in DEFAULT_PASSES
    ]
    assert "PruneMaskedLMHead" in format_report(report)


def test_pruning_runs_with_no_other_pass_and_equals_eager():
    model = make_model("masked-lm", tiny_config())
    compiled = mbcompile.compile(
        model, seq_len=8, passes=(), logits_for="masked", max_masked=2, mask_token_id=MASK
    )
    assert [row["pass"] for row in compiled.report()["passes"]] == ["PruneMaskedLMHead"]
    ids = torch.randint(MASK + 1, 211, (1, 8), generator=torch.Generator().manual_seed(3))
    ids[0, 4] = MASK
    out = compiled(ids)
    with torch.no_grad():
        ref = model(input_ids=ids)
    assert out.masked_positions.tolist() == [[4]]
    assert (out.logits[0, 0] - ref.logits[0, 4]).abs().max() <= 1e-4


def test_the_pruning_pass_is_an_option_not_a_pass_to_list():
    model = make_model("masked-lm", tiny_config())
    with pytest.raises(ValueError, match=r"compile\(\.\.\., logits_for='masked'"):
        mbcompile.compile(model, seq_len=8, passes=["FoldNoNorm", "PruneMaskedLMHead"])
