"""What a compiled model takes and returns: plain data, saved in the artifact (no torch needed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class OutputSpec:
    """One tensor the compiled function returns.

    ``name`` is the Hugging Face ModelOutput field; tuple fields (``hidden_states``,
    ``attentions``) are flattened and carry their position in ``index``. ``seq_axes`` are the axes
    whose length is the sequence length: they are cut back when a shorter input was padded.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    seq_axes: tuple[int, ...] = ()
    index: int | None = None
    # With logits_for="masked": the axis of the masked positions (cut to the batch's largest count).
    masked_axis: int | None = None


@dataclass(frozen=True)
class Signature:
    """Static input and output description of one compiled MobileBERT."""

    model_class: str
    head: str
    batch_size: int
    seq_len: int
    num_choices: int | None
    vocab_size: int
    type_vocab_size: int
    outputs: tuple[OutputSpec, ...] = field(default_factory=tuple)
    # ModelOutput field names in order; a tuple field may hold no tensors (e.g. ``attentions``
    # under SDPA attention), so it has no OutputSpec and comes back as ().
    fields: tuple[str, ...] = ()
    # logits_for="masked": vocabulary logits only at (up to max_masked) positions of mask_token_id.
    max_masked: int | None = None
    mask_token_id: int | None = None
    # The compiled main takes each row's real length (``lengths``, int64 of the input shape
    # without its last axis) after the three inputs: positions past it are padding that must not
    # change the outputs. False in artifacts made before it existed.
    takes_lengths: bool = False
    # Every sequence length compiled, ascending, the last ``seq_len``: an input runs the
    # shortest that fits (``function_for``). () for one length (and in artifacts made before).
    seq_lens: tuple[int, ...] = ()

    @property
    def lengths(self) -> tuple[int, ...]:
        """The compiled sequence lengths, ascending (the last is ``seq_len``)."""
        return self.seq_lens or (self.seq_len,)

    @property
    def length_option(self) -> str:
        """The compile option that set the longest length, for messages."""
        return "max_seq_len" if self.seq_lens else "seq_len"

    def fitting_length(self, n: int) -> int:
        """The shortest compiled length that holds ``n`` tokens (``n`` ≤ ``seq_len``)."""
        return next(length for length in self.lengths if length >= n)

    @staticmethod
    def function_name(length: int, longest: int) -> str:
        """The library function for ``length`` tokens: ``main`` for the longest."""
        return "main" if length == longest else f"seq_{length}"

    def function_for(self, length: int) -> str:
        return self.function_name(length, self.seq_len)

    def input_shape_for(self, length: int) -> tuple[int, ...]:
        return self.input_shape[:-1] + (length,)

    def output_shape_for(self, spec: OutputSpec, length: int) -> tuple[int, ...]:
        """``spec``'s shape from the function for ``length`` tokens."""
        return tuple(
            length if axis in spec.seq_axes and n == self.seq_len else n
            for axis, n in enumerate(spec.shape)
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.num_choices is None:
            return (self.batch_size, self.seq_len)
        return (self.batch_size, self.num_choices, self.seq_len)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The compiled ``main``'s parameters, in order."""
        names = INPUT_NAMES + (("lengths",) if self.takes_lengths else ())
        return names + (("masked_positions",) if self.max_masked is not None else ())

    @property
    def output_names(self) -> tuple[str, ...]:
        """Field names in Hugging Face order."""
        return self.fields

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Signature:
        outputs = tuple(
            OutputSpec(
                name=o["name"],
                shape=tuple(o["shape"]),
                dtype=o["dtype"],
                seq_axes=tuple(o["seq_axes"]),
                index=o.get("index"),
                masked_axis=o.get("masked_axis"),
            )
            for o in data["outputs"]
        )
        rest = {k: v for k, v in data.items() if k not in ("outputs", "fields", "seq_lens")}
        return cls(
            outputs=outputs,
            fields=tuple(data["fields"]),
            seq_lens=tuple(data.get("seq_lens", ())),
            **rest,
        )
