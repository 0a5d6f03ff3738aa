"""Saving: a save killed midway leaves the destination folder as it was, saved files honour
the umask, and where ``O_TMPFILE`` is missing a named temporary file does the same job."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import zipfile

import pytest

from mbcompile import artifact
from mbcompile.errors import ArtifactError


def _has_o_tmpfile(folder) -> bool:
    try:
        os.close(os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600))
    except (AttributeError, OSError):
        return False
    return True


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(params=["unnamed", "named"])
def save_mode(request, monkeypatch, tmp_path):
    """Save through O_TMPFILE, or through the named temporary file used where it is missing."""
    if request.param == "unnamed" and not _has_o_tmpfile(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no O_TMPFILE")
    if request.param == "named":
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    return request.param


_SLOW_SAVE = textwrap.dedent(
    """
    import os, sys, time, zipfile
    from mbcompile import artifact

    write = zipfile._ZipWriteFile.write

    def half_then_hang(self, data):  # write half of a large member, then wait to be killed
        if len(data) >= 2**20:
            write(self, data[: len(data) // 2])
            self._fileobj.flush()
            print("half written", flush=True)
            time.sleep(600)
        return write(self, data)

    zipfile._ZipWriteFile.write = half_then_hang
    metadata = artifact.read(sys.argv[1]).metadata
    artifact.write(sys.argv[2], metadata, os.urandom(8 * 2**20))
    """
)


def test_save_killed_midway_leaves_the_folder_as_it_was(small_artifact, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    if not _has_o_tmpfile(folder):
        pytest.skip(f"{folder}'s file system has no O_TMPFILE (a kill leaves the named temp)")
    dest = folder / "model.mbc"
    dest.write_bytes(small_artifact.read_bytes())  # the artifact being replaced
    (folder / "notes.txt").write_text("kept")
    before = _snapshot(folder)
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVE, str(small_artifact), str(dest)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "half written"
        # Midway, the new file exists only as an unnamed file in the destination folder.
        open_files = [
            os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")
        ]
        assert any(f.startswith(str(folder)) and f.endswith("(deleted)") for f in open_files)
        assert _snapshot(folder) == before
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert _snapshot(folder) == before
    assert artifact.read(dest).lib == artifact.read(small_artifact).lib


def test_failed_save_leaves_the_folder_as_it_was(small_artifact, tmp_path, monkeypatch, save_mode):
    folder = tmp_path / "models"
    folder.mkdir()
    dest = folder / "model.mbc"
    dest.write_bytes(small_artifact.read_bytes())
    before = _snapshot(folder)
    metadata = artifact.read(small_artifact).metadata
    write = zipfile.ZipFile.writestr

    def disk_full(self, name, data, *args, **kwargs):
        if name == artifact.LIB_MEMBER:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, name, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", disk_full)
    with pytest.raises(ArtifactError, match=r"model.mbc: cannot write the artifact \(No space left"):
        artifact.write(dest, metadata, b"new library")
    assert _snapshot(folder) == before


def test_save_refuses_what_it_would_destroy_or_cannot_name(small_artifact, tmp_path, save_mode):
    """A rename over a device (/dev/null as root), a pipe or a folder would replace it: refused,
    naming the path given (never the temporary file's), as is a path it cannot create."""
    metadata = artifact.read(small_artifact).metadata
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    cases = [
        (pipe, "pipe: is not a regular file"),
        (tmp_path / "folder", "folder: is a folder"),
        ("", "'': not a file name"),
        (str(tmp_path) + os.sep, "not a file name"),
        (tmp_path / "file" / "model.mbc", "file is a file, not a folder"),
        ("/proc/model.mbc", "/proc/model.mbc: cannot write the artifact"),
    ]
    for path, message in cases:
        with pytest.raises(ArtifactError, match=message) as caught:
            artifact.write(path, metadata, b"library")
        assert ".tmp" not in str(caught.value)
    assert (tmp_path / "pipe").is_fifo() and (tmp_path / "file").read_text() == "x"


def test_save_replaces_the_previous_artifact_and_leaves_nothing_else(
    small_artifact, tmp_path, save_mode
):
    folder = tmp_path / "models"
    metadata = artifact.read(small_artifact).metadata
    for lib in (b"first", b"second"):
        artifact.write(folder / "model.mbc", metadata, lib)
    assert [p.name for p in folder.iterdir()] == ["model.mbc"]
    assert artifact.read(folder / "model.mbc").lib == b"second"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_artifact_honours_the_umask(small_artifact, tmp_path, save_mode, umask, mode):
    metadata = artifact.read(small_artifact).metadata
    previous = os.umask(umask)
    try:
        path = artifact.write(tmp_path / "model.mbc", metadata, b"lib")
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == mode


def test_file_system_without_o_tmpfile_falls_back_to_a_named_file(
    small_artifact, tmp_path, monkeypatch
):
    real_open = os.open
    flags_seen = []

    def no_tmpfile(path, flags, mode=0o777, **kwargs):
        flags_seen.append(flags)
        if hasattr(os, "O_TMPFILE") and flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    metadata = artifact.read(small_artifact).metadata
    path = artifact.write(tmp_path / "models" / "model.mbc", metadata, b"lib")
    assert any(f & os.O_CREAT and f & os.O_EXCL for f in flags_seen)  # the named file
    assert [p.name for p in path.parent.iterdir()] == ["model.mbc"]
    assert artifact.read(path).lib == b"lib"
