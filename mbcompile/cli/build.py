"""``mbcompile compile``, ``tune``, ``info``, ``targets``, ``add-tokenizer`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

from mbcompile.cli.options import add_option_flags, options_from_args, parsed, positive_int
from mbcompile.errors import ModelError, OptionError, PipelineError
from mbcompile.heads import HEADS
from mbcompile.options import CompileOptions


@dataclass
class ModelArgs:
    """Where the PyTorch model comes from."""

    checkpoint: str | None = None
    config: str | None = None
    head: str | None = None
    random_init: bool = False


@dataclass
class CompileArgs:
    model: ModelArgs
    options: CompileOptions
    output: str
    explain: bool = False
    tuning_db: str = "default"
    quiet: bool = False


@dataclass
class TuneArgs:
    model: ModelArgs
    options: CompileOptions
    work_dir: str
    trials: int = 64
    minutes: float | None = None
    max_tasks: int | None = None
    tracker: str | None = None  # measure on devices registered with this TVM RPC tracker
    key: str | None = None
    emulator_cost: str | None = None  # cost candidates by counted instructions on the emulator


@dataclass
class DemoArgs:
    checkpoint: str | None = None
    config: str = "mobilebert-uncased"
    head: str = "base"
    seq_len: int | None = None
    target: str = "host"
    repeats: int = 5
    lengths: str = "12,128"


@dataclass
class AddTokenizerArgs:
    artifact: str
    folder: str


def _add_model_source(p: argparse.ArgumentParser, *, random_init: bool) -> None:
    p.add_argument(
        "checkpoint", nargs="?",
        help="local checkpoint folder (config.json + weights), an ONNX file (*.onnx) or "
        "Hugging Face hub id "
        "(the hub cache first; HF_HUB_OFFLINE honoured)",
    )
    p.add_argument(
        "--config", help="named architecture instead of a checkpoint, e.g. mobilebert-uncased"
    )
    p.add_argument("--head", choices=list(HEADS), help="model head (default: from the checkpoint)")
    if random_init:
        p.add_argument("--random-init", action="store_true", help="random weights (with --config)")


def register(sub) -> None:
    c = sub.add_parser("compile", help="compile a MobileBERT checkpoint or named config")
    _add_model_source(c, random_init=True)
    add_option_flags(c)
    c.add_argument("--explain", action="store_true", help="print what each pass changed")
    c.add_argument("--tuning-db", default="default",
                   help="tuning database folder from `mbcompile tune`, 'default' or 'none'")
    c.add_argument("-o", "--output", required=True, help="artifact path, e.g. model.mbc")
    c.add_argument("-q", "--quiet", action="store_true",
                   help="no progress lines (there are none when stdout is not a terminal)")
    c.set_defaults(handler=_compile)

    t = sub.add_parser("tune", help="tune the kernels with MetaSchedule into a database folder")
    _add_model_source(t, random_init=False)
    add_option_flags(t)
    t.add_argument("--trials", type=positive_int, default=64, help="trials per distinct kernel")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    t.add_argument("--max-tasks", type=positive_int, default=None, help="tune only the N costliest kernels")
    t.add_argument("-o", "--work-dir", required=True, help="database folder (resumable)")
    t.add_argument(
        "--tracker", metavar="HOST:PORT", default=None,
        help="measure on the devices registered with this TVM RPC tracker (with --key); "
        "--target must be their CPU, e.g. aarch64",
    )
    t.add_argument("--key", default=None, help="the device key to request from --tracker")
    t.add_argument(
        "--emulator-cost", choices=("a76", "a55", "instructions"), default=None,
        help="for an aarch64 --target: cost candidates by the instructions they execute on the "
        "emulated device, as a modelled Cortex-A76 or A55 core's cycles (a model, not a "
        "measurement), instead of by time under qemu",
    )
    t.set_defaults(handler=_tune)

    i = sub.add_parser("info", help="describe a saved artifact")
    i.add_argument("artifact")
    i.set_defaults(handler=lambda ns: _info(ns.artifact))

    d = sub.add_parser("demo", help="compile mobilebert-uncased for this CPU, check, time")
    d.add_argument("--checkpoint", default=None, help="use this checkpoint instead of random weights")
    d.add_argument("--config", default="mobilebert-uncased")
    d.add_argument("--head", default="base", choices=list(HEADS))
    d.add_argument("--seq-len", type=positive_int, default=None,
                   help="compile this one length only (default: every length up to the maximum)")
    d.add_argument("--lengths", default="12,128",
                   help="input lengths to check against PyTorch and time (comma-separated)")
    d.add_argument("--target", default="host")
    d.add_argument("--repeats", type=positive_int, default=5)
    d.set_defaults(handler=lambda ns: _demo(parsed(DemoArgs, ns)))

    sub.add_parser("targets", help="list the named targets").set_defaults(handler=_targets)

    a = sub.add_parser("add-tokenizer", help="save a tokenizer folder's files into an artifact")
    a.add_argument("artifact")
    a.add_argument("folder", help="folder with vocab.txt / tokenizer.json / tokenizer_config.json")
    a.set_defaults(handler=lambda ns: _add_tokenizer(parsed(AddTokenizerArgs, ns)))


def _model(args: ModelArgs):
    from mbcompile.capture import is_onnx_path, load_checkpoint, load_onnx, random_model

    if args.checkpoint and args.config:
        raise ModelError("give a checkpoint folder or --config, not both")
    if args.checkpoint and is_onnx_path(args.checkpoint):
        return load_onnx(args.checkpoint, head=args.head)
    if args.checkpoint and args.random_init:
        raise ModelError("--random-init applies with --config NAME; a checkpoint has its weights")
    if args.checkpoint:
        return load_checkpoint(args.checkpoint, head=args.head)
    if args.config:
        if not args.random_init:
            raise ModelError("--config builds an architecture without weights: add --random-init")
        return random_model(args.config, args.head or "base")
    raise ModelError("give a checkpoint folder, or --config NAME --random-init")


def progress(quiet: bool):
    """Where progress lines go: stderr, timestamped, when stdout is a terminal and not
    ``quiet``; nowhere otherwise (a pipe or a file gets the results only)."""
    if quiet or not sys.stdout.isatty():
        return lambda _line: None
    start = time.monotonic()
    return lambda line: print(f"[{time.monotonic() - start:6.1f} s] {line}", file=sys.stderr, flush=True)


def _compile(ns: argparse.Namespace) -> int:
    from mbcompile.compiler import compile
    from mbcompile.report import format_report

    args = parsed(
        CompileArgs, ns, model=parsed(ModelArgs, ns), options=options_from_args(ns)
    )
    log = progress(args.quiet)
    if args.model.checkpoint:
        log(f"loading {args.model.checkpoint} ...")
    compiled = compile(
        _model(args.model),
        **args.options.kwargs(),
        tuning_db=None if args.tuning_db == "none" else args.tuning_db,
        log=log,
    )
    path = compiled.save(args.output)
    print(f"wrote {path}: {compiled}")
    if args.explain:
        print(format_report(compiled.report()))
    return 0


def _tune(ns: argparse.Namespace) -> int:
    from mbcompile.tuner import check_budget, tune

    # A named config is an architecture: tuning needs no trained weights.
    model_args = parsed(ModelArgs, ns, random_init=ns.config is not None)
    args = parsed(TuneArgs, ns, model=model_args, options=options_from_args(ns))
    check_budget(args.trials, args.minutes, args.max_tasks)  # before the model loads
    summary = tune(
        _model(args.model), **args.options.kwargs(), work_dir=args.work_dir, trials=args.trials,
        minutes=args.minutes, max_tasks=args.max_tasks,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        tracker=args.tracker, key=args.key, emulator_cost=args.emulator_cost,
    )
    print(json.dumps(summary))
    print(f"apply it with: mbcompile compile ... --tuning-db {args.work_dir}")
    return 0


def _info(path: str) -> int:
    from mbcompile import artifact

    art = artifact.read(path)
    meta = art.metadata
    sig = meta.signature
    cfg = meta.config
    print(f"artifact:   {path} (format {artifact.FORMAT_VERSION}), "
          f"sha256 {artifact.file_sha256(path)} (pin it with --sha256)")
    print(f"model:      {meta.model_class} (head {meta.head})")
    print(
        f"config:     {cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
        f"vocab {cfg.get('vocab_size')}, {cfg.get('normalization_type')}, {cfg.get('hidden_act')}"
    )
    shape = ", ".join(map(str, sig.input_shape[:-1]))
    print(f"inputs:     input_ids, attention_mask, token_type_ids: int64 ({shape}, length), "
          f"length 1 to {sig.seq_len}, compiled for {list(sig.lengths)}")
    if meta.source:
        print("source:     " + ", ".join(f"{k} {v}" for k, v in meta.source.items()))
    for o in sig.outputs:
        name = o.name if o.index is None else f"{o.name}[{o.index}]"
        print(f"output:     {name}: {o.dtype} {tuple(o.shape)}")
    print(f"target:     {meta.target_name} ({meta.target.get('description', '')})")
    print(f"precision:  {meta.precision}")
    for line in _accuracy_lines(meta.report.get("accuracy")):
        print(f"accuracy:   {line}")
    print(f"library:    {len(art.lib) / 1e6:.1f} MB, sha256 {art.lib_sha256[:16]}…")
    print("versions:   " + ", ".join(f"{k} {v}" for k, v in meta.versions.items()))
    return 0


def _accuracy_lines(report) -> list[str]:
    """The compile's accuracy check (metadata report), a line per output; tolerant of any JSON."""
    if not isinstance(report, dict):
        return ["not recorded (compiled before mbcompile checked it)"]
    if "skipped" in report:
        return [str(report["skipped"])]
    lines = []
    outputs = report.get("outputs")
    for name, m in (outputs.items() if isinstance(outputs, dict) else []):
        if not isinstance(m, dict):
            continue
        parts = [
            f"{label} {m[key]:.3g}" if isinstance(m.get(key), (int, float)) else ""
            for key, label in (("max_abs_error", "max abs error"), ("max_rel_error", "relative"),
                               ("min_cosine", "min cosine"), ("top1_agreement", "top-1 agreement"))
        ]
        lines.append(f"{name}: " + ", ".join(p for p in parts if p))
    if lines and isinstance(report.get("inputs"), str):
        against = report.get("reference", "PyTorch fp32")
        lines[-1] += f" (against {against} on {report['inputs']})"
    return lines or ["no outputs compared"]


