"""The build on every CPU (``targets/codegen.py``, ``targets/parallel.py``): the kernels
generated in parts on threads, constants folded function by function, a kernel made once per
shape; the same library and the same numbers as one part on one thread."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import tvm
from helpers import make_model, random_inputs, tiny_config
from tvm import relax, tirx

from mbcompile.compiler import prepare
from mbcompile.options import CompileOptions
from mbcompile.targets import codegen, parallel
from mbcompile.targets.export import export_library
from mbcompile.targets.pipeline import build_pipeline, layout_passes, legalize_passes
from mbcompile.targets.registry import host_target

HOST = host_target()
LENGTHS = (8, 16, 32)


@pytest.fixture(scope="module")
def prepared():
    model = make_model("base", tiny_config(max_position_embeddings=32))
    return model, prepare(model, CompileOptions(max_seq_len=32, target="host"))


def _kernels(executable) -> list:
    return executable.mod._collect_dso_modules()


def _run(path, function: str, seq: int, model):
    ids, mask, types = random_inputs(model.config, (1, seq), pad=3)
    lengths = torch.full((1,), seq)  # every position real (the mask pads, as HF does)
    lib = tvm.runtime.load_module(str(path))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    args = [tvm.runtime.tensor(t.numpy()) for t in (ids, mask, types, lengths)]
    out = vm[function](*args)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    return out[0].numpy(), ref.last_hidden_state.numpy()


def test_split_deals_kernels_round_robin_in_name_order():
    gvs = [(tvm.ir.GlobalVar(name), None) for name in ("d", "a", "c", "b", "e")]
    parts = codegen.split(gvs, 2)
    assert [[g.name_hint for g in p] for p in parts] == [["a", "c", "e"], ["b", "d"]]
    assert [[g.name_hint for g in p] for p in codegen.split(gvs[:1], 4)] == [["d"]]
    assert codegen.split([], 3) == []


def test_default_jobs_is_the_usable_cpus_up_to_the_limit():
    jobs = parallel.default_jobs()
    assert 1 <= jobs <= parallel.MOST_JOBS
    assert jobs == min(len(os.sched_getaffinity(0)), parallel.MOST_JOBS)


@pytest.fixture(scope="module")
def in_two_parts(prepared):
    _, prep = prepared
    target = prep.tvm_target
    return codegen.build_executable(prep.mod, target, build_pipeline(target), jobs=2)


def test_kernels_in_two_parts_link_into_one_library_that_matches_pytorch(
    prepared, in_two_parts, tmp_path
):
    model, _ = prepared
    path = tmp_path / "lib.so"
    export_library(in_two_parts, HOST, str(path))
    for n in LENGTHS:
        function = "main" if n == max(LENGTHS) else f"seq_{n}"
        got, want = _run(path, function, n, model)
        assert np.abs(got - want).max() <= 1e-4, n


def test_each_kernel_is_in_exactly_one_part(prepared, in_two_parts):
    _, prep = prepared
    target = prep.tvm_target
    with target:
        lowered = build_pipeline(target)(prep.mod)
    names = [gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)]
    parts = _kernels(in_two_parts)
    assert {m.kind for m in parts} == {"llvm"} and len(parts) == 2
    held = [sum(m.implements_function(n) for m in parts) for n in names]
    assert len(names) > 10 and held == [1] * len(names)
    assert all(any(m.implements_function(n) for n in names) for m in parts)  # none is empty


def test_folding_constants_function_by_function_gives_the_same_functions(prepared):
    _, prep = prepared
    target = prep.tvm_target
    with target:
        mod = prep.mod
        for p in legalize_passes(target):
            if "FoldConstant" in p.info.name:
                break
            mod = p(mod)
        whole = relax.transform.FoldConstant()(mod)
        threaded = parallel.per_function(relax.transform.FoldConstant(), jobs=2)(mod)
    graphs = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
    assert len(graphs) == len(LENGTHS)
    for name in graphs:
        tvm.ir.assert_structural_equal(threaded[name], whole[name])
        with pytest.raises(ValueError):  # folding changed something: the test compares work
            tvm.ir.assert_structural_equal(mod[name], whole[name])
    assert {gv.name_hint for gv, _ in threaded.functions_items()} == {
        gv.name_hint for gv, _ in mod.functions_items()}


def test_a_matmul_kernel_is_made_once_per_shape(prepared, monkeypatch):
    _, prep = prepared
    target = prep.tvm_target
    from mbcompile.targets.schedules import PackDenseWeights

    made = []
    original = relax.BlockBuilder.call_te

    def counting(self, func, *args, **kwargs):
        made.append(kwargs.get("primfunc_name_hint"))
        return original(self, func, *args, **kwargs)

    monkeypatch.setattr(relax.BlockBuilder, "call_te", counting)
    packer = PackDenseWeights(target, "fp32")
    with target:
        out = packer(prep.mod)
    def kernels(mod):
        return {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}

    assert packer.last_count > len(made) > 0  # fewer kernels made than matmuls packed
    assert len(made) == len(kernels(out) - kernels(prep.mod))  # each one made is distinct


def test_legalizing_each_kernel_once_gives_the_same_module(prepared):
    from mbcompile.targets.legalize_once import legalize_ops

    _, prep = prepared
    target = prep.tvm_target
    with target:
        mod = tvm.transform.Sequential(layout_passes(target))(prep.mod)
        theirs = relax.transform.LegalizeOps()(mod)
        ours = legalize_ops()(mod)
    names = {g.name_hint for g, _ in theirs.functions_items()}
    assert names == {g.name_hint for g, _ in ours.functions_items()}
    for name in names:
        if isinstance(theirs[name], tirx.PrimFunc):
            tvm.ir.assert_structural_equal(ours[name], theirs[name])
        else:  # other module, other GlobalVar objects: the printed forms agree
            assert ours[name].script() == theirs[name].script()
    calls = [0]
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: calls.__setitem__(0, calls[0] + isinstance(e, relax.Call)))
    kernels = sum(isinstance(f, tirx.PrimFunc) for _, f in ours.functions_items())
    assert calls[0] > 2 * kernels  # far more calls than kernels: the reuse is exercised
