"""Loading, running and closing models leaves nothing behind (issue 14, point 3).

The load/run/close loop and the long run of one model are measured in a fresh Python (so that
what other tests loaded does not move its memory), with its own temporary folder: resident
memory stays flat, and no file descriptor, mapping of a ``lib.so``, thread or ``mbcompile-*``
temporary file is left over. stderr is never redirected, not even while the first calls of
several models race in threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import make_model, tiny_config

import mbcompile
from mbcompile import artifact
from mbcompile.errors import ModelClosedError

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="reads /proc/self (Linux)"
)

MB = 1 << 20
GROWTH_LIMIT = 10 * MB

# What a process holds, read from /proc/self; shared by the scripts below.
PROBES = textwrap.dedent(
    """
    import gc, json, os, re, sys, tempfile
    import numpy as np
    import mbcompile

    IDS = np.arange(1, 11, dtype=np.int64)[None]

    def rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024

    def fds():
        return sorted(int(n) for n in os.listdir("/proc/self/fd"))

    def threads():
        return len(os.listdir("/proc/self/task"))

    def libraries():
        # each mapped lib.so by device and inode: a library has several segments
        found = set()
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and re.search(r"/lib\\.so( \\(deleted\\))?$", parts[5].strip()):
                    found.add((parts[3], parts[4]))
        return sorted(found)

    def temporaries():
        return sorted(n for n in os.listdir(tempfile.gettempdir()) if n.startswith("mbcompile-"))

    def state():
        gc.collect()
        return {"fds": fds(), "threads": threads(), "libraries": libraries(),
                "temporaries": temporaries()}
    """
)

CYCLES = PROBES + textwrap.dedent(
    """
    paths = sys.argv[1:]
    for p in paths:  # warm up: every library loaded once, TVM's thread pool started
        m = mbcompile.load(p)
        m(IDS)
        m.close()
    before = state()
    rss_at = {}
    for cycle in range(1, 201):
        m = mbcompile.load(paths[cycle % len(paths)])
        m(IDS)
        if cycle % 2:
            m.close()
        del m  # the others are dropped without close(), for garbage collection
        if cycle in (20, 200):
            gc.collect()
            rss_at[cycle] = rss()
    print(json.dumps({"before": before, "after": state(), "rss20": rss_at[20],
                      "rss200": rss_at[200]}))
    """
)

CALLS = PROBES + textwrap.dedent(
    """
    m = mbcompile.load(sys.argv[1])
    rss_at = {}
    for call in range(1, 5001):
        m(IDS)
        if call in (500, 5000):
            gc.collect()
            rss_at[call] = rss()
    print(json.dumps({"rss500": rss_at[500], "rss5000": rss_at[5000]}))
    """
)

# Three models loaded and first called in three threads at once, while the main thread writes
# to stderr; then fd 2 must still be the file it was, and later lines must reach the parent.
STDERR = PROBES + textwrap.dedent(
    """
    import threading, time

    def where():
        st = os.fstat(2)
        return [st.st_dev, st.st_ino, os.readlink("/proc/self/fd/2")]

    before = where()
    start = threading.Barrier(len(sys.argv[1:]) + 1)
    problems = []

    def first_call(path):
        start.wait()
        try:
            mbcompile.load(path)(IDS)
        except BaseException as err:
            problems.append(repr(err))

    pool = [threading.Thread(target=first_call, args=(p,)) for p in sys.argv[1:]]
    for t in pool:
        t.start()
    start.wait()
    for i in range(40):
        os.write(2, f"during-{i}\\n".encode())
        time.sleep(0.002)
    for t in pool:
        t.join()
    print(json.dumps({"before": before, "after": where(), "problems": problems}))
    sys.stdout.flush()
    print("after-print", file=sys.stderr, flush=True)
    os.write(2, b"after-write\\n")
    """
)


def _python(script: str, *args, tmp_path, timeout: float = 240) -> tuple[dict, str]:
    """Run ``script`` in a fresh Python with its own temporary folder; its last stdout line as
    JSON, and its stderr."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmpdir))
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.fixture(scope="module")
def artifacts(tiny_qa_artifact, tmp_path_factory):
    """Three artifact files, two libraries: the tiny QA model, the same model saved again with
    tokenizer files (another file, the same library), and another tiny QA model."""
    folder = tmp_path_factory.mktemp("resources")
    same_lib = folder / "same-lib.mbc"
    art = artifact.read(tiny_qa_artifact)
    artifact.write(same_lib, art.metadata, art.lib, tokenizer={"vocab.txt": b"[PAD]\n[UNK]\n"})
    other = mbcompile.compile(
        make_model("question-answering", tiny_config(), seed=7), seq_len=16, passes=()
    )
    other_path = other.save(folder / "other.mbc")
    return [tiny_qa_artifact, same_lib, other_path]


