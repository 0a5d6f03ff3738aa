"""python -m bench: mbcompile against PyTorch eager, torch.compile and ONNX Runtime, side by side.

Each (model, seq, threads) cell runs in its own process (thread counts fixed before any runtime
starts); inside it every backend is timed once per round, in a shuffled order, for ``--rounds``
rounds: medians, min–max, ratios against ONNX Runtime fp32 measured in the same process, effective
GFLOP/s against torch.mm's measured roof, max abs difference against PyTorch eager.
Before each timed call it pauses ``--settle`` seconds (0.3 by default): a thread pool keeps
spinning for a while after its run (PyTorch's OpenMP, ONNX Runtime's, TVM's) and, on a 2-core
machine, would take a core from the next backend in the round.
Writes bench/results/latest.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# --backends names -> the peers' names in the table
PEERS = {"eager": "PyTorch eager", "torch.compile": "torch.compile", "ort": "ONNX Runtime fp32",
         "ort-int8": "ONNX Runtime int8 (reference)", "ov": "OpenVINO fp32",
         "ov-default": "OpenVINO default"}
# Reduced precision against its peers: (ours, peer) name prefixes, ratio = peer ms / ours ms.
PRECISION_PAIRS = [("mbcompile bf16", "OpenVINO default"), ("mbcompile int8", "OpenVINO default"),
                   ("mbcompile int8", "ONNX Runtime int8"), ("mbcompile", "OpenVINO fp32"),
                   ("mbcompile fill-mask-bf16", "OpenVINO default"),
                   ("mbcompile fill-mask-int8", "OpenVINO default"),
                   ("mbcompile fill-mask-int8", "ONNX Runtime int8")]


def _worker(cmd: list[str], threads: int) -> dict:
    """Run a bench worker process with every runtime's thread count set; echo its log lines and
    return the JSON document of its last line."""
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent,
                          stdout=subprocess.PIPE, text=True, check=True)
    lines = proc.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(line, flush=True)
    return json.loads(lines[-1])


def _run_cell(head: str, seq: int, threads: int, args) -> dict:
    cmd = [sys.executable, "-m", "bench.worker", "--head", head, "--seq", str(seq),
           "--threads", str(threads), "--rounds", str(args.rounds), "--backends", args.backends,
           "--variants", args.variants if head == "base" else args.mlm_variants,
           "--settle", str(args.settle)]
    return _worker(cmd, threads)


def _run_lengths(head: str, threads: int, args) -> dict:
    cmd = [sys.executable, "-m", "bench.lengths", "--head", head, "--threads", str(threads),
           "--lengths", args.lengths, "--rounds", str(args.rounds), "--settle", str(args.settle)]
    return _worker(cmd, threads)


def _lengths_table(cells: list[dict]) -> str:
    """Latency against length: the one artifact, the exact-length build and ORT dynamic."""
    out = ["| model | threads | length | one artifact ms | exact build ms | one/exact | ORT fp32 dynamic ms | "
           "ORT/one | max abs diff vs torch (one artifact) |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        by = {}
        for r in cell["rows"]:
            by.setdefault((r["threads"], r["length"]), {})[r["backend"]] = r
        for (threads, length), rs in sorted(by.items()):
            one, exact, ort = (rs[n] for n in sorted(rs, key=_lengths_order))
            model = "MobileBertModel" if one["head"] == "base" else "MaskedLM fill-mask (ORT: full MaskedLM)"
            out.append(f"| {model} | {threads} | {length} | {one['median_ms']:.1f} | {exact['median_ms']:.1f} | "
                       f"{one['median_ms'] / exact['median_ms']:.2f} | {ort['median_ms']:.1f} | "
                       f"{ort['median_ms'] / one['median_ms']:.2f}× | {one['max_abs_diff_vs_torch']:.1e} |")
    out += ["", "| model | threads | backend | batch 1 × 32: ms per text | batch 8 × 32: ms per text |",
            "|---|---|---|---|---|"]
    for cell in cells:
        by = {}
        for r in cell["batch_rows"]:
            by.setdefault((r["threads"], r["backend"]), {})[r["batch"]] = r
        for (threads, backend), rs in sorted(by.items()):
            model = "MobileBertModel" if rs[1]["head"] == "base" else "MaskedLM fill-mask"
            out.append(f"| {model} | {threads} | {backend} | {rs[1]['per_text_ms']:.2f} | {rs[8]['per_text_ms']:.2f} |")
    sizes = [(c["rows"][0]["head"], c["library_bytes"]) for c in cells]
    out += [""] + [f"Library size, {head}: one artifact {b['variable'] / 1e6:.1f} MB; exact builds "
                   + ", ".join(f"{n}: {v / 1e6:.1f}" for n, v in sorted(b['exact'].items(), key=lambda kv: int(kv[0])))
                   + " MB." for head, b in dict(sizes).items()]
    return "\n".join(out)


def _lengths_order(name: str) -> int:
    return 0 if "one artifact" in name else 1 if "exactly" in name else 2


def _lengths_chart(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        backends = sorted({r["backend"] for r in cell["rows"]}, key=_lengths_order)
        for name in backends:
            rs = sorted((r for r in cell["rows"] if r["backend"] == name), key=lambda r: r["length"])
            ax.plot([r["length"] for r in rs], [r["median_ms"] for r in rs], marker="o", label=name)
        r0 = cell["rows"][0]
        ax.set_title(f"{'encoder' if r0['head'] == 'base' else 'fill-mask'}, {r0['threads']} thr")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel("ms (median)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _table(cells: list[dict]) -> str:
    out = ["| model | seq | threads | backend | median ms | min–max ms | vs ORT fp32 | GFLOP/s (% of torch.mm roof) | max abs diff vs torch | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        rows = cell["rows"]
        ort = next((r for r in rows if r["backend"] == "ONNX Runtime fp32"), None)
        full_flops = next((r["matmul_flops"] for r in rows if r["backend"].startswith("mbcompile")
                           and "fill-mask" not in r["backend"] and r.get("matmul_flops")), None)
        roof = cell["roof_gflops"]["1024x1024x1024"]
        for r in sorted(rows, key=lambda r: r["median_ms"]):
            flops = r.get("matmul_flops") or full_flops
            gf = f"{flops / r['median_ms'] / 1e6:.0f} ({100 * flops / r['median_ms'] / 1e6 / roof:.0f}%)" if flops else ""
            ratio = f"{ort['median_ms'] / r['median_ms']:.2f}×" if ort else ""
            model = "MobileBertModel" if r["head"] == "base" else "MobileBertForMaskedLM"
            out.append(f"| {model} | {r['seq']} | {r['threads']} | {r['backend']} | {r['median_ms']:.1f} | "
                       f"{r['min_ms']:.1f}–{r['max_ms']:.1f} | {ratio} | {gf} | {r['max_abs_diff_vs_torch']:.1e} | "
                       f"{_compile_seconds(r)} |")
    return "\n".join(out)


def _precision_table(cells: list[dict]) -> str:
    """Speed-ups of the reduced-precision builds over the peers they are measured against, in
    the same process (peer median / ours; > 1: ours is faster)."""
    out = ["| model | seq | threads | ours | peer (its precision) | ours ms | peer ms | speed-up |",
           "|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        rows = cell["rows"]
        for ours_name, peer_prefix in PRECISION_PAIRS:
            ours = next((r for r in rows if r["backend"].split(" (tuned")[0] == ours_name), None)
            peer = next((r for r in rows if r["backend"].startswith(peer_prefix)), None)
            if ours is None or peer is None:
                continue
            model = "MobileBertModel" if ours["head"] == "base" else "MobileBertForMaskedLM"
            out.append(f"| {model} | {ours['seq']} | {ours['threads']} | {ours['backend']} | "
                       f"{peer['backend']} | {ours['median_ms']:.1f} | {peer['median_ms']:.1f} | "
                       f"{peer['median_ms'] / ours['median_ms']:.2f}× |")
    return "\n".join(out) if len(out) > 2 else ""


def _compile_seconds(row: dict) -> str:
    """Total compile time of an mbcompile row (capture + passes + build), when it was compiled."""
    seconds = row.get("compile_seconds") or {}
    return f"{sum(seconds.values()):.0f}" if seconds else ""


def _header(started: str, cells: list[dict], rounds: int, settle: float | None) -> str:
    machine = cells[0]["machine"]
    roofs = {c["rows"][0]["threads"]: c["roof_gflops"]["1024x1024x1024"] for c in cells
             if "roof_gflops" in c}
    cpu = machine["cpu"]
    if machine.get("llvm_cpu"):  # LLVM's name for the CPU and its widest vectors
        cpu += f" ({machine['llvm_cpu']}, {machine.get('simd', '?')})"
    return (f"Measured {started} on {cpu}, {machine['cores']} cores, batch 1, fp32 unless the backend says otherwise; "
            f"{rounds} interleaved rounds per cell"
            + (f", {settle:g} s pause before each call" if settle else "")
            + ("; torch.mm roof " + ", ".join(f"{t} thr {g:.0f} GFLOP/s" for t, g in sorted(roofs.items()))
               if roofs else "") + ".")


def _write(out: Path, started: str, cells: list[dict], rounds: int, settle: float | None,
           length_cells: list[dict] | None = None) -> str:
    text = _header(started, cells or length_cells, rounds, settle) + "\n\n"
    if cells:
        text += _table(cells) + "\n"
        precision = _precision_table(cells)
        if precision:
            text += "\n## Reduced precision against its peers\n\n" + precision + "\n"
    if length_cells:
        text += "\n## Lengths\n\n" + _lengths_table(length_cells) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"started": started, "rounds": rounds, "settle": settle, "cells": cells,
         "length_cells": length_cells or []}, indent=2))
    out.with_suffix(".md").write_text(text)
    if cells:
        _chart(cells, out.with_suffix(".png"))
    if length_cells:
        chart = out.with_name(out.name + "-lengths.png") if cells else out.with_suffix(".png")
        _lengths_chart(length_cells, chart)
    return text


def _chart(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(4.5 * len(cells), 4), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        rows = sorted(cell["rows"], key=lambda r: r["median_ms"])
        ax.barh([r["backend"] for r in rows], [r["median_ms"] for r in rows],
                xerr=[[r["median_ms"] - r["min_ms"] for r in rows], [r["max_ms"] - r["median_ms"] for r in rows]])
        r0 = rows[0]
        ax.set_title(f"{r0['head']} seq {r0['seq']}, {r0['threads']} thr")
        ax.set_xlabel("ms (median, min–max)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="base,masked-lm")
    p.add_argument("--seq", default="128,384")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--backends", default="all",
                   help="comma list of peers: " + ", ".join(PEERS) + " (PyTorch eager always "
                        "runs as the reference)")
    p.add_argument("--variants", default="default,untuned,no-passes,bf16,int8",
                   help="mbcompile variants for MobileBertModel: default (with the shipped tuning "
                        "database where one applies), untuned, no-passes (untuned), bf16, int8 "
                        "(a precision the CPU lacks is left out)")
    p.add_argument("--mlm-variants", default="default,fill-mask,fill-mask-bf16,fill-mask-int8",
                   help="mbcompile variants for MaskedLM: default, untuned, no-passes, fill-mask, "
                        "fill-mask-bf16, fill-mask-int8")
    p.add_argument("--settle", type=float, default=0.3,
                   help="pause (s) before each timed call, so the previous backend's spinning "
                        "thread pool is idle (matters with 2 threads on 2 cores); 0 for none")
    p.add_argument("--lengths", default="8,16,32,64,128,256,384,512",
                   help="the lengths table: latency against input length of the one artifact, "
                        "exact-length builds and ONNX Runtime with dynamic axes ('none' to skip)")
    p.add_argument("--length-heads", default="base,masked-lm",
                   help="heads of the lengths table (masked-lm: the fill-mask build)")
    p.add_argument("--out", default=None,
                   help="where to write .md/.json/.png (default bench/results/latest, or "
                        "bench/results/lengths for a lengths-only run, --heads none)")
    p.add_argument("--render", metavar="JSON", help="only redraw the table and chart of a run")
    args = p.parse_args()
    if args.backends != "all":
        unknown = sorted(set(args.backends.split(",")) - set(PEERS))
        if unknown:
            p.error(f"--backends: unknown {unknown}; choose from {', '.join(PEERS)} or all")
        args.backends = ",".join(PEERS[b] for b in args.backends.split(","))
    if args.render:
        data = json.loads(Path(args.render).read_text())
        print(_write(Path(args.render), data["started"], data["cells"], data.get("rounds", args.rounds),
                     data.get("settle"), data.get("length_cells")))
        return

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    cells = []
    for head in args.heads.split(",") if args.heads != "none" else ():
        for seq in (int(s) for s in args.seq.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                cells.append(_run_cell(head, seq, threads, args))
    length_cells = []
    if args.lengths != "none":
        for head in args.length_heads.split(","):
            for threads in (int(t) for t in args.threads.split(",")):
                length_cells.append(_run_lengths(head, threads, args))
    out = Path(args.out) if args.out else RESULTS / ("latest" if cells else "lengths")
    print(_write(out, started, cells, args.rounds, args.settle, length_cells))


if __name__ == "__main__":
    main()
