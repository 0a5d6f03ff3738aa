"""The emulated aarch64 device itself: where it is cached, its recipe as the cache key, the tools
it needs, the server program that runs inside it, and stopping its server.

Running artifacts on it is tested in tests/devices/test_remote.py and
tests/targets/test_aarch64.py; none of the tests here needs the device to be built.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from mbcompile import ToolchainError
from mbcompile.devices import emulator
from mbcompile.devices.emulator.launch import SERVER_PROGRAM

# -- cache and tools ---------------------------------------------------------------------------


def test_emulator_cache_is_keyed_by_its_recipe(monkeypatch, tmp_path):
    (tmp_path / "root").mkdir()
    stamp = {"recipe_sha256": emulator.recipe_hash()}
    (tmp_path / "stamp.json").write_text(json.dumps(stamp))
    assert emulator.cached(tmp_path) is not None
    monkeypatch.setitem(emulator.RECIPE, "wheels", [*emulator.RECIPE["wheels"], "extra==1"])
    assert emulator.cached(tmp_path) is None  # a changed recipe means a rebuild


def test_emulator_build_names_missing_tools_and_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolchainError, match="apt-get install mmdebstrap qemu-user-static"):
        emulator.build(tmp_path / "emulator")


def test_cache_is_under_mbcompile_cache_dir_then_xdg_cache_home_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MBCOMPILE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert emulator.cache_dir() == tmp_path / "home" / ".cache" / "mbcompile" / "emulator"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as XDG says
    assert emulator.cache_dir() == tmp_path / "home" / ".cache" / "mbcompile" / "emulator"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert emulator.cache_dir() == tmp_path / "xdg" / "mbcompile" / "emulator"
    monkeypatch.setenv("MBCOMPILE_CACHE_DIR", str(tmp_path / "ours"))
    assert emulator.cache_dir() == tmp_path / "ours" / "emulator"


def test_cache_is_not_inside_the_source_tree(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MBCOMPILE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    package = Path(emulator.__file__).resolve().parents[3]  # the checkout or site-packages
    assert not emulator.cache_dir().resolve().is_relative_to(package)


# -- the server program ------------------------------------------------------------------------


def test_server_program_imports_only_what_the_device_has():
    """It runs with the device's Python and TVM runtime: nothing from mbcompile, no third party
    package but tvm."""
    tree = ast.parse(SERVER_PROGRAM.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "mbcompile" not in imported
    assert imported - {"__future__", "tvm"} <= {
        "argparse", "logging", "os", "platform", "socket", "time"
    }


# -- the server --------------------------------------------------------------------------------


def test_stopping_a_server_without_a_log_file_removes_nothing():
    """Regression: the interrupt path of `mbcompile emulator serve` once unlinked os.devnull."""
    process = subprocess.Popen(["true"], start_new_session=True)
    process.wait()
    emulator.Server(process, 0, "in-process", None).stop()
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
