"""The compile options: one typed list, shared by ``compile``, ``tune`` and the CLI.

``mbcompile.compile`` and ``mbcompile.tune`` take these as keyword arguments with the same
names, types and defaults (a test checks), and build a :class:`CompileOptions` from them; the
CLI makes one flag per field (``seq_len`` → ``--seq-len``) from the field's ``help``. The values
that shape the kernels are all here, so a tuned database and a compile agree on them.

Checks that need nothing but the value happen here, where it enters; checks against the model
(``seq_len`` above ``max_position_embeddings``, ``num_choices`` on another head, the
``logits_for`` head) happen in capture and the compile driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from mbcompile.errors import OptionError

LOGITS_FOR = ("all", "masked")
DEFAULT_MASK_TOKEN_ID = 103  # [MASK] of the uncased vocabulary
# fp32: everything in fp32. bf16: the matmuls by the model's weights take bf16 weights and
# activations and sum in fp32. int8: those matmuls take int8 weights (per output channel) and
# activations (per row, quantized at run time) and sum in int32. Both need a CPU with native dot
# products for them; the rest of the model (embeddings, attention, norms) stays fp32.
PRECISIONS = ("fp32", "bf16", "int8")

# The sequence lengths an artifact is compiled for, below its max_seq_len (which is one too): an
# input runs the smallest that fits. Latency grows with length all the way down (exact builds of
# the default model, 1 thread, bench/results/lengths.md: 11.5 ms at 8 tokens, 15.0 at 16, 20.4 at
# 32, 26.9 at 64), so the steps
# are powers of two, and 128 apart above 256. Each length compiles its own kernels (about 6 s of
# the default model's compile), so there are no more of them.
SEQ_LENS = (8, 16, 32, 64, 128, 256, 384, 512)


def _help(text: str, **cli: Any) -> dict:
    """Field metadata: the help text, and CLI details (``choices``, ``metavar``, ``cli=False``)."""
    return {"help": text, **cli}


@dataclass(frozen=True)
class CompileOptions:
    """What to compile a model into: target, shapes, passes and the fill-mask head."""

    target: Any = field(
        default="host",
        metadata=_help("target name (see `mbcompile targets`) or a Target", metavar="NAME"),
    )
    max_seq_len: int | None = field(
        default=None,
        metadata=_help(
            "longest input the model takes (default: the model's max_position_embeddings); "
            "every length up to it runs the smallest compiled length that fits"
        ),
    )
    seq_len: int | None = field(
        default=None,
        metadata=_help(
            "compile for this one sequence length only (shorter inputs are padded to it): the "
            "smallest artifact, instead of the lengths up to max_seq_len"
        ),
    )
    batch_size: int = field(default=1, metadata=_help("rows per call of the compiled function"))
    num_choices: int | None = field(
        default=None, metadata=_help("choices per question (multiple-choice head only; default 4)")
    )
    passes: str | Sequence[Any] | None = field(
        default="default",
        metadata=_help("'default', 'none' or comma-separated pass names", metavar="PASSES"),
    )
    logits_for: str = field(
        default="all",
        metadata=_help(
            "masked-lm/pretraining: 'masked' computes vocabulary logits at the [MASK] positions "
            "only (fill-mask)",
            choices=LOGITS_FOR,
        ),
    )
    max_masked: int = field(
        default=8, metadata=_help("with logits_for='masked': most [MASK] tokens per sequence")
    )
    mask_token_id: int | None = field(
        default=None,
        metadata=_help("with logits_for='masked': the [MASK] token id (default: the saved "
                       "tokenizer's, else 103, uncased)"),
    )
    precision: str = field(
        default="fp32",
        metadata=_help(
            "'bf16': the weight matmuls in bf16 with fp32 sums (CPUs with AVX512_BF16); "
            "'int8': in int8 with int32 sums (x86 AVX2 or AVX512_VNNI, ARM dotprod); 'fp32': "
            "everything in fp32",
            choices=PRECISIONS,
        ),
    )

    def __post_init__(self) -> None:
        for name in ("seq_len", "max_seq_len"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise OptionError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len is not None and self.max_seq_len is not None:
            raise OptionError(
                "give seq_len (one fixed length) or max_seq_len (every length up to it), not both"
            )
        check_shape(self.seq_len or 1, self.batch_size, self.num_choices)
        if self.logits_for not in LOGITS_FOR:
            raise OptionError(f"logits_for must be 'all' or 'masked', got {self.logits_for!r}")
        longest = self.seq_len or self.max_seq_len
        if self.logits_for == "masked" and (
            not _is_int(self.max_masked)
            or self.max_masked < 1
            or (longest is not None and self.max_masked > longest)
        ):
            raise OptionError(
                f"max_masked must be an integer in [1, {longest or 'max_seq_len'}], got "
                f"{self.max_masked!r}"
            )
        if self.mask_token_id is not None and (
            not _is_int(self.mask_token_id) or self.mask_token_id < 0
        ):
            raise OptionError(
                f"mask_token_id must be a non-negative token id, got {self.mask_token_id!r}"
            )
        if self.precision not in PRECISIONS:
            raise OptionError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if not (self.passes is None or isinstance(self.passes, (str, Sequence))):
            raise OptionError(
                f"passes must be 'default', a list of passes or () for none, got "
                f"{type(self.passes).__name__}"
            )

    @classmethod
    def pick(cls, arguments: dict[str, Any]) -> CompileOptions:
        """The options among a function's arguments (``compile`` and ``tune`` pass ``locals()``:
        their keyword parameters are these fields, by name)."""
        return cls(**{n: arguments[n] for n in cls.names()})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in fields(cls))

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of ``compile`` and ``tune``."""
        return {n: getattr(self, n) for n in self.names()}

    def seq_lens(self, max_position_embeddings: int) -> tuple[int, ...]:
        """The sequence lengths to compile, ascending: ``seq_len`` alone, or the standard lengths
        below ``max_seq_len`` (default: ``max_position_embeddings``) and ``max_seq_len`` itself;
        with ``logits_for="masked"``, none shorter than ``max_masked``. OptionError if the
        longest exceeds ``max_position_embeddings``."""
        if self.seq_len is not None:
            name, longest = "seq_len", self.seq_len
        else:
            name, longest = "max_seq_len", self.max_seq_len or max_position_embeddings
        if longest > max_position_embeddings:
            raise OptionError(
                f"{name}={longest} exceeds the model's max_position_embeddings="
                f"{max_position_embeddings}"
            )
        if self.seq_len is not None:
            return (self.seq_len,)
        shortest = self.max_masked if self.logits_for == "masked" else 1
        return tuple(n for n in SEQ_LENS if shortest <= n < longest) + (longest,)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-ready values (passes by name, the target by name)."""
        passes = self.passes
        if passes is not None and not isinstance(passes, str):
            passes = [getattr(p, "name", getattr(p, "__name__", p)) for p in passes]
        target = self.target if isinstance(self.target, str) else getattr(self.target, "name", "")
        return {**self.kwargs(), "passes": passes, "target": target}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_shape(seq_len: Any, batch_size: Any, num_choices: Any) -> None:
    """The compiled shape's numbers are positive integers (OptionError names the one that is not)."""
    if not _is_int(seq_len) or seq_len < 1:
        raise OptionError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise OptionError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_choices is not None and (not _is_int(num_choices) or num_choices < 1):
        raise OptionError(f"num_choices must be a positive integer, got {num_choices!r}")

