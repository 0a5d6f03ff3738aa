"""The output object: Hugging Face ModelOutput's field names and order, by attribute or key."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class ModelOutput(OrderedDict):
    """An ordered mapping of output names to arrays (numpy or torch, like the inputs).

    As with transformers' ModelOutput: ``out.start_logits``, ``out["start_logits"]``, ``out[0]``
    and ``out.to_tuple()`` all work; tuple fields (``hidden_states``) hold tuples of arrays.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"this output has no field {name!r}; fields: {list(self.keys())}"
            ) from None

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __repr__(self) -> str:
        parts = []
        for name, value in self.items():
            shape = getattr(value, "shape", None)
            desc = f"shape={tuple(shape)}" if shape is not None else f"{len(value)} arrays"
            parts.append(f"{name}: {desc}")
        return f"ModelOutput({', '.join(parts)})"
