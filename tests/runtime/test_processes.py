"""Models in worker processes. Sent to them (multiprocessing, joblib, Ray pickle them): a
compiled model pickles as its artifact and threads per call, a pipeline with the tokenizer saved
in its artifact pickles too, and a worker process started with ``spawn`` gets the same outputs;
what cannot travel (a closed model, one bound to a remote device) says so. Inherited by
``fork`` (Linux's default, gunicorn --preload, Celery): a model that ran on several threads in
the parent runs in the children too, instead of waiting forever for the parent's TVM workers."""

from __future__ import annotations

import concurrent.futures
import copy
import multiprocessing
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import random_inputs

import mbcompile
from mbcompile.errors import ModelClosedError, RemoteError

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(205)]  # + 1 added: 211


def _logits(model, ids):
    out = model(input_ids=ids, return_dict=True)
    return np.stack([out.start_logits, out.end_logits])


def test_a_compiled_model_pickles_as_its_artifact_and_threads(tiny_qa):
    model, compiled = tiny_qa
    ids = random_inputs(model.config, (2, 11), seed=4)[0].numpy()
    one_thread = compiled.with_threads(1)
    for copied in (pickle.loads(pickle.dumps(one_thread)), copy.deepcopy(one_thread)):
        assert copied.program.num_threads == 1
        assert copied.reference is None  # the PyTorch model stays behind
        assert copied.metadata == compiled.metadata
        np.testing.assert_array_equal(_logits(copied, ids), _logits(compiled, ids))


def _worker(model, ids):
    return _logits(model, ids)


def test_a_spawned_worker_process_gets_the_same_outputs(tiny_qa, tiny_qa_artifact):
    model, _ = tiny_qa
    loaded = mbcompile.load(tiny_qa_artifact)
    ids = random_inputs(model.config, (3, 9), seed=5)[0].numpy()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        got = pool.submit(_worker, loaded, ids).result(timeout=300)
    np.testing.assert_array_equal(got, _logits(loaded, ids))


def test_a_pipeline_with_its_saved_tokenizer_pickles(tiny_qa, tmp_path):
    from mbcompile import artifact

    _, compiled = tiny_qa
    qa = artifact.read(compiled.save(tmp_path / "qa.mbc"))
    path = artifact.write(tmp_path / "qa-tok.mbc", qa.metadata, qa.lib,
                          tokenizer={"vocab.txt": "\n".join(WORDS).encode() + b"\n"})
    pipe = mbcompile.pipeline("question-answering", path)
    pipe.tokenizer._tokenizer.add_tokens(["w999"])  # added tokens travel too
    again = pickle.loads(pickle.dumps(pipe))
    assert len(again.tokenizer) == len(pipe.tokenizer) == len(WORDS) + 1
    asked = {"question": "w5 w6 ?", "context": "w1 w2 w999 w5 w7 w8 w9 .", "top_k": 2}
    assert again(**asked) == pipe(**asked)
    assert again.tokenizer("w5 w999")["input_ids"] == pipe.tokenizer("w5 w999")["input_ids"]


def test_a_closed_or_remote_model_says_why_it_cannot_be_pickled(tiny_qa_artifact):
    loaded = mbcompile.load(tiny_qa_artifact)

    class Elsewhere:  # a program of another device (mbcompile.devices.remote.RemoteProgram)
        def close(self):
            pass

    with pytest.raises(RemoteError, match="runs on a remote device and cannot be pickled"):
        pickle.dumps(loaded.with_program(Elsewhere()))
    loaded.close()
    with pytest.raises(ModelClosedError, match="is closed"):
        pickle.dumps(loaded)
    with pytest.raises(ModelClosedError, match="is closed"):
        loaded.with_threads(1)


FORKED = textwrap.dedent("""
    import multiprocessing, sys
    import numpy as np
    import mbcompile

    model = mbcompile.load(sys.argv[1]).with_threads(2)
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 200, size=(b, n)) for b, n in ((1, 16), (1, 5), (3, 11), (2, 16))]

    def run(ids):
        return model(input_ids=ids, return_dict=False)

    parent = [run(ids) for ids in inputs]  # the parent's TVM pool has its worker threads now
    with multiprocessing.get_context("fork").Pool(2) as pool:
        children = pool.map_async(run, inputs).get(timeout=120)
    for mine, theirs in zip(parent, children):
        for a, b in zip(mine, theirs):
            np.testing.assert_array_equal(a, b)
    print("forked children agree", len(children))
""")


def test_forked_children_run_a_model_the_parent_ran_on_two_threads(tiny_qa_artifact, tmp_path):
    script = tmp_path / "forked.py"
    script.write_text(FORKED)
    done = subprocess.run([sys.executable, str(script), str(tiny_qa_artifact)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "forked children agree 4" in done.stdout


TOKENIZER_HELD = textwrap.dedent("""
    import os, signal, sys, threading
    from mbcompile.artifact.tokenizer_json import tokenizer_json_from_vocab
    from mbcompile.pipelines.fast_tokenizer import FastTokenizer

    words = sys.argv[1].split()
    tok = FastTokenizer(tokenizer_json_from_vocab("\\n".join(words).encode()))
    expected = tok("w1 w2")["input_ids"]
    held, release = threading.Event(), threading.Event()

    def hold():  # another thread of the parent is tokenizing at the moment of the fork
        with tok._lock:
            held.set()
            release.wait()

    threading.Thread(target=hold).start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # a child that hangs ends (SIGALRM) instead of staying behind
        os._exit(0 if tok("w1 w2")["input_ids"] == expected else 3)
    _, status = os.waitpid(pid, 0)
    release.set()
    print("child exit", os.waitstatus_to_exitcode(status))  # -14: it hung (SIGALRM)
""")


def test_a_forked_child_tokenizes_while_a_parent_thread_held_the_tokenizer(tmp_path):
    script = tmp_path / "held.py"
    script.write_text(TOKENIZER_HELD)
    done = subprocess.run([sys.executable, str(script), " ".join(WORDS)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "child exit 0" in done.stdout
