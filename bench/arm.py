"""python -m bench.arm: what one forward executes on the emulated aarch64 device, mbcompile
against ONNX Runtime (MLAS), counted instruction by instruction, with modelled cycles.

There is no ARM hardware here and wall time under qemu means nothing, so each backend's forward
runs under ``qemu-aarch64 -cpu cortex-a76`` with mbcompile's counting plugin
(``mbcompile/devices/emulator/counting.py``; ``../shared/tools/arm-proxy`` is the reference it
was checked against): one forward to warm up, then ``--forwards`` counted ones, one thread.

Model: MobileBERT of the google/mobilebert-uncased architecture with ``--layers`` layers (random
weights, seed 0), batch 1: ``MobileBertModel`` at each ``--seqs`` length, and the fill-mask
build of ``MobileBertForMaskedLM`` (``logits_for="masked"``, one [MASK]; ONNX Runtime runs the
whole MaskedLM, as a user of it would) at the first length; and int8 at the first length:
``aarch64-dotprod`` (``sdot``) against ONNX Runtime on the model ``quantize_dynamic`` makes
(int8 weights per output channel); and bf16 at the first length: ``aarch64-armv9`` (``bfdot``)
against ONNX Runtime with its bf16 fast-math option, both on ``qemu -cpu max,sme=off`` (the
Cortex-A76 has no BF16; with SME on, ONNX Runtime takes KleidiAI's SME kernels, which few
phones can run). MACs are every matmul's, counted
by PyTorch's FlopCounterMode on the same model, each backend on what it computes.

Cycles are MODELS (``cycle_models.py``): a Cortex-A76-class and a Cortex-A55-class core, each
basic block bound by its own resource; not measurements on hardware.

Writes bench/results/arm.{json,md,png}; ``--quick`` (one layer, 32 tokens) is what CI runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mbcompile
from mbcompile.capture import random_model
from mbcompile.capture.models import named_config
from mbcompile.devices.emulator import build
from mbcompile.devices.emulator.counted_program import CountedProgram
from mbcompile.devices.emulator.counting import (
    CLASSES,
    WINDOW_CLOSE,
    WINDOW_OPEN,
    build_plugin,
    kernels_of,
    run_counted,
)
from mbcompile.devices.emulator.cycle_models import MODELS

RESULTS = Path(__file__).resolve().parent / "results"
GUEST = Path(__file__).with_name("arm_guest.py")
CPU = "cortex-a76"
# Targets whose code the Cortex-A76 cannot run (SVE, bf16, i8mm) are counted on qemu's "max".
# qemu's "max" also has SME, which ONNX Runtime's KleidiAI kernels then use (a phone with SME2
# is rare): SME off, it runs MLAS's NEON and BF16 kernels, as on an Armv9 phone core.
BF16_CPU = "max,sme=off"
CPU_FOR = {"aarch64-armv9": BF16_CPU}


def ort_site() -> Path:
    """ONNX Runtime's aarch64 wheel (the host's version) unpacked beside the emulated device,
    for the device's Python; installed on first use (``python -m bench.arm --setup``)."""
    import onnxruntime

    version = onnxruntime.__version__
    device = build(log=lambda m: print(f"[arm] {m}", flush=True))
    site = device.directory.parent / "counting" / f"ort-site-{version}"
    if (site / "onnxruntime").is_dir():
        return site
    tmp = Path(tempfile.mkdtemp(prefix=".ort-site-", dir=site.parent))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-compile", "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64",
         "--python-version", "3.11", "--target", str(tmp), f"onnxruntime=={version}",
         "flatbuffers", "protobuf", "packaging", "coloredlogs", "humanfriendly"],
        check=True)
    tmp.rename(site)
    return site