def test_200_load_run_close_cycles_keep_memory_flat_and_leave_nothing_behind(artifacts, tmp_path):
    got, _ = _python(CYCLES, *artifacts, tmp_path=tmp_path)
    before, after = got["before"], got["after"]
    growth = got["rss200"] - got["rss20"]
    assert growth < GROWTH_LIMIT, f"resident memory grew {growth / MB:.1f} MB from cycle 20 to 200"
    assert after["fds"] == before["fds"], "file descriptors left open"
    assert after["threads"] == before["threads"], "threads beyond TVM's pool"
    assert after["temporaries"] == [] == before["temporaries"], "mbcompile-* temporaries left"
    assert set(map(tuple, after["libraries"])) <= set(map(tuple, before["libraries"]))
    assert len(after["libraries"]) <= len(artifacts), (
        f"{len(after['libraries'])} lib.so mappings for {len(artifacts)} artifacts"
    )


def test_5000_calls_of_one_model_keep_memory_flat(tiny_qa_artifact, tmp_path):
    got, _ = _python(CALLS, tiny_qa_artifact, tmp_path=tmp_path)
    growth = got["rss5000"] - got["rss500"]
    assert growth < GROWTH_LIMIT, f"resident memory grew {growth / MB:.1f} MB over 4,500 calls"


def test_first_calls_racing_in_threads_leave_stderr_where_it_was(artifacts, tmp_path):
    got, stderr = _python(STDERR, *artifacts, tmp_path=tmp_path)
    assert got["problems"] == []
    assert got["after"] == got["before"], "fd 2 points somewhere else after the first calls"
    assert not got["after"][2].endswith("(deleted)")
    lines = stderr.splitlines()
    for line in [f"during-{i}" for i in range(40)] + ["after-print", "after-write"]:
        assert line in lines, f"{line!r} written to stderr never reached the parent"


def test_a_closed_model_raises_model_closed_error(tiny_qa_artifact):
    ids = np.arange(1, 6, dtype=np.int64)[None]
    model = mbcompile.load(tiny_qa_artifact)
    model(ids)
    model.close()
    model.close()  # closing twice is fine
    with pytest.raises(ModelClosedError, match="closed"):
        model(ids)
    assert issubclass(ModelClosedError, mbcompile.MbcompileError)


def test_closing_one_load_leaves_another_load_of_the_same_artifact_running(tiny_qa_artifact):
    ids = np.arange(1, 9, dtype=np.int64)[None]
    first, second = mbcompile.load(tiny_qa_artifact), mbcompile.load(tiny_qa_artifact)
    expected = first(ids)
    first.close()
    again = second(ids)
    for name in expected:
        assert np.array_equal(again[name], expected[name])


def test_with_block_closes_the_model_also_when_it_raises(tiny_qa_artifact):
    ids = np.arange(1, 6, dtype=np.int64)[None]
    with mbcompile.load(tiny_qa_artifact) as model:
        assert model(ids).start_logits.shape == (1, 5)
    with pytest.raises(ModelClosedError):
        model(ids)
    with pytest.raises(KeyError, match="inside"), mbcompile.load(tiny_qa_artifact) as failing:
        raise KeyError("inside")
    with pytest.raises(ModelClosedError):
        failing(ids)
