"""The backends under test, each built once and then called with the same inputs.

Every backend is a function ``run(ids, mask, types) -> list[np.ndarray]`` returning the outputs
(first output first) so that results can be checked against PyTorch eager in the same run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch

Runner = Callable[[np.ndarray, np.ndarray, np.ndarray], list]


class _Flat(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            return_dict=True,
        )
        return tuple(v for v in out.values() if isinstance(v, torch.Tensor))


def _numpy(outs) -> list[np.ndarray]:
    return [o.detach().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outs]


def torch_eager(model) -> Runner:
    flat = _Flat(model).eval()

    def run(ids, mask, types):
        with torch.inference_mode():
            return _numpy(flat(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types)))

    return run


def torch_compile(model) -> Runner:
    compiled = torch.compile(_Flat(model).eval())

    def run(ids, mask, types):
        with torch.inference_mode():
            return _numpy(compiled(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types)))

    return run


def _onnx_export(model, example, workdir: str | None, dynamic: bool) -> tuple[str, str]:
    """``torch.onnx.export`` to ``workdir/model.onnx``; returns ``(workdir, path)``."""
    workdir = workdir or tempfile.mkdtemp(prefix="mbcompile-bench-")
    path = os.path.join(workdir, "model.onnx")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad():
        torch.onnx.export(
            _Flat(model).eval(), tuple(torch.from_numpy(a) for a in example), path,
            input_names=names, dynamo=False, opset_version=17,
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in names} if dynamic else None,
        )
    return workdir, path


def onnxruntime(model, example, threads: int, int8: bool = False, workdir: str | None = None,
                dynamic: bool = False) -> Runner:
    """ONNX Runtime on ``torch.onnx.export``'s graph; ``dynamic``: batch and length axes dynamic
    (one session for every shape, as a user serving varied texts would export it); ``int8``:
    ``quantize_dynamic`` with int8 weights per output channel."""
    import onnxruntime as ort

    workdir, path = _onnx_export(model, example, workdir, dynamic)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        qpath = os.path.join(workdir, "model.int8.onnx")
        quantize_dynamic(path, qpath, weight_type=QuantType.QInt8, per_channel=True)
        path = qpath
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(ids, mask, types):
        return session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})

    return run


def openvino(model, example, threads: int, precision: str | None = None,
             workdir: str | None = None) -> Runner:
    """OpenVINO CPU (latency hint) on the same ONNX export as ``onnxruntime``, batch and length
    axes dynamic. ``precision``: None leaves OpenVINO's default (bf16 on CPUs with native bf16),
    "f32" forces fp32. The returned runner's ``precision`` attribute is the inference precision
    read back from the compiled model ("bf16", "f32", ...)."""
    import openvino as ov

    _, path = _onnx_export(model, example, workdir, dynamic=True)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(path, "CPU", config)
    request = compiled.create_infer_request()

    def run(ids, mask, types):
        out = request.infer({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        return [out[o] for o in compiled.outputs]

    run.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return run


def mbcompiled(compiled) -> Runner:
    def run(ids, mask, types):
        out = compiled(ids, mask, types, return_dict=True)
        return [v for v in out.values() if isinstance(v, np.ndarray)]

    return run