def macs(module, *args) -> int:
    """Multiply-accumulates of every matmul of ``module(*args)`` (eager attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops() // 2


def _case(head: str, layers: int, seq: int) -> dict:
    """The model, its inputs, PyTorch's reference output and the MACs of each backend."""
    config = named_config("mobilebert-uncased", num_hidden_layers=layers)
    model = random_model(config, head, seed=0)  # transformers' default attention (SDPA)
    eager = random_model(copy.deepcopy(config), head, seed=0)  # the same weights, attention as plain matmuls
    eager.set_attn_implementation("eager")  # ... which PyTorch's FlopCounter counts
    assert model.config._attn_implementation != "eager"
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, model.config.vocab_size, size=(1, seq)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids)}
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    full = macs(lambda: eager(**tensors))
    with torch.no_grad():
        out = model(**tensors)[0]
    case = {"head": head, "layers": layers, "seq": seq, "model": model, "feeds": feeds,
            "macs": {"ort": full, "mbcompile": full}}
    if head == "masked-lm":  # one [MASK]: our build runs the vocabulary head on it alone
        position = seq // 3
        ids[0, position] = 103  # [MASK] of the uncased vocabulary: compile's default
        with torch.no_grad():
            out = model(**tensors)[0]
            hidden = model.mobilebert(**tensors)[0]
        encoder = macs(lambda: eager.mobilebert(**tensors))
        case["macs"]["mbcompile"] = encoder + macs(lambda: model.cls(hidden[:, position:position + 1]))
        case["macs"]["ort"] = encoder + macs(lambda: model.cls(hidden))
        case["position"] = position
        out = out[:, position]
    case["reference"] = out.numpy()
    return case


def _row(backend: str, case: dict, classes: dict, kernels: list[dict], diff: float,
         precision: str = "fp32") -> dict:
    m = case["macs"]["ort" if backend.startswith("onnxruntime") else "mbcompile"]
    row = {"backend": backend, "head": case["head"], "layers": case["layers"], "seq": case["seq"],
           "precision": precision,
           "macs": m, "max_abs_diff_vs_torch": diff, **{k: classes[k] for k in CLASSES},
           "instr_per_mac": classes["total"] / m, "fmla_lanes_per_mac": classes["fmla_lanes"] / m,
           "ldst_share": (classes["load"] + classes["store"]) / classes["total"],
           "neon_share": classes["neon"] / classes["total"]}
    for model in MODELS:
        row[f"cycles_{model}"] = sum(k[f"cycles_{model}"] for k in kernels)
        row[f"cycles_{model}_per_mac"] = row[f"cycles_{model}"] / m
    return row


def count_mbcompile(case: dict, target: str, forwards: int, log,
                    precision: str = "fp32") -> tuple[dict, list[dict]]:
    kwargs = {"target": target, "seq_len": case["seq"], "precision": precision}
    if case["head"] == "masked-lm":
        kwargs.update(logits_for="masked", max_masked=1)
    t0 = time.time()
    compiled = mbcompile.compile(case["model"], **kwargs)
    log(f"mbcompile {target}: compiled in {time.time() - t0:.0f} s; counting")
    program = CountedProgram(compiled, forwards=forwards, cpu=CPU_FOR.get(target, CPU))
    f = case["feeds"]
    out = compiled.with_program(program)(f["input_ids"], f["attention_mask"], f["token_type_ids"])
    got = out[0][:, 0] if case["head"] == "masked-lm" else out[0]
    diff = float(np.abs(got - case["reference"]).max())
    label = f"mbcompile {target}" + ("" if precision == "fp32" else f" {precision}") + \
        ("" if program.cpu == CPU else f" (qemu -cpu {program.cpu})")
    row = _row(label, case, program.last.classes, program.last.kernels, diff, precision)
    return row, program.last.kernels


def count_ort(case: dict, forwards: int, log, int8: bool = False, bf16: bool = False) -> dict:
    """ONNX Runtime's forward on the device; ``int8``: the model quantized as its users do
    (``quantize_dynamic``, int8 weights per output channel); ``bf16``: fp32 with MLAS's bf16
    fast math for its matmuls (``mlas.enable_gemm_fastmath_arm64_bfloat16``, Armv8.6 BFMMLA),
    on ``BF16_CPU``."""
    import onnxruntime

    from bench.peers import _onnx_export

    device = build(log=log)
    site = ort_site()
    with tempfile.TemporaryDirectory(prefix="mbcompile-arm-") as tmp:
        f = case["feeds"]
        _, onnx_path = _onnx_export(case["model"], (f["input_ids"], f["attention_mask"],
                                                    f["token_type_ids"]), tmp, dynamic=False)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = str(Path(tmp) / "model.int8.onnx")
            quantize_dynamic(onnx_path, quantized, weight_type=QuantType.QInt8, per_channel=True)
            onnx_path = quantized
        np.savez(Path(tmp) / "feeds.npz", **f)
        out = Path(tmp) / "out.npz"
        log("onnxruntime: counting")
        counts, _ = run_counted(
            device, [str(device.root / "usr/bin/python3"), str(GUEST), onnx_path,
                     str(Path(tmp) / "feeds.npz"), str(forwards), str(out)],
            cpu=BF16_CPU if bf16 else CPU,
            env={"PYTHONPATH": str(site), "ARM_GUEST_ORT_CONFIG":
                 "mlas.enable_gemm_fastmath_arm64_bfloat16=1" if bf16 else ""})
        with np.load(out) as data:
            got = data["arr_0"]
    if case["head"] == "masked-lm":
        got = got[:, case["position"]]
    window = counts.between(WINDOW_OPEN, WINDOW_CLOSE)
    classes = {k: window[k] / forwards for k in CLASSES}
    blocks = kernels_of(counts, None, per=forwards)
    precision = "int8" if int8 else "bf16" if bf16 else "fp32"
    label = f"onnxruntime {onnxruntime.__version__}" + \
        {"int8": " int8", "bf16": f" bf16 fast math (qemu -cpu {BF16_CPU})", "fp32": ""}[precision] + \
        " (MLAS)"
    return _row(label, case, classes, blocks, float(np.abs(got - case["reference"]).max()),
                precision)


