"""What a capture hands the passes: the Relax module, its signature and the model's config."""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from mbcompile.signature import Signature

# Choices per question of a multiple-choice model compiled without ``num_choices``.
DEFAULT_NUM_CHOICES = 4


@dataclass
class Captured:
    mod: tvm.IRModule
    signature: Signature
    config: dict
