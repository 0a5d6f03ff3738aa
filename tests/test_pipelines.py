"""Tokenizer-based pipelines: each task's output equals transformers' pipeline on the eager model.

Tiny seeded models (initializer_range 0.2, so that scores are not all alike) over a WordPiece vocab
written here; compiled at seq_len 32. Question answering is compared with transformers'
``select_starts_ends`` on the eager logits (transformers 5 has no question-answering pipeline).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from helpers import TOL, make_model, tiny_config
from transformers import BertTokenizerFast
from transformers import pipeline as hf_pipeline
from transformers.pipelines.document_question_answering import select_starts_ends

import mbcompile
from mbcompile.pipelines import PipelineError

SEQ = 32
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    ".", ",", "?", "!", "'", "-", "the", "a", "is", "was", "are", "in", "on", "of", "to", "and",
    "at", "cat", "dog", "sat", "mat", "house", "city", "capital", "paris", "france", "london",
    "england", "berlin", "germany", "river", "big", "small", "red", "old", "new", "john", "mary",
    "smith", "lives", "live", "works", "work", "what", "where", "who", "which", "people", "there",
    "this", "it", "he", "she", "they", "##s", "##ing", "##ed", "##er", "##son", "##ville",
    "##ton",
]
VOCAB = SPECIAL + WORDS
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def config(**overrides):
    return tiny_config(**{"vocab_size": len(VOCAB), "initializer_range": 0.2, **overrides})


def write_vocab(folder, words=VOCAB):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def make_tokenizer(folder, **kwargs):
    # transformers 5: the vocabulary file is passed as vocab= (vocab_file= is ignored there).
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), **kwargs)
    assert len(tok) == len((folder / "vocab.txt").read_text().split())
    return tok


def assert_same(ours, ref, where="output"):
    """Same nesting, keys (in order), strings and integers; scores within TOL."""
    if isinstance(ref, dict):
        assert isinstance(ours, dict) and list(ours) == list(ref), (where, ours, ref)
        for key in ref:
            assert_same(ours[key], ref[key], f"{where}[{key!r}]")
    elif isinstance(ref, (list, tuple)):
        assert isinstance(ours, list) and len(ours) == len(ref), (where, ours, ref)
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ref, (float, np.floating)):
        assert isinstance(ours, float), (where, type(ours))
        assert abs(ours - float(ref)) <= TOL, (where, ours, float(ref))
    else:
        assert ours == ref, (where, ours, ref)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def tok(vocab_dir):
    return make_tokenizer(vocab_dir)


@pytest.fixture(scope="module")
def mlm():
    model = make_model("masked-lm", config())
    return model, mbcompile.compile(model, seq_len=SEQ)


@pytest.fixture(scope="module")
def pruned_pretraining(tok):
    model = make_model("pretraining", config(), seed=3)
    compiled = mbcompile.compile(
        model, seq_len=SEQ, batch_size=2, logits_for="masked", max_masked=2,
        mask_token_id=tok.mask_token_id,
    )
    return model, compiled


@pytest.fixture(scope="module")
def qa():
    # 0.15: start/end scores neither saturated (ties at 1.0) nor flat (ties at 1/n²)
    model = make_model("question-answering", config(initializer_range=0.15))
    return model, mbcompile.compile(model, seq_len=SEQ)


@pytest.fixture(scope="module")
def classifier():
    model = make_model(
        "sequence-classification",
        config(num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"}),
    )
    return model, mbcompile.compile(model, seq_len=SEQ)


@pytest.fixture(scope="module")
def tagger():
    # Tags of all five kinds, B-I runs that "simple" merges, and every top-2 margin > 1e-3.
    cfg = config(id2label=NER_LABELS, initializer_range=0.12)
    model = make_model("token-classification", cfg, seed=2)
    return model, mbcompile.compile(model, seq_len=SEQ)


# -- fill-mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs, params",
    [
        ("the cat [MASK] on the mat .", {}),
        ("[MASK] is the capital of france .", {"top_k": 3}),
        ("the [MASK] sat on the [MASK] .", {"top_k": 2}),
        (["the cat [MASK] on the mat .", "john [MASK] in paris ."], {}),
        (["where does mary [MASK] ?"], {}),
        ("the [MASK] is big .", {"targets": ["cat", "dog", "river"]}),
    ],
)
def test_fill_mask_matches_transformers(mlm, tok, inputs, params):
    model, compiled = mlm
    ours = mbcompile.pipeline("fill-mask", compiled, tokenizer=tok)(inputs, **params)
    ref = hf_pipeline("fill-mask", model=model, tokenizer=tok)(inputs, **params)
    assert_same(ours, ref)


def test_fill_mask_on_the_pruned_pretraining_head_matches_transformers(pruned_pretraining, tok):
    pretraining, compiled = pruned_pretraining
    # transformers' fill-mask needs a MaskedLM: one with the pretraining model's weights.
    mlm = make_model("masked-lm", config())
    missing, _ = mlm.load_state_dict(pretraining.state_dict(), strict=False)
    assert missing == []
    fill = mbcompile.pipeline("fill-mask", compiled, tokenizer=tok)
    reference = hf_pipeline("fill-mask", model=mlm, tokenizer=tok)
    for text in ["the cat [MASK] on the mat .", "[MASK] lives in [MASK] ."]:
        assert_same(fill(text, top_k=4), reference(text, top_k=4))
    # Batches of two (the compiled batch size), rows with one or two masks.
    texts = ["[MASK] lives in [MASK] .", "the cat [MASK] .", "john [MASK] in paris , [MASK] ."]
    assert_same(fill(texts, top_k=3), reference(texts, top_k=3))
    with pytest.raises(PipelineError, match="3 mask tokens.*max_masked=2"):
        fill("[MASK] [MASK] [MASK] .")


@pytest.fixture(scope="module")
def next_sentence():
    model = make_model("next-sentence", config(), seed=4)
    return model, mbcompile.compile(model, seq_len=SEQ)


@pytest.mark.parametrize("head", ["next-sentence", "pretraining"])
def test_next_sentence_prediction_matches_eager(request, head, tok):
    fixture = "next_sentence" if head == "next-sentence" else "pruned_pretraining"
    model, compiled = request.getfixturevalue(fixture)
    nsp = mbcompile.pipeline("next-sentence-prediction", compiled, tokenizer=tok)
    pairs = [("john lives in paris .", "he works there ."), ("the cat sat .", "berlin is big .")]
    out = nsp([a for a, _ in pairs], [b for _, b in pairs])
    assert len(out) == 2
    for (a, b), got in zip(pairs, out):
        enc = tok(a, b, return_tensors="pt")
        with torch.no_grad():
            ref = model(**enc)
        logits = ref.logits if head == "next-sentence" else ref.seq_relationship_logits
        probs = logits.softmax(-1)[0]
        label = "is_next" if probs[0] >= probs[1] else "not_next"
        assert got["label"] == label
        assert abs(got["score"] - float(probs.max())) <= TOL
    assert nsp(*pairs[0]) == out[0]


# -- question answering -------------------------------------------------------------------------


def qa_reference(model, tok, question, context, *, max_seq_len=SEQ, doc_stride, top_k=1,
                 handle_impossible_answer=False, max_answer_len=15):
    """transformers 4.x's QuestionAnsweringPipeline, step by step on the eager model."""
    enc = tok(question, context, truncation="only_second", max_length=max_seq_len,
              stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
              return_token_type_ids=True)
    min_null_score, answers = 1000000, []
    for w in range(len(enc["input_ids"])):
        inputs = {k: torch.tensor([enc[k][w]])
                  for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            out = model(**inputs)
        p_mask = np.array([s != 1 for s in enc.sequence_ids(w)])
        p_mask[0] = False  # [CLS] stays unmasked
        starts, ends, scores, min_null_score = select_starts_ends(
            out.start_logits.numpy(), out.end_logits.numpy(), p_mask,
            np.array(enc["attention_mask"][w]), min_null_score, top_k,
            handle_impossible_answer, max_answer_len,
        )
        encoding = enc.encodings[w]
        for s, e, score in zip(starts, ends, scores):
            # QuestionAnsweringPipeline.get_indices(align_to_words=True): whole words, else the
            # token offsets ([CLS] has no word).
            words = encoding.token_to_word(int(s)), encoding.token_to_word(int(e))
            if None in words:
                start, end = encoding.offsets[s][0], encoding.offsets[e][1]
            else:
                start = encoding.word_to_chars(words[0], sequence_index=1)[0]
                end = encoding.word_to_chars(words[1], sequence_index=1)[1]
            answers.append({"score": score.item(), "start": start, "end": end,
                            "answer": context[start:end]})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


QUESTION = "where does john smith live ?"
CONTEXT = "john smithson lives in londonville , the capital of england ."
LONG_CONTEXT = (
    "mary works in berlin , a big city in germany . the old river is red . john smith lives in "
    "paris , the capital of france . the cat sat on the mat in the small house . they live there "
    "and it is new ."
)


@pytest.mark.parametrize(
    "params",
    [{}, {"top_k": 3}, {"top_k": 2, "handle_impossible_answer": True, "max_answer_len": 4}],
)
def test_question_answering_matches_transformers(qa, tok, params):
    model, compiled = qa
    ours = mbcompile.pipeline("question-answering", compiled, tokenizer=tok)(
        question=QUESTION, context=CONTEXT, **params
    )
    ref = qa_reference(model, tok, QUESTION, CONTEXT, doc_stride=SEQ // 2, **params)
    assert_same(ours, ref)
    for answer in ours if isinstance(ours, list) else [ours]:
        assert CONTEXT[answer["start"] : answer["end"]] == answer["answer"]


def test_question_answering_reads_a_long_context_in_stride_windows(qa, tok):
    model, compiled = qa
    windows = tok(QUESTION, LONG_CONTEXT, truncation="only_second", max_length=SEQ, stride=6,
                  return_overflowing_tokens=True)["input_ids"]
    assert len(windows) >= 3 and len(tok(LONG_CONTEXT)["input_ids"]) > SEQ
    answer = mbcompile.pipeline("question-answering", compiled, tokenizer=tok)
    for params in ({"doc_stride": 6}, {"doc_stride": 6, "top_k": 3}):
        ours = answer({"question": QUESTION, "context": LONG_CONTEXT}, **params)
        assert_same(ours, qa_reference(model, tok, QUESTION, LONG_CONTEXT, **params))
    # The default stride fits the question: the same windows as transformers' default stride.
    ours = answer(question=[QUESTION, "what is big ?"], context=LONG_CONTEXT)
    assert_same(ours[0], qa_reference(model, tok, QUESTION, LONG_CONTEXT, doc_stride=SEQ // 2))


def test_question_answering_refuses_what_cannot_fit(qa, tok):
    _, compiled = qa
    answer = mbcompile.pipeline("question-answering", compiled, tokenizer=tok)
    long_question = " ".join(["where does the big red cat live ?"] * 4)
    with pytest.raises(PipelineError, match=r"question is \d+ tokens long.*seq_len 32"):
        answer(question=long_question, context=CONTEXT)
    with pytest.raises(PipelineError, match="doc_stride=30 must be smaller than the 23"):
        answer(question=QUESTION, context=LONG_CONTEXT, doc_stride=30)
    with pytest.raises(PipelineError, match="max_seq_len=64 exceeds the compiled seq_len=32"):
        answer(question=QUESTION, context=CONTEXT, max_seq_len=64)
    with pytest.raises(ValueError, match="context cannot be empty"):
        answer(question=QUESTION, context=" ")


# -- text classification ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs, params",
    [
        ("the cat sat on the mat .", {}),
        ({"text": "john lives in paris .", "text_pair": "he is there ."}, {}),
        (["the dog is big .", "mary works in berlin ."], {}),
        ("the river is red .", {"top_k": None}),
        (["the river is red .", "it was new"], {"top_k": 2}),
        ({"text": "who is it ?", "text_pair": "it is john ."}, {"top_k": 1}),
        ("the cat sat .", {"function_to_apply": "sigmoid", "top_k": None}),
        ("the cat sat .", {"function_to_apply": "none"}),
    ],
)
def test_text_classification_matches_transformers(classifier, tok, inputs, params):
    model, compiled = classifier
    ours = mbcompile.pipeline("text-classification", compiled, tokenizer=tok)(inputs, **params)
    ref = hf_pipeline("text-classification", model=model, tokenizer=tok)(inputs, **params)
    assert_same(ours, ref)


def test_multi_label_classifier_from_a_checkpoint_folder_uses_sigmoid_and_its_tokenizer(
    tmp_path, vocab_dir
):
    from mbcompile.models import load_checkpoint

    folder = tmp_path / "checkpoint"
    cfg = config(num_labels=3, problem_type="multi_label_classification")
    make_model("sequence-classification", cfg, seed=2).save_pretrained(folder)
    (folder / "vocab.txt").write_bytes((vocab_dir / "vocab.txt").read_bytes())
    model = load_checkpoint(folder)
    compiled = mbcompile.compile(model, seq_len=SEQ)
    classify = mbcompile.pipeline("sentiment-analysis", compiled)  # tokenizer from the folder
    texts = ["the cat sat on the mat .", "paris is big"]
    ours = classify(texts, top_k=None)
    ref = hf_pipeline("text-classification", model=model, tokenizer=make_tokenizer(vocab_dir))(
        texts, top_k=None
    )
    assert_same(ours, ref)
    assert abs(sum(d["score"] for d in ours[0]) - 1.0) > 1e-3  # sigmoid: not a distribution


# -- token classification -----------------------------------------------------------------------


TAGGED = ["john smithson lives in londonville , england .", "mary works at the xylophone"]


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
@pytest.mark.parametrize("ignore_labels", [None, []])
def test_token_classification_matches_transformers(tagger, tok, strategy, ignore_labels):
    model, compiled = tagger
    params = {"aggregation_strategy": strategy, "ignore_labels": ignore_labels}
    ours = mbcompile.pipeline("ner", compiled, tokenizer=tok)(TAGGED, **params)
    ref = hf_pipeline("token-classification", model=model, tokenizer=tok)(TAGGED, **params)
    assert_same(ours, ref)
    assert ours[0] and ours[1]
    if strategy == "simple":  # adjacent B-/I- tokens became one entity
        assert any(" " in e["word"] for e in ours[0] + ours[1])
    assert_same(mbcompile.pipeline("ner", compiled, tokenizer=tok)(TAGGED[0], **params), ref[0])


def test_token_classification_reads_a_long_text_in_stride_windows(tagger, vocab_dir):
    model, compiled = tagger
    tok = make_tokenizer(vocab_dir, model_max_length=SEQ)  # transformers' window length
    assert len(tok(LONG_CONTEXT)["input_ids"]) > SEQ
    tag = mbcompile.pipeline("token-classification", compiled, tokenizer=tok)
    for strategy in ("simple", "max"):
        params = {"aggregation_strategy": strategy, "stride": 8}
        ours = tag(LONG_CONTEXT, **params)
        reference = hf_pipeline("token-classification", model=model, tokenizer=tok)
        ref = reference(LONG_CONTEXT, **params)
        assert ours and ours[-1]["end"] > len(LONG_CONTEXT) // 2
        assert_same(ours, ref)
    with pytest.raises(PipelineError, match="seq_len=32.*stride=n"):
        tag(LONG_CONTEXT)
    with pytest.raises(ValueError, match="aggregation_strategy other than 'none'"):
        tag(LONG_CONTEXT, stride=8)


# -- multiple choice ----------------------------------------------------------------------------


def test_multiple_choice_matches_eager(tok):
    model = make_model("multiple-choice", config())
    compiled = mbcompile.compile(model, seq_len=SEQ, num_choices=3)
    choose = mbcompile.pipeline("multiple-choice", compiled, tokenizer=tok)
    prompt, choices = "john lives in paris .", ["he is there .", "the cat sat .", "it is big"]
    out = choose(prompt, choices)
    enc = tok([prompt] * 3, choices, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**{k: v[None] for k, v in enc.items()}).logits.softmax(-1)[0]
    assert [d["index"] for d in out] == torch.argsort(probs, descending=True).tolist()
    for d in out:
        assert d["choice"] == choices[d["index"]]
        assert abs(d["score"] - float(probs[d["index"]])) <= TOL
    with pytest.raises(PipelineError, match="2 choices given.*num_choices=3"):
        choose(prompt, choices[:2])


# -- tokenizers saved with the model ------------------------------------------------------------


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
        import mbcompile
        out = mbcompile.pipeline("fill-mask", {str(path)!r})({text!r}, top_k=2)
        assert "torch" not in [m for m, v in sys.modules.items() if v is not None]
        print(json.dumps(out))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=True, timeout=300,
                          capture_output=True, text=True)
    assert_same(json.loads(done.stdout.strip().splitlines()[-1]), fill(text, top_k=2))


# -- errors -------------------------------------------------------------------------------------


def test_wrong_task_for_the_head_is_refused(qa, tok):
    _, compiled = qa
    with pytest.raises(PipelineError, match=r"'fill-mask' needs .*question-answering"):
        mbcompile.pipeline("fill-mask", compiled, tokenizer=tok)
    with pytest.raises(PipelineError, match="Unknown task 'summarization'"):
        mbcompile.pipeline("summarization", compiled, tokenizer=tok)


def test_fill_mask_input_errors_name_the_problem(mlm, tok):
    _, compiled = mlm
    fill = mbcompile.pipeline("fill-mask", compiled, tokenizer=tok)
    with pytest.raises(PipelineError, match=r"no mask token \(\[MASK\]\) in input 1"):
        fill(["the [MASK] sat .", "the cat sat ."])
    too_long = "the cat sat on the mat . " * 6 + "[MASK]"
    with pytest.raises(PipelineError, match=r"is 45 tokens long.*seq_len=32"):
        fill(too_long)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        fill("the [MASK] .", top_k=0)


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