def _targets(ns: argparse.Namespace) -> int:
    from mbcompile.targets.registry import TARGETS

    print("host: this machine's CPU (detected)")
    for t in TARGETS.values():
        print(f"{t.name}: {t.description}")
    return 0


def _demo(args: DemoArgs) -> int:
    from mbcompile.demo import run_demo

    try:
        lengths = tuple(int(n) for n in args.lengths.split(","))
    except ValueError:
        raise OptionError(f"--lengths: expected comma-separated integers, got {args.lengths!r}") from None
    if any(n < 1 for n in lengths):
        raise OptionError(f"--lengths: lengths must be positive, got {args.lengths!r}")
    run_demo(args.checkpoint, args.config, args.head, args.seq_len, args.target, args.repeats,
             lengths=lengths)
    return 0


def _add_tokenizer(args: AddTokenizerArgs) -> int:
    from mbcompile import artifact

    files = artifact.tokenizer_files(args.folder)
    if not files:
        raise PipelineError(
            f"{args.folder}: no tokenizer files (looked for {list(artifact.TOKENIZER_FILES)})"
        )
    from mbcompile.artifact.tokenizer_json import with_tokenizer_json

    files = with_tokenizer_json(files)  # the pipelines then need the tokenizers library only
    # checked as a pipeline will use them: damaged files or another model's vocabulary refused
    from mbcompile.pipelines.base import check_vocabulary
    from mbcompile.pipelines.tokenizer import _tokenizer_from_files

    metadata = artifact.read(args.artifact).metadata
    tokenizer = _tokenizer_from_files(files, metadata.config, str(args.folder))
    check_vocabulary(tokenizer, metadata.signature.vocab_size)
    artifact.add_tokenizer(args.artifact, files)
    print(f"{args.artifact}: saved tokenizer files {sorted(files)}")
    return 0
