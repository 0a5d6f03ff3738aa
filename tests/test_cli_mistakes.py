"""Plain mistakes on the command line (issue 14, point 5): each ends with exit status 2 and one
line on stderr, ``mbcompile: error: ...`` naming what was wrong (or argparse's usage and its
error line), never a traceback. Most run ``mbcompile.cli.main`` in this process; a few
representative ones run the installed ``mbcompile`` command.

Nothing here compiles: the artifacts are the session's tiny QA artifact and copies of it (with a
tokenizer, or with metadata of a token-classification head; no call reaches their library),
and the checkpoint is a tiny saved model whose compile is refused before it starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_one_error_line, make_model, run_main, tiny_config

from mbcompile import artifact
from mbcompile.signature import OutputSpec

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "."]


@pytest.fixture(scope="module")
def files(tiny_qa_artifact, tmp_path_factory) -> dict[str, Path]:
    """The paths the mistakes below name."""
    root = tmp_path_factory.mktemp("cli-mistakes")
    vocab = root / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    bad_tokenizer = root / "bad-tokenizer"
    bad_tokenizer.mkdir()
    (bad_tokenizer / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (bad_tokenizer / "tokenizer.json").write_text("{")

    checkpoint = root / "checkpoint"
    make_model("base", tiny_config()).save_pretrained(checkpoint)

    qa = artifact.read(tiny_qa_artifact)
    qa_with_tokenizer = root / "qa-tok.mbc"
    artifact.write(qa_with_tokenizer, qa.metadata, qa.lib,
                   tokenizer={"vocab.txt": (vocab / "vocab.txt").read_bytes()})
    # A token-classification head's metadata over the QA library: the stride is refused before
    # anything runs, which is all that is asked of it here.
    sig = qa.metadata.signature
    tagger_sig = dataclasses.replace(
        sig, head="token-classification", model_class="MobileBertForTokenClassification",
        outputs=(OutputSpec("logits", (sig.batch_size, sig.seq_len, 2), "float32", (1,)),),
        fields=("logits",),
    )
    tagger = root / "tagger.mbc"
    artifact.write(tagger, dataclasses.replace(qa.metadata, signature=tagger_sig), qa.lib)

    data = Path(tiny_qa_artifact).read_bytes()
    qa_copy = root / "qa-copy.mbc"  # add-tokenizer's mistakes must leave it as it is
    qa_copy.write_bytes(data)
    big_vocab = root / "big-vocab"
    big_vocab.mkdir()
    (big_vocab / "vocab.txt").write_text("\n".join(WORDS + [f"w{i}" for i in range(300)]) + "\n")
    no_unk = root / "no-unk"
    no_unk.mkdir()
    (no_unk / "vocab.txt").write_text("\n".join(w for w in WORDS if w != "[UNK]") + "\n")
    truncated = root / "truncated.mbc"
    truncated.write_bytes(data[: len(data) // 2])
    text = root / "notes.mbc"
    text.write_text("these are not the bytes of an artifact\n")
    return {
        "qa": Path(tiny_qa_artifact), "qa_tok": qa_with_tokenizer, "tagger": tagger,
        "truncated": truncated, "text": text, "missing": root / "missing.mbc",
        "checkpoint": checkpoint, "vocab": vocab, "bad_tokenizer": bad_tokenizer,
        "qa_copy": qa_copy, "big_vocab": big_vocab, "no_unk": no_unk,
        "out": root / "out.mbc", "work": root / "tuning",
    }


# (arguments, a fragment the error line must contain); {name} is a path from ``files``.
MISTAKES = [
    (["compile", "{checkpoint}", "--seq-len", "0", "-o", "{out}"], "seq_len"),
    (["compile", "{checkpoint}", "--seq-len", "-3", "-o", "{out}"], "seq_len"),
    (["compile", "{checkpoint}", "--batch-size", "0", "-o", "{out}"], "batch_size"),
    (["compile", "{checkpoint}", "--seq-len", "16", "--passes", "Bogus", "-o", "{out}"], "Bogus"),
    (["compile", "{checkpoint}", "--seq-len", "16", "--num-choices", "3", "-o", "{out}"],
     "num_choices"),
    (["compile", "{checkpoint}", "--seq-len", "16", "--logits-for", "masked", "-o", "{out}"],
     "logits_for"),
    (["compile", "{checkpoint}", "--seq-len", "16", "--max-masked", "0", "--logits-for", "masked",
      "-o", "{out}"], "max_masked"),
    (["compile", "{checkpoint}", "--seq-len", "16", "--mask-token-id", "-1", "--logits-for",
      "masked", "-o", "{out}"],
     "mask_token_id"),
    (["compile", "{checkpoint}", "--seq-len", "16", "--target", "arm", "-o", "{out}"], "'arm'"),
    (["compile", "{checkpoint}", "--seq-len", "16", "--tuning-db", "/nonexistent", "-o", "{out}"],
     "/nonexistent"),
    (["compile", "{checkpoint}", "--config", "mobilebert-tiny", "-o", "{out}"], "not both"),
    (["compile", "--config", "mobilebert-tiny", "-o", "{out}"], "--random-init"),
    (["compile", "--config", "nosuch", "--random-init", "-o", "{out}"], "'nosuch'"),
    (["compile", "{checkpoint}", "--random-init", "-o", "{out}"], "--random-init applies"),
    (["compile", "{checkpoint}", "--max-masked", "3", "-o", "{out}"],
     "--max-masked apply with --logits-for masked"),
    (["compile", "{checkpoint}", "--mask-token-id", "4", "-o", "{out}"], "--mask-token-id apply"),
    (["tune", "{checkpoint}", "--max-masked", "3", "-o", "{work}"], "--logits-for masked"),
    (["token-classification", "{tagger}", "john", "--top-k", "1"], "--top-k"),
    (["run", "{qa}", "--ids", "abc"], "--ids"),
    (["run", "{qa}", "--ids", ""], "--ids"),
    (["run", "{qa}", "--ids", "1,,2"], "--ids"),
    (["run", "{qa}", "--ids=--1"], "--ids"),
    (["run", "{qa}", "--ids", "\u00b2"], "--ids"),  # a digit to str.isdigit, not to int()
    (["run", "{qa}", "--ids", "99999999"], "99999999"),
    (["run", "{qa}", "--ids", "99999999999999999999999,3"], "99999999999999999999999"),
    (["run", "{qa}", "--ids", "9223372036854775808"], "9223372036854775808"),
    (["run", "{qa}", "--repeats", "0"], "--repeats"),
    (["run", "{qa}", "--sha256", "xyz"], "'xyz'"),
    (["run", "{qa}", "--sha256", "0" * 64], "0" * 64),
    (["run", "{missing}"], "missing.mbc"),
    (["info", "{missing}"], "missing.mbc"),
    (["run", "{text}"], "notes.mbc"),
    (["info", "{text}"], "notes.mbc"),
    (["run", "{truncated}"], "truncated.mbc"),
    (["info", "{truncated}"], "truncated.mbc"),
    (["fill-mask", "{qa}", "the [MASK] ."], "fill-mask"),
    (["fill-mask", "{qa}", "the [MASK] .", "--top-k", "0"], "--top-k"),
    (["token-classification", "{tagger}", "the cat", "--tokenizer", "{vocab}", "--stride", "-1"],
     "stride"),
    (["question-answering", "{qa_tok}", "--question", "where ?", "--context", ""], "context"),
    (["question-answering", "{qa}", "--tokenizer", "{bad_tokenizer}", "--question", "where ?",
      "--context", "the cat sat ."], "tokenizer.json"),
    (["add-tokenizer", "{qa_copy}", "{bad_tokenizer}"], "tokenizer.json"),
    (["add-tokenizer", "{qa_copy}", "{big_vocab}"], "vocab_size is 211"),
    (["add-tokenizer", "{qa_copy}", "{no_unk}"], "[UNK]"),
    (["run", "{qa}", "--remote", "localhost"], "'localhost'"),
    (["run", "{qa}", "--remote", "127.0.0.1:1"], "127.0.0.1:1"),
    (["emulator", "serve", "--port", "70000"], "--port"),
    (["tune", "{checkpoint}", "--trials", "0", "-o", "{work}"], "--trials"),
]


def _argv(args: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in args]


def _id(value):
    if isinstance(value, list):
        return " ".join(a for a in value if not a.startswith("{"))[:60]
    return None  # the fragment, as pytest writes it


@pytest.mark.parametrize("args, fragment", MISTAKES, ids=_id)
def test_a_plain_mistake_is_one_error_line_and_exit_status_2(files, capsys, args, fragment):
    code, err = run_main(_argv(args, files), capsys)
    assert code == 2, f"exit status {code}; stderr:\n{err}"
    assert_one_error_line(err, fragment)
    assert not files["out"].exists()
    assert files["qa_copy"].read_bytes() == files["qa"].read_bytes()


def _command() -> list[str]:
    script = Path(sys.executable).with_name("mbcompile")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mbcompile.cli"]


def _run_command(argv: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run the installed command; (exit status or None if it ran past ``timeout`` and was
    killed, its stderr, seconds taken)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        _command() + argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        started = _descendants(proc.pid)  # some start sessions of their own (tune's search)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate()
        code = None
    return code, err, time.monotonic() - start


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


SUBPROCESS_MISTAKES = [
    (["run", "{qa}", "--ids", "abc"], "--ids"),
    (["run", "{qa}", "--ids", ""], "--ids"),
    (["info", "{truncated}"], "truncated.mbc"),
    (["compile", "--config", "mobilebert-tiny", "--random-init", "--seq-len", "0", "-o", "{out}"],
     "seq_len"),
    (["fill-mask", "{qa}", "the [MASK] .", "--top-k", "0"], "--top-k"),
]


@pytest.mark.parametrize("args, fragment", SUBPROCESS_MISTAKES, ids=_id)
def test_the_installed_command_exits_2_with_one_error_line(files, args, fragment):
    code, err, _ = _run_command(_argv(args, files), timeout=120)
    assert code == 2, f"exit status {code}; stderr:\n{err}"
    assert_one_error_line(err, fragment)


def test_a_remote_where_nothing_listens_fails_fast(files):
    code, err, seconds = _run_command(_argv(["run", "{qa}", "--remote", "127.0.0.1:1"], files),
                                      timeout=60)
    assert code == 2, f"exit status {code}; stderr:\n{err}"
    assert_one_error_line(err, "127.0.0.1:1")
    assert seconds < 30, f"took {seconds:.0f} s to give up on a closed port"


def test_a_negative_time_budget_for_tune_is_refused_not_spent(files):
    """``--minutes -1`` (or 0) is no budget to tune within: refused at once, like --trials 0."""
    for minutes in ("-1", "0"):
        argv = _argv(["tune", "{checkpoint}", "--seq-len", "16", "--minutes", minutes,
                      "-o", "{work}"], files)
        code, err, seconds = _run_command(argv, timeout=30)
        assert code is not None, f"--minutes {minutes}: still tuning after {seconds:.0f} s"
        assert code == 2, f"--minutes {minutes}: exit status {code}; stderr:\n{err}"
        assert_one_error_line(err, "minutes")
