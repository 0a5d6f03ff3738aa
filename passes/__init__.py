"""MobileBERT graph rewrites on the Relax module imported from torch.export.

Each pass is one file named verb + object; ``DEFAULT_PASSES`` is the order they run in. The
invariants they rely on and what each guarantees are in ``passes/README.md``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .base import MobileBertPass, count_matmuls, registered_passes
from .fold_attention_scale import FoldAttentionScale
from .fold_no_norm import FoldNoNorm
from .fuse_attention import FuseAttention
from .merge_shared_input_linears import MergeSharedInputLinears
from .prune_masked_lm_head import PruneMaskedLMHead
from .remove_layout_noise import RemoveLayoutNoise
from .remove_linear_reshapes import RemoveLinearReshapes

DEFAULT_PASSES: tuple[type[MobileBertPass], ...] = (
    # Fold constants into weights while every linear is still on its own.
    FoldNoNorm,
    FoldAttentionScale,
    # Then widen: linears reading one tensor become one matmul and column slices.
    MergeSharedInputLinears,
    # Linears run on the N-D activation (no reshape pair), so bias, activation and residual
    # NoNorm fuse into the matmul kernel; then the reshapes and permutes left cancelling go.
    RemoveLinearReshapes,
    RemoveLayoutNoise,
    # Last, the attention core (scores, mask, guarded softmax, · V) becomes one kernel.
    FuseAttention,
)


def resolve_passes(
    spec: str | Iterable[MobileBertPass | type[MobileBertPass] | str] | None,
) -> list[MobileBertPass]:
    """Pass instances from ``"default"``, ``None``/``()`` (no passes) or a list of pass
    instances, classes or names."""
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec == "default":
            return [cls() for cls in DEFAULT_PASSES]
        spec = [spec]
    known = registered_passes()
    passes: list[MobileBertPass] = []
    for item in spec:
        if isinstance(item, MobileBertPass):
            passes.append(item)
        elif isinstance(item, type) and issubclass(item, MobileBertPass):
            passes.append(item())
        elif isinstance(item, str) and item in known:
            passes.append(known[item]())
        else:
            raise ValueError(
                f"Unknown pass {item!r}; known: {sorted(known)} (or 'default' for "
                f"{[cls.name for cls in DEFAULT_PASSES]})"
            )
    return passes


__all__ = [
    "DEFAULT_PASSES",
    "FoldAttentionScale",
    "FoldNoNorm",
    "FuseAttention",
    "MergeSharedInputLinears",
    "MobileBertPass",
    "PruneMaskedLMHead",
    "RemoveLayoutNoise",
    "RemoveLinearReshapes",
    "count_matmuls",
    "resolve_passes",
]
