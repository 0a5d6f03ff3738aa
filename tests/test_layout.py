"""The tree reads like the pipeline: every import goes down the stages or stays in its own, none
goes in a circle, and the public API shows its options.

Stages, in the order data flows (see the README's layout table):
core → capture → passes → targets → artifact → runtime → devices → drivers → pipelines → top.
Imports inside functions count too: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import mbcompile
from mbcompile.options import CompileOptions

ROOT = Path(__file__).resolve().parents[1]
# Source folders and the package each one is installed as.
SOURCES = {"mbcompile": "mbcompile", "passes": "mbcompile.passes", "targets": "mbcompile.targets"}

# Module (or package) prefix → stage rank; the longest matching prefix wins.
STAGES = {
    "mbcompile.errors": 0,
    "mbcompile.version": 0,
    "mbcompile.options": 0,
    "mbcompile.cpu": 0,
    "mbcompile.tvmscript": 0,
    "mbcompile.heads": 0,
    "mbcompile.hub": 0,
    "mbcompile.interrupts": 0,
    "mbcompile.signature": 0,
    "mbcompile.capture": 1,
    "mbcompile.passes": 2,
    "mbcompile.targets": 3,
    "mbcompile.artifact": 4,
    "mbcompile.runtime": 5,
    "mbcompile.devices": 6,
    "mbcompile.compiler": 7,
    "mbcompile.tuner": 7,
    "mbcompile.report": 7,
    "mbcompile.pipelines": 8,
    "mbcompile.transformers": 8,
    "mbcompile.cli": 9,
    "mbcompile.demo": 9,
    "mbcompile": 9,  # the package itself: the public API
}
# Run inside the emulated device with its own Python: imports nothing of ours.
STANDALONE = {"mbcompile.devices.emulator.server", "mbcompile.devices.emulator.counting_guest"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str) -> str | None:
    """The project module a dotted name refers to (a module, or an attribute of one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str) -> set[str]:
    """Project modules that module ``name`` imports, anywhere in its body."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != name:
                out.add(resolved)
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def _rank(name: str) -> int:
    best = max((p for p in STAGES if name == p or name.startswith(p + ".")), key=len)
    return STAGES[best]


def test_every_module_has_a_stage():
    assert all(_rank(name) is not None for name in MODULES)
    assert "mbcompile.passes.fold_no_norm" in MODULES and "mbcompile.targets.registry" in MODULES


def test_no_module_imports_a_later_stage():
    upward = [
        f"{name} (stage {_rank(name)}) imports {dep} (stage {_rank(dep)})"
        for name, deps in GRAPH.items()
        for dep in deps
        if _rank(dep) > _rank(name)
    ]
    assert upward == []


def test_no_imports_in_a_circle():
    """A package's ``__init__`` may import its own submodules (it re-exports them), but nothing
    may import a module that, directly or not, imports it back."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycles.append(" → ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_passes_and_targets_import_the_project_by_absolute_names():
    relative = []
    for name, path in MODULES.items():
        if not name.startswith(("mbcompile.passes", "mbcompile.targets")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                relative.append(f"{name}: from {'.' * node.level}{node.module or ''} import …")
    assert relative == []


def test_the_emulator_server_imports_nothing_of_ours():
    for name in STANDALONE:
        imported = set()
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add("." * node.level + (node.module or ""))
        assert not [m for m in imported if m.startswith(("mbcompile", "."))], name


def test_every_error_class_is_defined_in_errors():
    elsewhere = []
    for name, path in MODULES.items():
        if name == "mbcompile.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                elsewhere.append(f"{name}.{node.name}")
    assert elsewhere == []


def test_no_source_file_over_400_lines_without_a_reason_at_its_top():
    long = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        head = "\n".join(lines[:30]).lower()
        if len(lines) > 400 and "longer than" not in head:
            long.append(f"{name}: {len(lines)} lines")
    assert long == []


def test_importing_passes_by_its_folder_name_is_refused(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import importlib

    with pytest.raises(ImportError, match="import mbcompile.passes"):
        importlib.import_module("passes")


@pytest.mark.parametrize("function", [mbcompile.compile, mbcompile.tune])
def test_compile_and_tune_take_every_compile_option_by_name_type_and_default(function):
    """The options are one list (CompileOptions); compile and tune show them as typed keyword
    parameters (no **kwargs), and the CLI makes its flags from the same fields."""
    params = inspect.signature(function).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    for field in dataclasses.fields(CompileOptions):
        assert field.name in params, field.name
        param = params[field.name]
        assert param.kind is param.KEYWORD_ONLY
        assert param.default == field.default, field.name
        assert str(param.annotation) == str(field.type), field.name


def test_cli_compile_and_tune_have_a_flag_for_every_compile_option():
    from mbcompile.cli import parser

    sub = next(a for a in parser()._actions if a.dest == "command")
    for command in ("compile", "tune"):
        flags = {opt for a in sub.choices[command]._actions for opt in a.option_strings}
        for field in dataclasses.fields(CompileOptions):
            assert "--" + field.name.replace("_", "-") in flags, (command, field.name)


def test_importing_mbcompile_loads_neither_tvm_nor_torch():
    """``import mbcompile`` stays light: TVM (which imports torch when installed) loads on the
    first compile or call, torch and transformers only to compile."""
    import subprocess
    import sys

    code = "import sys, mbcompile; print(sorted(m for m in ('tvm', 'torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
