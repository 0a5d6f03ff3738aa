"""The ``mbcompile`` command: parse into a dataclass, call the API."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from .errors import MbcompileError
from .heads import HEADS


@dataclass
class CompileArgs:
    checkpoint: str | None
    config: str | None
    head: str | None
    random_init: bool
    target: str
    seq_len: int
    batch_size: int
    num_choices: int | None
    passes: list[str] | None
    explain: bool
    output: str
    tuning_db: str = "default"
    logits_for: str = "all"  # "masked": MaskedLM/PreTraining logits at [MASK] positions only
    max_masked: int = 8


@dataclass
class TuneArgs:
    checkpoint: str | None
    config: str | None
    head: str | None
    target: str
    seq_len: int
    batch_size: int
    trials: int
    minutes: float | None
    max_tasks: int | None
    work_dir: str
    tracker: str | None = None  # measure on devices registered with this TVM RPC tracker
    key: str | None = None
    logits_for: str = "all"
    max_masked: int = 8


@dataclass
class DemoArgs:
    checkpoint: str | None
    config: str
    head: str
    seq_len: int
    target: str
    repeats: int


@dataclass
class RunArgs:
    artifact: str
    ids: str | None  # comma-separated token ids
    repeats: int
    remote: str | None = None
    tracker: str | None = None
    key: str | None = None


@dataclass
class PipelineArgs:
    task: str  # a task of mbcompile.pipelines.TASKS
    artifact: str
    texts: list[str]
    tokenizer: str | None = None  # folder; default: the tokenizer saved in the artifact
    top_k: int | None = None
    question: str | None = None  # question-answering
    context: str | None = None
    pair: str | None = None  # text-classification, next-sentence-prediction
    aggregation: str = "simple"  # token-classification
    stride: int | None = None


@dataclass
class EmulatorArgs:
    action: str  # "build", "serve" or "tracker"
    force: bool = False
    port: int = 9090
    mode: str = "auto"
    load_library: str | None = None
    tracker: str | None = None
    key: str | None = None
    host: str = "127.0.0.1"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mbcompile", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a MobileBERT checkpoint or named config")
    c.add_argument("checkpoint", nargs="?", help="local checkpoint folder (config.json + weights)")
    c.add_argument("--config", help="named architecture instead of a checkpoint, e.g. mobilebert-uncased")
    c.add_argument("--head", choices=list(HEADS), help="model head (default: from the checkpoint)")
    c.add_argument("--random-init", action="store_true", help="random weights (with --config)")
    c.add_argument("--target", default="host", help="target name (see `mbcompile targets`)")
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--batch-size", type=int, default=1)
    c.add_argument("--num-choices", type=int, default=None, help="multiple-choice head only")
    c.add_argument("--passes", default=None, help="comma-separated pass names, or 'none'")
    c.add_argument("--explain", action="store_true", help="print what each pass changed")
    c.add_argument("--tuning-db", default="default",
                   help="tuning database folder from `mbcompile tune`, 'default' or 'none'")
    c.add_argument("-o", "--output", required=True, help="artifact path, e.g. model.mbc")

    t = sub.add_parser("tune", help="tune the kernels with MetaSchedule into a database folder")
    t.add_argument("checkpoint", nargs="?", help="local checkpoint folder")
    t.add_argument("--config", help="named architecture instead of a checkpoint")
    t.add_argument("--head", choices=list(HEADS))
    t.add_argument("--target", default="host")
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--trials", type=int, default=64, help="trials per distinct kernel")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    t.add_argument("--max-tasks", type=int, default=None, help="tune only the N costliest kernels")
    t.add_argument("-o", "--work-dir", required=True, help="database folder (resumable)")
    t.add_argument(
        "--tracker", metavar="HOST:PORT", default=None,
        help="measure on the devices registered with this TVM RPC tracker (with --key); "
        "--target must be their CPU, e.g. aarch64",
    )
    t.add_argument("--key", default=None, help="the device key to request from --tracker")

    for q in (c, t):
        q.add_argument(
            "--logits-for", choices=["all", "masked"], default="all",
            help="masked-lm/pretraining: 'masked' computes vocabulary logits at the [MASK] "
            "positions only (fill-mask)",
        )
        q.add_argument("--max-masked", type=int, default=8,
                       help="with --logits-for masked: most [MASK] tokens per sequence")

    i = sub.add_parser("info", help="describe a saved artifact")
    i.add_argument("artifact")

    r = sub.add_parser("run", help="run a saved artifact on token ids and time it")
    r.add_argument("artifact")
    r.add_argument("--ids", help="comma-separated token ids (default: random valid ids)")
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument(
        "--remote", metavar="HOST:PORT", default=None,
        help="run on the device behind this TVM RPC server (e.g. `mbcompile emulator serve`)",
    )
    r.add_argument(
        "--tracker", metavar="HOST:PORT", default=None,
        help="run on a device registered with this TVM RPC tracker (with --key)",
    )
    r.add_argument("--key", default=None, help="the device key to request from --tracker")

    d = sub.add_parser("demo", help="compile mobilebert-uncased for this CPU, check, time")
    d.add_argument("--checkpoint", default=None, help="use this checkpoint instead of random weights")
    d.add_argument("--config", default="mobilebert-uncased")
    d.add_argument("--head", default="base", choices=list(HEADS))
    d.add_argument("--seq-len", type=int, default=128)
    d.add_argument("--target", default="host")
    d.add_argument("--repeats", type=int, default=5)

    sub.add_parser("targets", help="list the named targets")
    _add_pipeline_parsers(sub)
    a = sub.add_parser("add-tokenizer", help="save a tokenizer folder's files into an artifact")
    a.add_argument("artifact")
    a.add_argument("folder", help="folder with vocab.txt / tokenizer.json / tokenizer_config.json")

    e = sub.add_parser("emulator", help="the emulated aarch64 device (qemu user mode)")
    esub = e.add_subparsers(dest="emulator_command", required=True)
    eb = esub.add_parser("build", help="build it (cached in .cache/emulator; rebuilt on change)")
    eb.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    es = esub.add_parser("serve", help="run a TVM RPC server inside it on 127.0.0.1")
    es.add_argument("--port", type=int, default=9090)
    es.add_argument(
        "--mode", choices=["auto", "stock", "in-process"], default="auto",
        help="stock: TVM's server (needs binfmt_misc, registered if root); in-process: no "
        "child Python; auto: stock if possible",
    )
    es.add_argument(
        "--load-library", default=None,
        help="extra library for the server, e.g. the device's tvm/lib/libtvm_runtime_extra.so "
        "(MetaSchedule over RPC; the default with --tracker)",
    )
    es.add_argument(
        "--tracker", metavar="HOST:PORT", default=None,
        help="register with this TVM RPC tracker (with --key) instead of taking direct clients",
    )
    es.add_argument("--key", default=None, help="the device key to register under, e.g. emu")
    et = esub.add_parser(
        "tracker", help="run a TVM RPC tracker (devices register with it; tune and run use it)"
    )
    et.add_argument("--port", type=int, default=9190)
    et.add_argument("--host", default="127.0.0.1", help="address to listen on")
    return p


def _model(checkpoint: str | None, config: str | None, head: str | None, random_init: bool):
    from mbcompile.models import load_checkpoint, random_model

    if checkpoint and config:
        raise SystemExit("give a checkpoint folder or --config, not both")
    if checkpoint:
        return load_checkpoint(checkpoint, head=head)
    if config:
        if not random_init:
            raise SystemExit("--config builds an architecture without weights: add --random-init")
        return random_model(config, head or "base")
    raise SystemExit("give a checkpoint folder, or --config NAME --random-init")


def _compile(args: CompileArgs) -> int:
    import mbcompile

    model = _model(args.checkpoint, args.config, args.head, args.random_init)
    passes = "default" if args.passes is None else args.passes
    compiled = mbcompile.compile(
        model,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        num_choices=args.num_choices,
        target=args.target,
        passes=passes,
        tuning_db=None if args.tuning_db == "none" else args.tuning_db,
        logits_for=args.logits_for,
        max_masked=args.max_masked,
    )
    path = compiled.save(args.output)
    print(f"wrote {path}: {compiled}")
    if args.explain:
        print(format_report(compiled.report()))
    return 0


def _tune(args: TuneArgs) -> int:
    import mbcompile

    # A named config is an architecture: tuning needs no trained weights.
    model = _model(args.checkpoint, args.config, args.head, random_init=True)
    summary = mbcompile.tune(
        model, work_dir=args.work_dir, target=args.target, seq_len=args.seq_len,
        batch_size=args.batch_size, trials=args.trials, minutes=args.minutes,
        max_tasks=args.max_tasks, log=lambda line: print(line, file=sys.stderr, flush=True),
        tracker=args.tracker, key=args.key, logits_for=args.logits_for,
        max_masked=args.max_masked,
    )
    print(json.dumps(summary))
    print(f"apply it with: mbcompile compile ... --tuning-db {args.work_dir}")
    return 0


def format_report(report: dict) -> str:
    rows = [("stage", "fired", "matmuls", "weight MB")]
    imported = report.get("imported", {})
    rows.append(("imported", "", str(imported.get("matmul_calls", "")), _mb(imported)))
    for row in report.get("passes", []):
        rows.append((row["pass"], str(row["fired"]), str(row["matmul_calls"]), _mb(row)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    final = report.get("final", {})
    lines.append(
        f"final module: {final.get('kernel_calls')} kernel calls, "
        f"{final.get('matmul_calls')} matmul calls per forward, {_mb(final)} MB of weights"
    )
    return "\n".join(lines)


def _mb(stats: dict) -> str:
    return f"{stats['weight_bytes'] / 1e6:.1f}" if "weight_bytes" in stats else ""


def _info(path: str) -> int:
    from mbcompile import artifact

    art = artifact.read(path)
    meta = art.metadata
    sig = meta["signature"]
    shape = [sig["batch_size"], sig["seq_len"]]
    if sig.get("num_choices"):
        shape.insert(1, sig["num_choices"])
    cfg = meta.get("config", {})
    print(f"artifact:   {path} (format {meta['format_version']})")
    print(f"model:      {meta['model_class']} (head {meta['head']})")
    print(
        f"config:     {cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
        f"vocab {cfg.get('vocab_size')}, {cfg.get('normalization_type')}, {cfg.get('hidden_act')}"
    )
    print(f"inputs:     input_ids, attention_mask, token_type_ids: int64 {tuple(shape)}")
    for o in sig["outputs"]:
        name = o["name"] if o.get("index") is None else f"{o['name']}[{o['index']}]"
        print(f"output:     {name}: {o['dtype']} {tuple(o['shape'])}")
    tgt = meta["target"]
    print(f"target:     {tgt['name']} ({tgt['description']})")
    print(f"library:    {len(art.lib) / 1e6:.1f} MB, sha256 {meta['members']['lib.so']['sha256'][:16]}…")
    print("versions:   " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()))
    return 0


def _run(args: RunArgs) -> int:
    import statistics
    import time

    import numpy as np

    import mbcompile

    remote = args.remote is not None or args.tracker is not None or args.key is not None
    if remote:
        from mbcompile.remote import load_remote

        compiled = load_remote(args.artifact, args.remote, tracker=args.tracker, key=args.key)
    else:
        compiled = mbcompile.load(args.artifact)
    sig = compiled.signature
    if args.ids:
        ids = np.array([int(t) for t in args.ids.split(",")], dtype=np.int64)
        ids = ids.reshape((1,) * (len(sig.input_shape) - 1) + ids.shape)
        if sig.num_choices:
            ids = np.repeat(ids, sig.num_choices, axis=1)
    else:
        rng = np.random.default_rng(0)
        ids = rng.integers(0, sig.vocab_size, size=sig.input_shape, dtype=np.int64)
    out = compiled(input_ids=ids)
    for name, value in out.items():
        if isinstance(value, tuple):
            print(f"{name}: {len(value)} arrays of shape {value[0].shape}")
        else:
            print(f"{name}: shape {value.shape}, first values {np.ravel(value)[:4]}")
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        compiled(input_ids=ids)
        times.append((time.perf_counter() - t) * 1e3)
    print(f"latency: median {statistics.median(times):.2f} ms over {args.repeats} runs")
    if remote:
        _print_device_time(compiled, ids, args.repeats)
    return 0


def _print_device_time(compiled, ids, repeats: int) -> None:
    """Time ``main`` on the remote device itself (TVM's time_evaluator: no network, no upload)."""
    import numpy as np

    from mbcompile.inputs import pad_to

    sig = compiled.signature
    program = compiled._program
    ids = pad_to(np.asarray(ids, dtype=np.int64)[: sig.batch_size], sig.input_shape)
    arrays = [ids, np.ones_like(ids), np.zeros_like(ids)]
    if sig.max_masked is not None:
        arrays.append(np.zeros((sig.batch_size, sig.max_masked), np.int64))
    seconds = sorted(program.time(arrays, repeat=max(1, repeats)))
    median = seconds[len(seconds) // 2] * 1e3
    print(f"device time: median {median:.2f} ms per run on {program.where} (time_evaluator)")
    program.close()


def _emulator(args: EmulatorArgs) -> int:
    from mbcompile.targets import emulator

    if args.action == "build":
        device = emulator.build(force=args.force)
        stamp = device.stamp
        print(
            f"device: {device.root} ({stamp.get('bytes', 0) / 1e6:.0f} MB, built "
            f"{stamp.get('built')} in {stamp.get('build_seconds')} s)"
        )
        print("python: " + " ".join(device.python()) + f"  (with QEMU_LD_PREFIX={device.root})")
        return 0
    if args.action == "tracker":
        from mbcompile.remote import serve_tracker

        return serve_tracker(args.port, args.host)
    return emulator.serve(
        args.port, mode=args.mode, load_library=args.load_library, tracker=args.tracker,
        key=args.key,
    )


_PIPELINE_HELP = {
    "fill-mask": "predict the [MASK] tokens of a text",
    "question-answering": "answer --question from --context (long contexts in windows)",
    "text-classification": "classify a text (or a text and --pair)",
    "token-classification": "label the tokens of a text (entities)",
    "next-sentence-prediction": "does --pair follow the text?",
}


def _add_pipeline_parsers(sub) -> None:
    for task, text in _PIPELINE_HELP.items():
        s = sub.add_parser(task, help=f"{text}; prints JSON")
        s.add_argument("artifact", help="a saved artifact (.mbc)")
        if task != "question-answering":
            s.add_argument("texts", nargs="+", metavar="TEXT")
        else:
            s.add_argument("--question", required=True)
            s.add_argument("--context", required=True)
        s.add_argument("--tokenizer", default=None,
                       help="tokenizer folder (default: the one saved in the artifact)")
        if task in ("text-classification", "next-sentence-prediction"):
            s.add_argument("--pair", default=None, help="second text of a pair")
        if task != "next-sentence-prediction":
            s.add_argument("--top-k", type=int, default=None)
        if task == "token-classification":
            s.add_argument("--aggregation", default="simple",
                           choices=["none", "simple", "first", "average", "max"])
            s.add_argument("--stride", type=int, default=None,
                           help="read texts longer than seq_len in windows overlapping by N")


def _pipeline(args: PipelineArgs) -> int:
    import mbcompile
    from mbcompile.pipelines import PipelineError

    run = mbcompile.pipeline(args.task, args.artifact, tokenizer=args.tokenizer)
    options = {} if args.top_k is None else {"top_k": args.top_k}
    one = len(args.texts) == 1
    if args.task == "question-answering":
        out = run(question=args.question, context=args.context, **options)
    elif args.task == "text-classification":
        inputs = [{"text": t, "text_pair": args.pair} if args.pair else t for t in args.texts]
        out = run(inputs[0] if one else inputs, **options)
    elif args.task == "next-sentence-prediction":
        if args.pair is None:
            raise PipelineError("next-sentence-prediction needs --pair (the second sentence)")
        out = run(args.texts[0] if one else args.texts,
                  args.pair if one else [args.pair] * len(args.texts))
    elif args.task == "token-classification":
        out = run(args.texts[0] if one else args.texts,
                  aggregation_strategy=args.aggregation, stride=args.stride)
    else:
        out = run(args.texts[0] if one else args.texts, **options)
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def _add_tokenizer(path: str, folder: str) -> int:
    from mbcompile import artifact
    from mbcompile.pipelines import PipelineError

    files = artifact.tokenizer_files(folder)
    if not files:
        raise PipelineError(
            f"{folder}: no tokenizer files (looked for {list(artifact.TOKENIZER_FILES)})"
        )
    artifact.add_tokenizer(path, files)
    print(f"{path}: saved tokenizer files {sorted(files)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        if ns.command == "compile":
            passes = None
            if ns.passes is not None:
                passes = [] if ns.passes == "none" else [p for p in ns.passes.split(",") if p]
            return _compile(
                CompileArgs(
                    ns.checkpoint, ns.config, ns.head, ns.random_init, ns.target, ns.seq_len,
                    ns.batch_size, ns.num_choices, passes, ns.explain, ns.output, ns.tuning_db,
                    ns.logits_for, ns.max_masked,
                )
            )
        if ns.command == "tune":
            return _tune(
                TuneArgs(
                    ns.checkpoint, ns.config, ns.head, ns.target, ns.seq_len, ns.batch_size,
                    ns.trials, ns.minutes, ns.max_tasks, ns.work_dir, ns.tracker, ns.key,
                    ns.logits_for, ns.max_masked,
                )
            )
        if ns.command == "info":
            return _info(ns.artifact)
        if ns.command == "run":
            return _run(RunArgs(ns.artifact, ns.ids, ns.repeats, ns.remote, ns.tracker, ns.key))
        if ns.command in _PIPELINE_HELP:
            return _pipeline(
                PipelineArgs(
                    ns.command, ns.artifact, getattr(ns, "texts", []), ns.tokenizer,
                    getattr(ns, "top_k", None), getattr(ns, "question", None),
                    getattr(ns, "context", None), getattr(ns, "pair", None),
                    getattr(ns, "aggregation", "simple"), getattr(ns, "stride", None),
                )
            )
        if ns.command == "add-tokenizer":
            return _add_tokenizer(ns.artifact, ns.folder)
        if ns.command == "emulator":
            a = EmulatorArgs(ns.emulator_command)
            if ns.emulator_command == "build":
                a.force = ns.force
            elif ns.emulator_command == "tracker":
                a.port, a.host = ns.port, ns.host
            else:
                a.port, a.mode, a.load_library = ns.port, ns.mode, ns.load_library
                a.tracker, a.key = ns.tracker, ns.key
            return _emulator(a)
        if ns.command == "demo":
            from mbcompile.demo import run_demo

            a = DemoArgs(ns.checkpoint, ns.config, ns.head, ns.seq_len, ns.target, ns.repeats)
            run_demo(a.checkpoint, a.config, a.head, a.seq_len, a.target, a.repeats)
            return 0
        if ns.command == "targets":
            from mbcompile.targets.registry import TARGETS

            print("host: this machine's CPU (detected)")
            for t in TARGETS.values():
                print(f"{t.name}: {t.description}")
            return 0
    except MbcompileError as err:
        print(f"mbcompile: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