def _tables(doc: dict) -> str:
    out = ["# Executed instructions of one forward on the emulated aarch64 device", "",
           f"qemu-aarch64 -cpu {doc['cpu']}, 1 thread, batch 1, {doc['forwards']} counted forwards "
           f"after one warm-up; google/mobilebert-uncased architecture, {doc['layers']} layer(s), "
           f"random weights. Cycles are models ({', '.join(f'{k}: {v[0]}' for k, v in MODELS.items())}), "
           f"not measurements on hardware. Host: {doc['host']}; {doc['date']}.", "",
           "| model | seq | backend | instr/forward | instr/MAC | FMLA lanes/MAC | loads+stores | NEON | "
           "A76 model cycles/MAC | A55 model cycles/MAC | ours / ORT instr | max abs diff vs torch |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        ort = next((o for o in doc["rows"] if o["backend"].startswith("onnxruntime")
                    and o["head"] == r["head"] and o["seq"] == r["seq"]
                    and o.get("precision") == r.get("precision")), None)
        ratio = f"{r['total'] / ort['total']:.2f}×" if ort and ort is not r else ""
        model = "MobileBertModel" if r["head"] == "base" else "MaskedLM fill-mask (ORT: full MaskedLM)"
        out.append(
            f"| {model} | {r['seq']} | {r['backend']} | {r['total'] / 1e6:.1f}M | {r['instr_per_mac']:.3f} | "
            f"{r['fmla_lanes_per_mac']:.3f} | {100 * r['ldst_share']:.1f}% | {100 * r['neon_share']:.1f}% | "
            f"{r['cycles_a76_per_mac']:.3f} | {r['cycles_a55_per_mac']:.3f} | {ratio} | "
            f"{r['max_abs_diff_vs_torch']:.1e} |")
    for key, kernels in doc["kernels"].items():
        total = sum(k["total"] for k in kernels)
        out += ["", f"## mbcompile kernels: {key}", "",
                "| kernel | share of instr | instr | loads/FMLA | A76 model cycles (bound) | "
                "A55 model cycles (bound) |", "|---|---|---|---|---|---|"]
        for k in kernels[:12]:
            out.append(
                f"| `{k['kernel'][:60]}` | {100 * k['total'] / total:.1f}% | {k['total'] / 1e6:.2f}M | "
                f"{k['load'] / k['fmla']:.2f} | {k['cycles_a76'] / 1e6:.2f}M ({k['bottleneck_a76']}) | "
                f"{k['cycles_a55'] / 1e6:.2f}M ({k['bottleneck_a55']}) |" if k["fmla"] else
                f"| `{k['kernel'][:60]}` | {100 * k['total'] / total:.1f}% | {k['total'] / 1e6:.2f}M | — | "
                f"{k['cycles_a76'] / 1e6:.2f}M ({k['bottleneck_a76']}) | "
                f"{k['cycles_a55'] / 1e6:.2f}M ({k['bottleneck_a55']}) |")
    return "\n".join(out) + "\n"


