"""A fluent helper for pass tests (after ExecuTorch's ``Tester``).

    Tester.from_model(tiny_model("MobileBertModel")).run_passes([FoldNoNorm()])
        .check_fired("FoldNoNorm").check_matches_eager()

    Tester(Before).run_passes([FoldNoNorm()]).check_fired("FoldNoNorm", 1)
        .check_structurally_equal(Expected).check_matches_unpassed()
"""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax

from mbcompile.passes import MobileBertPass, count_matmuls, resolve_passes
from mbcompile.targets.pipeline import build_pipeline

TOL = 1e-4  # max abs error, fp32
SEQ = 8

# MobileBERT's shape family, small: capture ≈ 2 s and build ≈ 4 s on 2 cores.
TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "embedding_size": 16,
    "intra_bottleneck_size": 16,
    "num_attention_heads": 2,
    "intermediate_size": 24,
    "num_hidden_layers": 1,
    "max_position_embeddings": 32,
    "num_feedforward_networks": 2,
    "initializer_range": 0.2,  # activations of order one, so 1e-4 means something
}

# llvm opt-level 0 builds ~40% faster; the passes change the graph, not the code LLVM emits.
TARGET = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2, "opt-level": 0}


def tiny_config(**overrides):
    from transformers import MobileBertConfig

    return MobileBertConfig(**{**TINY, **overrides})


def tiny_model(class_name: str = "MobileBertModel", seed: int = 0, **overrides):
    """A seeded tiny model whose NoNorm γ/β and biases are not HF's ones and zeros (which
    would make folding them trivially right)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif param.ndim == 1:  # NoNorm / LayerNorm scale
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model


def model_inputs(config, seq_len: int = SEQ, pad: int = 3, seed: int = 1):
    """Ids in range, a mask with ``pad`` zeros at the end, two segments."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=gen)
    mask = torch.ones(1, seq_len, dtype=torch.long)
    mask[0, seq_len - pad :] = 0
    types = torch.zeros(1, seq_len, dtype=torch.long)
    types[0, seq_len // 2 :] = 1
    return ids, mask, types


def random_args(func: relax.Function, seed: int = 0, high: int = 4) -> list[np.ndarray]:
    """Random arrays for every parameter of ``func`` (ints in ``[0, high)``)."""
    rng = np.random.default_rng(seed)
    args = []
    for param in func.params:
        shape = tuple(int(d) for d in param.ty.shape.values)
        dtype = str(param.ty.dtype)
        if dtype.startswith("int"):
            args.append(rng.integers(0, high, shape).astype(dtype))
        else:
            args.append(rng.standard_normal(shape).astype(dtype))
    return args


def bind(mod: tvm.IRModule, **params: np.ndarray) -> tvm.IRModule:
    """``mod`` with the named parameters of ``main`` bound as constants (weights)."""
    return relax.transform.BindParams("main", params)(mod)


def run(mod: tvm.IRModule, args) -> list[np.ndarray]:
    """Build ``mod`` with the CPU pipeline and run ``main`` on numpy ``args``."""
    target = tvm.target.Target(TARGET)
    executable = tvm.compile(mod, target=target, relax_pipeline=build_pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args))
    outs = [out] if hasattr(out, "numpy") else list(out)
    return [o.numpy() for o in outs]


def max_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    assert len(got) == len(want)
    worst = 0.0
    for a, b in zip(got, want):
        assert a.shape == b.shape, (a.shape, b.shape)
        worst = max(worst, float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()))
    return worst


class Tester:
    """A module under test, the module after the passes run so far, and what they reported."""

    __test__ = False  # not a pytest test class

    def __init__(self, mod: tvm.IRModule, model=None, signature=None):
        self.original = mod
        self.mod = mod
        self.model = model
        self.signature = signature
        self.fired: dict[str, int] = {}
        self.passes: list[MobileBertPass] = []

    @classmethod
    def from_model(cls, model, seq_len: int = SEQ) -> Tester:
        from mbcompile.capture import capture

        cap = capture(model, seq_len=seq_len)
        return cls(cap.mod, model=model, signature=cap.signature)

    def fresh(self) -> Tester:
        """The same starting module, no passes run (to share one capture between tests)."""
        return Tester(self.original, model=self.model, signature=self.signature)

    def run_passes(self, passes) -> Tester:
        for p in resolve_passes(passes):
            self.mod, fired = p(self.mod)
            self.fired[p.name] = self.fired.get(p.name, 0) + fired
            self.passes.append(p)
        relax.analysis.well_formed(self.mod)  # raises on the first violation
        return self

    def check_fired(self, name: str, times: int | None = None) -> Tester:
        """``name`` fired (exactly ``times`` if given, else at least once)."""
        fired = self.fired.get(name, 0)
        if times is None:
            assert fired > 0, f"{name} did not fire; refusals: {self.refusals(name)}"
        else:
            assert fired == times, f"{name} fired {fired} times, not {times}: {self.refusals(name)}"
        return self

    def check_unchanged(self) -> Tester:
        assert not any(self.fired.values()), self.fired
        assert self.mod.same_as(self.original), "a pass that did not fire returned a new module"
        return self

    def refusals(self, name: str) -> list[str]:
        return [r for p in self.passes if p.name == name for r in p.refusals]

    def check_refused(self, name: str, because: str) -> Tester:
        reasons = self.refusals(name)
        assert any(because in r for r in reasons), f"no refusal mentions {because!r}: {reasons}"
        return self

    def check_structurally_equal(self, expected: tvm.IRModule) -> Tester:
        tvm.ir.assert_structural_equal(self.mod, expected)
        return self

    def check_not(self, op_names: list[str]) -> Tester:
        present = set(ops_in(self.mod))
        for op in op_names:
            assert op not in present, f"{op} is still in main"
        return self

    def check_matmuls(self, count: int) -> Tester:
        assert count_matmuls(self.mod) == count, count_matmuls(self.mod)
        return self

    def check_matches_unpassed(self, args=None, tol: float = TOL) -> Tester:
        """The module after the passes computes what the module before them did."""
        args = random_args(self.original["main"]) if args is None else args
        err = max_error(run(self.mod, args), run(self.original, args))
        assert err <= tol, f"max abs error {err:.3e} > {tol}"
        return self

    def check_matches_eager(self, pad: int = 3, tol: float = TOL) -> Tester:
        """The compiled module equals PyTorch eager on padded, two-segment inputs."""
        config = self.model.config
        ids, mask, types = model_inputs(config, self.signature.seq_len, pad=pad)
        with torch.no_grad():
            ref = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        want = []
        for spec in self.signature.outputs:
            value = ref[spec.name] if spec.index is None else ref[spec.name][spec.index]
            want.append(value.numpy())
        args = [ids.numpy(), mask.numpy(), types.numpy()]
        if self.signature.takes_lengths:  # every row at full length
            args.append(np.full(ids.shape[:-1], ids.shape[-1], dtype=np.int64))
        got = run(self.mod, args)
        err = max_error(got, want)
        assert err <= tol, f"max abs error {err:.3e} > {tol} (passes fired: {self.fired})"
        return self


def ops_in(mod: tvm.IRModule, func: str = "main") -> list[str]:
    """Operator names called in ``func``, in binding order."""
    names = []
    for block in mod[func].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                names.append(value.op.name)
    return names
