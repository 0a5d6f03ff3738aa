"""Counting executed instructions on the emulated device: the plugin's classes on a program whose
mix is known exactly, a compiled model's forward (outputs, kernels, modelled cycles), the
MetaSchedule runner that costs candidates by counts, and the cycle models themselves."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_model, tiny_config

from mbcompile.devices.emulator import cycle_models
from mbcompile.devices.emulator.counting import CLASSES, MARK_BASE
from mbcompile.errors import EmulatorError, OptionError, TargetError

ITERATIONS = 1000
# One loop iteration: 15 instructions; the comment names the classes each one counts in.
MIX = f"""
.arch armv8.2-a+dotprod
.global _start
_start:
    ldr x0, ={MARK_BASE + 1}
    mov x8, #57
    svc #0                          // close(MARK_BASE + 1): the window opens
    adr x1, buf
    mov x2, #{ITERATIONS}
loop:
    ldr q0, [x1]                    // load, load_simd
    ldp q1, q2, [x1]                // load, load_simd (a pair counts once)
    ld1 {{v3.4s}}, [x1]             // load, load_simd
    ldr x3, [x1]                    // load
    fmla v4.4s, v0.4s, v1.4s        // neon, neon_q, fmla (4 lanes)
    fmla v5.4s, v0.4s, v1.s[1]      // neon, neon_q, fmla (4 lanes, by element)
    fmla v6.2s, v0.2s, v1.2s        // neon, fmla (2 lanes)
    fmul v7.4s, v0.4s, v1.4s        // neon, neon_q
    sdot v8.4s, v0.16b, v1.16b      // neon, neon_q, dot
    fmadd s9, s0, s1, s9            // fp_scalar
    str q4, [x1, #32]               // store, store_simd
    stp x3, x3, [x1, #64]           // store
    add x3, x3, #1
    subs x2, x2, #1
    b.ne loop                       // branch
    ldr x0, ={MARK_BASE + 2}        // load (literal)
    mov x8, #57
    svc #0                          // branch (exception generation); the window closes
    mov x0, #0
    mov x8, #93
    svc #0                          // exit(0)
.data
.balign 16
buf: .space 128
"""
# Between the marks: the loop, the 2 instructions before it and the 3 ending with the second
# close (each block is counted when it is entered).
PER_ITERATION = {"total": 15, "load": 4, "load_simd": 3, "store": 2, "store_simd": 1,
                 "neon": 5, "neon_q": 4, "fmla": 3, "fmla_lanes": 10, "dot": 1, "fp_scalar": 1,
                 "branch": 1}
AROUND = {"total": 5, "load": 1, "branch": 1}


@pytest.fixture(scope="module")
def counting_device():
    from mbcompile.devices.emulator import counting, device

    missing = {**device.missing_tools(), **counting.missing_tools()}
    if missing:
        pytest.skip(f"no instruction counting: {sorted(missing)} missing (apt-get install "
                    f"{' '.join(sorted(set(missing.values())))})")
    return device.build(log=lambda _: None)


def test_the_plugin_counts_each_class_of_a_known_instruction_mix(counting_device, tmp_path):
    from mbcompile.devices.emulator.counting import run_counted

    compiler = shutil.which("aarch64-linux-gnu-g++") or shutil.which("aarch64-linux-gnu-gcc")
    if compiler is None:
        pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
    source = tmp_path / "mix.S"
    source.write_text(MIX)
    program = tmp_path / "mix"
    subprocess.run([compiler, "-nostdlib", "-static", "-o", str(program), str(source)], check=True)

    counts, _ = run_counted(counting_device, [str(program)])

    got = counts.between(1, 2)
    expected = {k: ITERATIONS * PER_ITERATION.get(k, 0) + AROUND.get(k, 0) for k in CLASSES}
    assert got == expected
    assert [label for label, _ in counts.marks] == [1, 2]
    # The window's blocks, one per translated block executed in it, add up to the same counts.
    assert sum(b["total"] * b["execs"] for b in counts.blocks) == expected["total"]


def test_a_failing_program_raises_an_emulator_error_naming_it(counting_device, tmp_path):
    from mbcompile.devices.emulator.counting import run_counted

    python = str(counting_device.root / "usr/bin/python3")
    with pytest.raises(EmulatorError, match="failed .exit 3"):
        run_counted(counting_device, [python, "-c", "import sys; sys.exit(3)"])
    counts, proc = run_counted(counting_device, [python, "-c", "import sys; sys.exit(3)"],
                               check=False)
    assert counts is None and proc.returncode == 3
    with pytest.raises(EmulatorError, match="never reached its mark 7"):
        run_counted(counting_device, [python, "-c", "pass"])[0].at(7)


def test_a_counted_forward_matches_pytorch_and_its_kernels_add_up(counting_device):
    import mbcompile
    from mbcompile.devices.emulator.counted_program import CountedProgram

    model = make_model("base", tiny_config())
    compiled = mbcompile.compile(model, target="aarch64", seq_len=16)
    ids = torch.randint(5, 99, (1, 16), generator=torch.Generator().manual_seed(0))
    program = CountedProgram(compiled, forwards=2, device=counting_device)

    out = compiled.with_program(program)(ids)

    with torch.no_grad():
        ref = model(ids).last_hidden_state.numpy()
    assert np.abs(out.last_hidden_state - ref).max() <= 1e-4
    count = program.last
    assert count.forwards == 2 and count.cpu == "cortex-a76"
    # Every block of the window is in one row: the rows add up to the forward.
    assert sum(k["total"] for k in count.kernels) == pytest.approx(count.classes["total"], rel=1e-9)
    names = [k["kernel"] for k in count.kernels]
    assert "(outside)" in names and any(n.startswith("fused_dense") for n in names)
    dense = next(k for k in count.kernels if k["kernel"].startswith("fused_dense"))
    assert dense["fmla"] > 0 and dense["bottleneck_a76"] in cycle_models.MODELS["a76"][1]
    # The in-order model is never faster than the out-of-order one, nor either than the ideal
    # of issuing every FMLA on every NEON pipe.
    assert count.cycles("a55") >= count.cycles("a76") >= count.classes["fmla"] / 2 > 0
    assert set(count.as_dict()) >= {"classes", "kernels", "cycles_a76", "cycles_a55"}


def test_counting_refuses_a_model_compiled_for_x86(tiny_qa):
    from mbcompile.devices.emulator.counted_program import CountedProgram

    with pytest.raises(TargetError, match="counting runs aarch64 code"):
        CountedProgram(tiny_qa[1])


def test_the_runner_costs_candidates_by_counts_and_reports_failures(counting_device, tmp_path):
    """Two builds of one kernel (the second does twice the work) and a broken library: the
    costs follow the work, and the broken one is a failure naming why, not a crash."""
    import tvm
    from tvm import te

    from mbcompile.devices.emulator.counting_runner import candidate_seconds, count_candidates
    from mbcompile.targets.export import fcompile_for
    from mbcompile.targets.registry import resolve_target

    def scale(n, stride=1):
        a = te.placeholder((n,), "float32", name="a")
        return te.create_prim_func([a, te.compute((n,), lambda i: a[i * stride] * 2.0, name="b")])

    spec = resolve_target("aarch64")
    paths = []
    # the third reads 2^40 bytes past its input: the emulated process dies of it
    for name, n, stride in (("small", 4096, 1), ("large", 8192, 1), ("wild", 4096, 1 << 36)):
        lib = tvm.compile(tvm.IRModule({"main": scale(n, stride)}), target=spec.tvm_target())
        path = tmp_path / f"{name}.so"
        lib.export_library(str(path), fcompile=fcompile_for(spec))
        paths.append(str(path))
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"not a library")
    shutil.copy(paths[0], tmp_path / "small-again.so")  # each candidate has a library of its own
    candidates = [{"path": p, "args": [["TENSOR", "float32", [n]], ["TENSOR", "float32", [n]]]}
                  for p, n in zip([paths[0], paths[1], str(broken), paths[2],
                                   str(tmp_path / "small-again.so")],
                                  (4096, 8192, 4096, 4096, 4096))]

    results = count_candidates(counting_device, candidates, cost="a76", cpu="cortex-a76",
                               timeout=300)

    (small, e1), (large, e2), (none, why), (crashed, died), (again, e5) = results
    assert e1 is None and e2 is None and e5 is None and none is None and crashed is None
    assert 1.8 < large / small < 2.2
    assert again == small  # counted in the process started again after the crash
    assert "the emulated device failed on it" in why
    assert "the emulated process died on it" in died
    assert candidate_seconds({k: 4.0e9 for k in CLASSES}, "instructions") == 2.0


def test_cycle_models_take_the_bound_resource():
    neon_bound = {"total": 100, "neon": 80, "load": 10, "store": 2}
    load_bound = {"total": 100, "neon": 10, "load": 60, "store": 20}
    assert cycle_models.cycles(neon_bound, "a76") == 40  # 80 NEON ops on 2 pipes
    assert cycle_models.bottleneck(neon_bound, "a76") == "neon"
    assert cycle_models.cycles(load_bound, "a76") == 40  # 80 loads+stores on 2 pipes
    assert cycle_models.cycles(neon_bound, "a55") == 80  # one NEON op a cycle
    assert cycle_models.cycles({"total": 100, "neon": 0, "load": 0, "store": 0}, "a55") == 50
    assert cycle_models.cycles(load_bound, "a55") == 80
    assert cycle_models.bottleneck(load_bound, "a55") == "load+store"
    with pytest.raises(OptionError, match="unknown core model 'a78'"):
        cycle_models.cycles(neon_bound, "a78")


def test_tune_with_an_emulator_cost_checks_its_options():
    from mbcompile.tuner import tune

    model = make_model("base", tiny_config())
    with pytest.raises(OptionError, match="unknown emulator cost 'a99'"):
        tune(model, work_dir="/nonexistent", target="aarch64", emulator_cost="a99")
    with pytest.raises(TargetError, match="counts aarch64 code"):
        tune(model, work_dir="/nonexistent", target="x86-64", emulator_cost="a76")
    with pytest.raises(OptionError, match="one way to measure candidates"):
        tune(model, work_dir="/nonexistent", target="aarch64", emulator_cost="a76",
             tracker="127.0.0.1:9190", key="emu")


def test_tune_on_the_emulator_records_counted_costs_that_compile_applies(counting_device, tmp_path):
    import mbcompile
    from mbcompile.tuner import tune

    model = make_model("base", tiny_config())
    lines = []
    summary = tune(model, work_dir=tmp_path / "db", target="aarch64", seq_len=16, trials=3,
                   max_tasks=1, emulator_cost="a55", log=lines.append)

    assert summary["emulator_cost"] == "a55" and summary["tuned"] == 1
    assert any("counted on the emulated device (a55)" in line for line in lines)
    costs = [r for r in _records(tmp_path / "db") if r is not None]
    assert costs and all(0 < c < 1e-2 for c in costs)  # modelled seconds of a tiny kernel
    compiled = mbcompile.compile(model, target="aarch64", seq_len=16, tuning_db=tmp_path / "db")
    assert compiled.metadata.tuned_kernels == 1


def _records(folder) -> list:
    """The mean run time of each record of a tuning database folder (None: a failed one)."""
    import json

    found = []
    for line in (Path(folder) / "database_tuning_record.json").read_text().splitlines():
        _, (_, secs, *_) = json.loads(line)
        found.append(float(np.mean(secs)) if secs else None)
    return found


def _count_kernel(counting_device, tmp_path, kernel, shapes) -> float:
    """Instructions ``kernel`` executes once on the emulated device (random inputs)."""
    import tvm

    from mbcompile.devices.emulator.counting_runner import count_candidates
    from mbcompile.targets.export import fcompile_for
    from mbcompile.targets.registry import resolve_target

    spec = resolve_target("aarch64")
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
                      target=spec.tvm_target())
    path = tmp_path / "kernel.so"
    lib.export_library(str(path), fcompile=fcompile_for(spec))
    args = [["TENSOR", "float32", list(shape)] for shape in shapes]
    [(seconds, why)] = count_candidates(counting_device, [{"path": str(path), "args": args}],
                                        cost="instructions", cpu="cortex-a76", timeout=300)
    assert why is None
    return seconds * cycle_models.GHZ * 1e9


ROWS_128 = ([128, 384], [4, 32, 128], [128, 256], [1, 1, 1, 128], [1, 128, 128])


def test_the_aarch64_attention_kernel_executes_under_two_instructions_per_ideal_fmla(
        counting_device, tmp_path):
    """FuseAttention's own kernel, which AArch64 builds keep where the NEON one does not fit:
    MobileBERT's attention at 128 tokens (4 heads of 32, one layer), counted, 1.86 executed
    instructions per FMLA the MACs need (MACs / 4 lanes); 2.54 with the x86 tiles."""
    from mbcompile.passes.attention_kernel import RowsLayout, attention_kernel

    kernel = attention_kernel(4, 128, 128, 32, 32, 4, (1, 1, 1, 128), lanes=4,
                              rows_layout=RowsLayout(384, 0, 256, 128), fma_by_lane=True)
    instructions = _count_kernel(counting_device, tmp_path, kernel, ROWS_128)
    ideal_fmla = 2 * 4 * 128 * 128 * 32 / 4  # scores and context, 4 heads, 4 lanes
    assert instructions < 2.0 * ideal_fmla, instructions / ideal_fmla


def test_the_neon_attention_kernel_executes_under_1_6_instructions_per_ideal_fmla(
        counting_device, tmp_path):
    """The same attention as NEON steps (``neon_attention``): counted 1.50 per FMLA."""
    from mbcompile.passes.attention_kernel import RowsLayout
    from mbcompile.targets.schedules.neon_attention import neon_attention_kernel

    kernel = neon_attention_kernel(4, 128, 128, 32, 32, 4, (1, 1, 1, 128),
                                   RowsLayout(384, 0, 256, 128))
    instructions = _count_kernel(counting_device, tmp_path, kernel, ROWS_128)
    ideal_fmla = 2 * 4 * 128 * 128 * 32 / 4
    assert instructions < 1.6 * ideal_fmla, instructions / ideal_fmla


def test_a_neon_step_dense_executes_under_1_15_instructions_per_fmla(counting_device, tmp_path):
    """128×512 · 512×128 + bias as NEON steps: 142 instructions per 128 FMLA in the loop."""
    from tvm import te

    from mbcompile.targets.registry import resolve_target
    from mbcompile.targets.schedules import DenseNeon
    from mbcompile.targets.schedules.pack_weights import dense_packed

    m, k, n = 128, 512, 128
    x = te.placeholder((m, k), name="x")
    wp = te.placeholder((n // 16, k, 16), name="wp")
    bias = te.placeholder((n,), name="bias")
    y = dense_packed(x, wp, n)
    out = te.compute((m, n), lambda i, j: y[i, j] + bias[j], name="bias_add")
    sch = DenseNeon().apply(te.create_prim_func([x, wp, bias, out]),
                            resolve_target("aarch64").tvm_target(), False)
    instructions = _count_kernel(counting_device, tmp_path, sch.mod["main"],
                                 ([m, k], [n // 16, k, 16], [n], [m, n]))
    fmla = m * k * n / 4
    assert instructions < 1.15 * fmla, instructions / fmla


def test_tuning_for_a_cpu_that_cannot_run_here_picks_the_emulator_or_says_how(monkeypatch):
    """Measured here, every aarch64 candidate would fail and the database would hold nothing
    useful: an aarch64 target defaults to counting on the emulated device, and any other
    target this CPU cannot run is refused, naming the tracker."""
    from mbcompile import tuner
    from mbcompile.options import CompileOptions
    from mbcompile.targets import registry

    lines = []
    assert tuner._default_measure(CompileOptions(target="aarch64"), lines.append) == "a76"
    assert "cannot run here (this machine is x86_64)" in lines[0] and "--emulator-cost" in lines[0]
    assert tuner._default_measure(CompileOptions(target="host"), lines.append) is None
    monkeypatch.setattr(registry, "host_features", lambda: set())
    with pytest.raises(TargetError, match="cannot tune for 'x86-64-avx512' here: this CPU lacks"):
        tuner._default_measure(CompileOptions(target="x86-64-avx512"), lines.append)


def test_the_cpuinfo_copy_of_the_device_is_made_once_when_callers_race(tmp_path):
    """Two runner workers counting their first candidates at once both get the copy."""
    from concurrent.futures import ThreadPoolExecutor

    from mbcompile.devices.emulator.counting import with_cpuinfo
    from mbcompile.devices.emulator.device import Emulator

    device = Emulator(tmp_path / "emulator", {"recipe_sha256": "test"})
    (device.root / "usr/bin").mkdir(parents=True)
    (device.root / "usr/bin/python3").write_text("not run here")
    with ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: with_cpuinfo(device, "cortex-a55"), range(8)))
    assert len(set(roots)) == 1
    root = roots[0]
    assert "CPU part\t: 0xd05" in (root / "proc/cpuinfo").read_text()
    assert (root / "usr/bin/python3").samefile(device.root / "usr/bin/python3")  # hard links
    assert not (device.root / "proc").exists()  # the device itself is left as built
    assert [p.name for p in root.parent.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(EmulatorError, match="no /proc/cpuinfo for the CPU 'cortex-x9'"):
        with_cpuinfo(device, "cortex-x9")


def test_cli_tune_emulator_cost_mistakes_exit_2_naming_them(tmp_path, capsys):
    from mbcompile.cli import main

    base = ["tune", "--config", "mobilebert-uncased", "-o", str(tmp_path / "db")]
    assert main([*base, "--target", "x86-64", "--emulator-cost", "a76"]) == 2
    assert "emulator_cost counts aarch64 code; the target 'x86-64'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([*base, "--target", "aarch64", "--emulator-cost", "a99"])
    assert exited.value.code == 2 and "invalid choice: 'a99'" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()