def _chart(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"][::-1]  # first row on top
    def model(r):
        if r["head"] == "base":
            return f"{r['seq']} tokens"
        return f"{'fill-mask' if r['backend'].startswith('mbcompile') else 'MaskedLM'} {r['seq']}"

    labels = [f"{model(r)} · {r['backend'].replace(' (MLAS)', '')}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.42 * len(rows) + 1.6), sharey=True)
    for ax, key, title in zip(axes, ("instr_per_mac", "cycles_a76_per_mac", "cycles_a55_per_mac"),
                              ("executed instructions per MAC", "A76 model: cycles per MAC",
                               "A55 model: cycles per MAC")):
        colors = ["tab:blue" if r["backend"].startswith("mbcompile") else "tab:orange" for r in rows]
        ax.barh(range(len(rows)), [r[key] for r in rows], color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"one forward on the emulated aarch64 device (qemu -cpu {doc['cpu']} unless "
                 f"named), 1 thread, {doc['layers']} layer(s); blue mbcompile, orange ONNX "
                 "Runtime; cycles are models, not measurements", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(layers: int, seqs: list[int], targets: list[str], fill_mask: bool, forwards: int,
        log=print, int8: bool = False, bf16: bool = False) -> dict:
    build(log=log)
    build_plugin()
    cases = [_case("base", layers, s) for s in seqs]
    if fill_mask:
        cases.append(_case("masked-lm", layers, seqs[0]))
    rows, kernels = [], {}
    for case in cases:
        for target in targets:
            row, ks = count_mbcompile(case, target, forwards, log)
            rows.append(row)
            kernels[f"{case['head']} seq {case['seq']} {target}"] = ks
        rows.append(count_ort(case, forwards, log))
        if int8 and case is cases[0]:  # int8 (ARMv8.2 dot product) against ORT's int8
            row, ks = count_mbcompile(case, "aarch64-dotprod", forwards, log, precision="int8")
            rows.append(row)
            kernels[f"{case['head']} seq {case['seq']} aarch64-dotprod int8"] = ks
            rows.append(count_ort(case, forwards, log, int8=True))
        if bf16 and case is cases[0]:  # bf16 (Armv8.6 BFDOT) against ORT's bf16 fast math
            row, ks = count_mbcompile(case, "aarch64-armv9", forwards, log, precision="bf16")
            rows.append(row)
            kernels[f"{case['head']} seq {case['seq']} aarch64-armv9 bf16"] = ks
            rows.append(count_ort(case, forwards, log, bf16=True))
        extra = 2 * ((int8 and case is cases[0]) + (bf16 and case is cases[0]))
        for r in rows[-len(targets) - 1 - extra:]:
            log(f"{r['head']} {r['seq']} {r['backend']}: {r['total'] / 1e6:.2f}M instr, "
                f"{r['instr_per_mac']:.3f}/MAC, diff {r['max_abs_diff_vs_torch']:.1e}")
    return {"cpu": CPU, "layers": layers, "forwards": forwards, "rows": rows,
            "kernels": kernels, "host": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"), "mbcompile": mbcompile.__version__}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.arm", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seqs", default="128,384", help="comma-separated lengths")
    p.add_argument("--targets", default="aarch64", help="comma-separated aarch64 targets")
    p.add_argument("--no-fill-mask", action="store_true")
    p.add_argument("--forwards", type=int, default=2, help="counted forwards per backend")
    p.add_argument("--no-int8", action="store_true",
                   help="skip int8 (aarch64-dotprod against ONNX Runtime's quantize_dynamic)")
    p.add_argument("--no-bf16", action="store_true",
                   help="skip bf16 (aarch64-armv9 against ONNX Runtime's bf16 fast math)")
    p.add_argument("--quick", action="store_true", help="CI's size: 1 layer, 32 tokens, no fill-mask")
    p.add_argument("--setup", action="store_true",
                   help="only build the emulated device, the plugin and ONNX Runtime's aarch64 site")
    p.add_argument("--out", default=str(RESULTS / "arm"), help="results path without suffix")
    args = p.parse_args(argv)
    log = lambda m: print(f"[arm] {m}", flush=True)  # noqa: E731
    if args.setup:
        build(log=log)
        build_plugin()
        log(f"onnxruntime aarch64 site: {ort_site()}")
        return
    if args.quick:
        args.layers, args.seqs = 1, "32"
        args.no_fill_mask = args.no_int8 = args.no_bf16 = True
    doc = run(args.layers, [int(s) for s in args.seqs.split(",")], args.targets.split(","),
              not args.no_fill_mask, args.forwards, log, int8=not args.no_int8,
              bf16=not args.no_bf16)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(_tables(doc))
    _chart(doc, out.with_suffix(".png"))
    print(_tables(doc))


if __name__ == "__main__":
    main()
