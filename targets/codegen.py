"""Code generation on every CPU: the kernels in parts, each part an LLVM module of its own.

TVM's ``relax.build`` lowers every kernel of a module into one LLVM module and generates its
code on one thread, and ``export_library`` writes that module's machine code on one thread too:
with eight lengths, about 13 of a default compile's 110 s (5.4 to lower and optimise, 7.7 to
write, measured on the 2-core Xeon of the README). LLVM holds no Python lock, so::

    relax.build(mod)                         build_executable(mod, jobs=2)
      one LLVM module ← 161 kernels            part 0 ← kernels 0, 2, 4, …  ┐ a thread each
      VMLink(…, lib)                           part 1 ← kernels 1, 3, 5, …  ┘
                                               VMLink(…, part 0 importing part 1)
    export_library(path)                     write_library(executable, path)
      lib0.o, devc.o: one after the other      lib0.o, lib1.o: a thread each; devc.o
      cc -shared → lib.so                      cc -shared → lib.so

In the shared library the parts are one symbol table, so the loaded library is laid out as
TVM's; only the order of the object files differs. Each part is built with ``tir_pipeline``'s
``"mbcompile"`` pipeline: TVM's default lowering, then bf16 rounding in one instruction and a
parallel body's small scratch buffers on the stack, where TVM's would keep the integer-step
rounding and call its workspace allocator in every iteration.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import tvm
from tvm import relax, tirx

from mbcompile.targets import tir_pipeline
from mbcompile.targets.parallel import default_jobs, worker_context


def split(funcs: list[tuple[tvm.ir.GlobalVar, tirx.PrimFunc]], jobs: int) -> list[dict]:
    """``funcs`` in ``jobs`` parts (fewer when there are fewer kernels), dealt round-robin in
    name order: the kernels of one kind at different lengths land in different parts."""
    ordered = sorted(funcs, key=lambda item: item[0].name_hint)
    count = max(1, min(jobs, len(ordered)))
    return [dict(ordered[i::count]) for i in range(count) if ordered[i::count]]


def build_executable(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    relax_pipeline: tvm.transform.Pass,
    jobs: int | None = None,
) -> relax.VMExecutable:
    """``tvm.compile(mod, target, relax_pipeline=...)``, with the kernels generated in ``jobs``
    parts on as many threads (default :func:`default_jobs`)."""
    jobs = default_jobs() if jobs is None else jobs
    with target:
        mod = relax_pipeline(mod)
    attrs = dict(mod.attrs) if mod.attrs else {}
    builder = relax.ExecBuilder()
    leftover = relax.vm_build._vmcodegen(builder, mod, "bytecode")
    kernels = [(gv, f) for gv, f in leftover.functions.items() if isinstance(f, tirx.PrimFunc)]
    lib = None
    if kernels:
        context = worker_context()

        def generate(part: dict) -> tvm.runtime.Module:
            with context:
                return tvm.tirx.build(tvm.IRModule(part, attrs=leftover.attrs), target=target,
                                      pipeline=tir_pipeline.PIPELINE)

        parts = split(kernels, jobs)
        with ThreadPoolExecutor(len(parts)) as pool:
            libs = list(pool.map(generate, parts))
        lib = libs[0]
        for other in libs[1:]:
            lib.import_module(other)
    linked = relax.vm_build._ffi_api.VMLink(
        builder, target, lib, list(attrs.get("external_mods", [])),
        dict(attrs.get("const_name_to_constant", {})),
    )
    return relax.VMExecutable(linked)


def write_library(executable, path: str, fcompile: Callable | None = None) -> None:
    """``executable.export_library(path, fcompile=fcompile)``, each compiled part's object file
    written on a thread of its own. ``fcompile``: TVM's linker functions (``tvm.support.cc``);
    None links with the host's compiler."""
    from tvm.runtime import _ffi_api
    from tvm.support import cc

    root = executable.mod
    parts = root._collect_dso_modules()
    if not parts:  # nothing compiled: TVM's own path handles it
        root.export_library(path, fcompile=fcompile)
        return
    with tempfile.TemporaryDirectory(prefix="mbcompile-objects-") as work:
        objects = [os.path.join(work, f"lib{i}.o") for i in range(len(parts))]
        with ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(lambda pair: pair[0].write_to_file(pair[1]), zip(parts, objects)))
        files = list(objects)
        if root.imports:  # the VM's code and constants, as export_library packs them
            llvm_target = parts[0].get_function("_get_target_string")()
            packed = _ffi_api.ModulePackImportsToLLVM(root, False, llvm_target, "")
            files.append(os.path.join(work, "devc.o"))
            packed.write_to_file(files[-1])
        (fcompile or cc.create_shared)(path, files)
