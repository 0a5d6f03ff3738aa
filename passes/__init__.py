"""MobileBERT graph rewrites on the Relax module imported from torch.export.

Each pass is one file named verb + object; ``DEFAULT_PASSES`` is the order they run in. The
invariants they rely on and what each guarantees are in ``passes/README.md``.
"""

from __future__ import annotations

# This folder is installed as mbcompile.passes (pyproject.toml, package-dir). Imported under
# another name (``import passes`` from the repository root) it would load a second copy of every
# pass class and a second pass registry, so that isinstance checks and pass names disagree.
if __name__ != "mbcompile.passes":
    raise ImportError(
        f"import mbcompile.passes, not {__name__}: the passes/ folder is installed as "
        "mbcompile.passes, and a second name would load a second pass registry. Install the "
        "project (pip install -e .) and write `from mbcompile.passes import ...`."
    )

from collections.abc import Iterable

from mbcompile.cpu import TargetLike
from mbcompile.errors import OptionError
from mbcompile.passes.base import MobileBertPass, registered_passes
from mbcompile.passes.count import count_matmuls, fused_attention_calls
from mbcompile.passes.fold_attention_mask_rows import FoldAttentionMaskRows
from mbcompile.passes.fold_attention_scale import FoldAttentionScale
from mbcompile.passes.fold_no_norm import FoldNoNorm
from mbcompile.passes.fuse_attention import FuseAttention
from mbcompile.passes.merge_shared_input_linears import MergeSharedInputLinears
from mbcompile.passes.prune_masked_lm_head import PruneMaskedLMHead
from mbcompile.passes.remove_layout_noise import RemoveLayoutNoise
from mbcompile.passes.remove_linear_reshapes import RemoveLinearReshapes

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
    # A mask the same for every query becomes one row (not Sq rows read per head and layer);
    # last, the attention core (scores, mask, guarded softmax, · V) becomes one kernel.
    FoldAttentionMaskRows,
    FuseAttention,
)


def resolve_passes(
    spec: str | Iterable[MobileBertPass | type[MobileBertPass] | str] | None,
    *,
    target: TargetLike | None = None,
) -> list[MobileBertPass]:
    """Pass instances from ``"default"``, ``None``/``()`` (no passes) or a list of pass
    instances, classes or names.

    Classes and names are instantiated here, those that emit kernels (``takes_target``, e.g.
    FuseAttention) with ``target=target``; instances are used as they are.
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec == "default":
            return [_instantiate(cls, target) for cls in DEFAULT_PASSES]
        spec = [spec]
    known = registered_passes()
    passes: list[MobileBertPass] = []
    for item in spec:
        if isinstance(item, MobileBertPass):
            passes.append(item)
        elif isinstance(item, type) and issubclass(item, MobileBertPass):
            passes.append(_instantiate(item, target))
        elif isinstance(item, str) and item in known:
            passes.append(_instantiate(known[item], target))
        else:
            raise OptionError(
                f"Unknown pass {item!r}; known: {sorted(known)} (or 'default' for "
                f"{[cls.name for cls in DEFAULT_PASSES]})"
            )
    return passes


def _instantiate(cls: type[MobileBertPass], target: TargetLike | None) -> MobileBertPass:
    return cls(target=target) if cls.takes_target else cls()


__all__ = [
    "DEFAULT_PASSES",
    "FoldAttentionMaskRows",
    "FoldAttentionScale",
    "FoldNoNorm",
    "FuseAttention",
    "MergeSharedInputLinears",
    "MobileBertPass",
    "PruneMaskedLMHead",
    "RemoveLayoutNoise",
    "RemoveLinearReshapes",
    "count_matmuls",
    "fused_attention_calls",
    "resolve_passes",
]
