"""Tokenizers: saved into the artifact with the model (and loaded from it, even where torch cannot
be imported), loaded from a folder, and refused when missing or foreign to the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile

import pytest
from pipeline_helpers import VOCAB, assert_same, make_tokenizer, write_vocab

import mbcompile
from mbcompile.pipelines import PipelineError


@pytest.fixture(scope="module")
def saved_fill(mlm, vocab_dir, tmp_path_factory):
    """A fill-mask pipeline whose tokenizer came from a folder, saved as one artifact."""
    fill = mbcompile.pipeline("fill-mask", mlm[1], tokenizer=str(vocab_dir))
    folder = tmp_path_factory.mktemp("saved")
    return fill, fill.save(folder / "mlm.mbc")


def test_pipeline_saved_with_its_tokenizer_loads_without_one(mlm, tok, vocab_dir, saved_fill,
                                                              tmp_path):
    _, compiled = mlm
    fill, path = saved_fill
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("metadata.json"))
        assert zf.read("tokenizer/vocab.txt") == (vocab_dir / "vocab.txt").read_bytes()
    assert "tokenizer/vocab.txt" in meta["members"] and "lib.so" in meta["members"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["mlm.mbc"]  # no temporary left

    again = mbcompile.pipeline("fill-mask", path)  # tokenizer from the artifact
    text = "the [MASK] sat on the mat ."
    assert_same(again(text), fill(text))
    assert_same(again(text), mbcompile.pipeline("fill-mask", compiled, tokenizer=tok)(text))
    assert mbcompile.load(path).signature == compiled.signature

    # A tokenizer object is saved through save_pretrained (tokenizer.json ...).
    path2 = mbcompile.pipeline("fill-mask", compiled, tokenizer=tok).save(tmp_path / "m2.mbc")
    with zipfile.ZipFile(path2) as zf:
        assert "tokenizer/tokenizer.json" in zf.namelist()
    assert_same(mbcompile.pipeline("fill-mask", path2)(text), fill(text))


def test_saved_pipeline_runs_where_torch_cannot_be_imported(saved_fill):
    fill, path = saved_fill
    text = "john [MASK] in the [MASK] ."
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["torch"] = None          # any import of torch now raises ImportError
        sys.modules["transformers"] = None   # and of transformers: the tokenizers library only
        import mbcompile
        out = mbcompile.pipeline("fill-mask", {str(path)!r})({text!r}, top_k=2)
        loaded = [m for m, v in sys.modules.items() if v is not None]
        assert "torch" not in loaded and "transformers" not in loaded
        print(json.dumps(out))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=True, timeout=300,
                          capture_output=True, text=True)
    assert_same(json.loads(done.stdout.strip().splitlines()[-1]), fill(text, top_k=2))


def test_missing_or_mismatched_tokenizer_is_refused(mlm, tmp_path):
    _, compiled = mlm
    with pytest.raises(PipelineError, match="no tokenizer"):
        mbcompile.pipeline("fill-mask", compiled)
    bare = compiled.save(tmp_path / "bare.mbc")
    with pytest.raises(PipelineError, match=r"no tokenizer: the artifact .*bare.mbc has none"):
        mbcompile.pipeline("fill-mask", bare)
    with pytest.raises(PipelineError, match="is not a folder"):
        mbcompile.pipeline("fill-mask", compiled, tokenizer=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="holds no tokenizer files"):
        mbcompile.pipeline("fill-mask", compiled, tokenizer=tmp_path / "empty")
    bigger = make_tokenizer(write_vocab(tmp_path / "big", VOCAB + ["extra", "words"]))
    with pytest.raises(PipelineError, match=f"has {len(VOCAB) + 2} tokens.*vocab_size is"):
        mbcompile.pipeline("fill-mask", compiled, tokenizer=bigger)
    with pytest.raises(TypeError, match="expected a transformers tokenizer"):
        mbcompile.pipeline("fill-mask", compiled, tokenizer=object())


def test_every_pipeline_runs_on_tokenizers_alone_with_transformers_answers(mlm, qa, tok, vocab_dir,
                                                                           tmp_path):
    """Artifacts holding their tokenizer files run fill-mask, question answering (stride
    windows, offsets), token classification (offsets, aggregation) and text classification in a
    process where torch and transformers cannot be imported, with the answers transformers'
    own tokenizer gives in this process."""
    from helpers import make_model
    from pipeline_helpers import LONG_CONTEXT, config

    ner_model = make_model("token-classification", config(num_labels=5), seed=8)
    clf_model = make_model("sequence-classification", config(num_labels=3), seed=9)
    models = {
        "fill-mask": mlm[1],
        "question-answering": qa[1],
        "token-classification": mbcompile.compile(ner_model, max_seq_len=32),
        "text-classification": mbcompile.compile(clf_model, seq_len=32),
    }
    calls = {
        "fill-mask": ([["the [MASK] sat on the mat .", "paris is the [MASK] of france ."]],
                      {"top_k": 3}),
        "question-answering": ([], {"question": "where does john live ?", "context": LONG_CONTEXT,
                                    "top_k": 2, "doc_stride": 8, "max_seq_len": 32}),
        "token-classification": (["john smith lives in paris , france ."],
                                 {"aggregation_strategy": "simple"}),
        "text-classification": ([["the old cat sat on the mat", "mary works in berlin"]],
                                {"top_k": None}),
    }
    expected, paths = {}, {}
    for task, model in models.items():
        args, kwargs = calls[task]
        expected[task] = mbcompile.pipeline(task, model, tokenizer=tok)(*args, **kwargs)
        paths[task] = str(mbcompile.pipeline(task, model, tokenizer=str(vocab_dir)).save(
            tmp_path / f"{task}.mbc"))
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["torch"] = None
        sys.modules["transformers"] = None
        import mbcompile
        calls = {calls!r}
        out = {{}}
        for task, path in {paths!r}.items():
            args, kwargs = calls[task]
            out[task] = mbcompile.pipeline(task, path)(*args, **kwargs)
        loaded = [m for m, v in sys.modules.items() if v is not None]
        assert "torch" not in loaded and "transformers" not in loaded
        print(json.dumps(out))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=600, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for task in models:
        assert_same(got[task], json.loads(json.dumps(expected[task])))
