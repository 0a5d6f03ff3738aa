"""``mbcompile run`` (token ids in, outputs and latency out) and the pipeline commands
(``fill-mask``, ``question-answering``, ... : text in, JSON out)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from mbcompile.cli.options import parsed, positive_int
from mbcompile.errors import InputError


@dataclass
class RunArgs:
    artifact: str
    ids: str | None = None  # comma-separated token ids
    repeats: int = 5
    remote: str | None = None
    tracker: str | None = None
    key: str | None = None
    sha256: str | None = None  # pin the artifact file


@dataclass
class PipelineArgs:
    task: str  # a task of mbcompile.pipelines
    artifact: str
    texts: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # folder; default: the tokenizer saved in the artifact
    top_k: int | None = None
    question: str | None = None  # question-answering
    context: str | None = None
    pair: str | None = None  # text-classification, next-sentence-prediction
    aggregation: str = "simple"  # token-classification
    stride: int | None = None
    truncation: bool = False  # text-classification, fill-mask, next-sentence-prediction


PIPELINE_HELP = {
    "fill-mask": "predict the [MASK] tokens of a text",
    "question-answering": "answer --question from --context (long contexts in windows)",
    "text-classification": "classify a text (or a text and --pair)",
    "token-classification": "label the tokens of a text (entities)",
    "next-sentence-prediction": "does --pair follow the text?",
}


def register(sub) -> None:
    r = sub.add_parser("run", help="run a saved artifact on token ids and time it")
    r.add_argument("artifact")
    r.add_argument("--ids", help="comma-separated token ids (default: random valid ids)")
    r.add_argument("--repeats", type=positive_int, default=5)
    r.add_argument(
        "--remote", metavar="HOST:PORT", default=None,
        help="run on the device behind this TVM RPC server (e.g. `mbcompile emulator serve`)",
    )
    r.add_argument(
        "--tracker", metavar="HOST:PORT", default=None,
        help="run on a device registered with this TVM RPC tracker (with --key)",
    )
    r.add_argument("--key", default=None, help="the device key to request from --tracker")
    r.add_argument("--sha256", default=None, metavar="HEX",
                   help="refuse the artifact unless the file's SHA-256 is this (sha256sum)")
    r.set_defaults(handler=lambda ns: _run(parsed(RunArgs, ns)))

    for task, text in PIPELINE_HELP.items():
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
        if task not in ("next-sentence-prediction", "token-classification"):
            s.add_argument("--top-k", type=positive_int, default=None)
        if task in ("text-classification", "fill-mask", "next-sentence-prediction"):
            s.add_argument("--truncation", action="store_true",
                           help="cut texts longer than the compiled length (else refused)")
        if task == "token-classification":
            s.add_argument("--aggregation", default="simple",
                           choices=["none", "simple", "first", "average", "max"])
            s.add_argument("--stride", type=int, default=None,
                           help="read texts longer than seq_len in windows overlapping by N")
        s.set_defaults(handler=lambda ns, task=task: _pipeline(parsed(PipelineArgs, ns, task=task)))


def parse_ids(text: str) -> list[int]:
    """``--ids "101,2023,102"`` → token ids; InputError naming what is wrong."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(re.fullmatch(r"-?[0-9]+", p) for p in parts):
        raise InputError(
            f"--ids: expected comma-separated token ids, e.g. 101,2023,102; got {text!r}"
        )
    ids = [int(p) for p in parts]
    huge = [i for i in ids if not -(2**63) <= i < 2**63]
    if huge:
        raise InputError(f"--ids: token id {huge[0]} is outside any vocabulary")
    return ids


def _run(args: RunArgs) -> int:
    import statistics
    import time

    import numpy as np

    import mbcompile

    remote = args.remote is not None or args.tracker is not None or args.key is not None
    compiled = mbcompile.load(
        args.artifact, args.remote, tracker=args.tracker, key=args.key, expected_sha256=args.sha256
    )
    sig = compiled.signature
    if args.ids is not None:
        ids = np.array(parse_ids(args.ids), dtype=np.int64)
        ids = ids.reshape((1,) * (len(sig.input_shape) - 1) + ids.shape)
        if sig.num_choices:
            ids = np.repeat(ids, sig.num_choices, axis=1)
    else:
        rng = np.random.default_rng(0)
        ids = rng.integers(0, sig.vocab_size, size=sig.input_shape, dtype=np.int64)
    out = compiled(input_ids=ids, return_dict=True)
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
    program = compiled.program
    arrays = compiled.program_inputs(ids)
    seconds = sorted(program.time(arrays, repeat=max(1, repeats)))
    median = seconds[len(seconds) // 2] * 1e3
    print(f"device time: median {median:.2f} ms per run on {program.where} (time_evaluator)")
    program.close()


def _pipeline(args: PipelineArgs) -> int:
    import mbcompile
    from mbcompile.errors import PipelineError

    run = mbcompile.pipeline(args.task, args.artifact, tokenizer=args.tokenizer)
    options = {} if args.top_k is None else {"top_k": args.top_k}
    if args.truncation:
        options["truncation"] = True
    one = len(args.texts) == 1
    if args.task == "question-answering":
        out = run(question=args.question, context=args.context, **options)
    elif args.task == "text-classification":
        inputs = [{"text": t, "text_pair": args.pair} if args.pair is not None else t
                  for t in args.texts]
        out = run(inputs[0] if one else inputs, **options)
    elif args.task == "next-sentence-prediction":
        if args.pair is None:
            raise PipelineError("next-sentence-prediction needs --pair (the second sentence)")
        out = run(args.texts[0] if one else args.texts,
                  args.pair if one else [args.pair] * len(args.texts), **options)
    elif args.task == "token-classification":
        out = run(args.texts[0] if one else args.texts,
                  aggregation_strategy=args.aggregation, stride=args.stride)
    else:
        out = run(args.texts[0] if one else args.texts, **options)
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0
