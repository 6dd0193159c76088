"""bf16 graphs on onnxruntime's CPU provider, which has no bf16 kernels (MatMul, Add, Softmax refuse to load).

``emulate_bf16`` rewrites a graph that computes in bfloat16 into one that computes in float32 and rounds every
tensor the original holds in bfloat16 to bfloat16 (a ``Cast`` to bfloat16 and back after each op that produces one,
round-to-nearest-even). bf16 initializers become float32 with the same values (exact). That is what a bf16 GPU
kernel with float32 accumulation and a bf16 output does, up to the order of the accumulation; where TensorRT fuses
pointwise ops and keeps the intermediate in float32, the emulation rounds more often than the engine does, so its
error is an upper estimate of the engine's rounding error, not a measurement of the engine.

Used by ``unidg export parity`` on bf16 bundles. The emulated graph is named as such wherever a figure comes from
it ("bf16 emulated in float32").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from unidg.core.errors import UniDGError

BF16 = TensorProto.BFLOAT16
FLOAT = TensorProto.FLOAT
EMULATION_LABEL = "bf16 emulated in float32 (onnxruntime CPU has no bf16 kernels)"


class EmulationError(UniDGError):
    """The graph holds a bf16 construct the emulation does not rewrite."""


def _float_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    values = numpy_helper.to_array(tensor).astype(np.float32)
    return numpy_helper.from_array(values, tensor.name)


def _retype(values) -> None:
    for value in values:
        if value.type.tensor_type.elem_type == BF16:
            value.type.tensor_type.elem_type = FLOAT


def _round_node(source: str, target: str, name: str) -> list[onnx.NodeProto]:
    narrowed = f"{target}__bf16"
    return [
        onnx.helper.make_node("Cast", [source], [narrowed], to=BF16, name=f"{name}__round_bf16"),
        onnx.helper.make_node("Cast", [narrowed], [target], to=FLOAT, name=f"{name}__back_to_fp32"),
    ]


def emulate_bf16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The float32 emulation of ``model`` (a copy) and the number of tensors rounded to bf16 in it."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        value.name: value.type.tensor_type.elem_type
        for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    }
    graph = inferred.graph
    if any(
        attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for attr in n.attribute
    ):
        raise EmulationError(
            "the graph has control-flow subgraphs (If/Loop/Scan); the bf16 emulation does not rewrite them"
        )
    if model.functions:
        raise EmulationError("the graph has local functions; inline them (onnx.inliner) before emulating bf16")

    initializers = [_float_tensor(t) if t.data_type == BF16 else t for t in graph.initializer]
    del graph.initializer[:]
    graph.initializer.extend(initializers)

    nodes: list[onnx.NodeProto] = []
    rounded = 0
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == BF16:
                attr.t.CopyFrom(_float_tensor(attr.t))
            elif (
                attr.name in ("to", "dtype", "output_dtype") and attr.type == onnx.AttributeProto.INT and attr.i == BF16
            ):
                attr.i = FLOAT
        outputs = list(node.output)
        narrowed = [i for i, output in enumerate(outputs) if output and types.get(output) == BF16]
        for i in narrowed:
            node.output[i] = f"{outputs[i]}__fp32"
        nodes.append(node)
        for i in narrowed:
            nodes.extend(_round_node(node.output[i], outputs[i], f"{name}_{i}"))
            rounded += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _retype(graph.input)
    _retype(graph.output)
    del graph.value_info[:]  # stale after the rewrite; onnxruntime infers again
    return inferred, rounded


def emulated_bf16_file(path: str | Path, out: str | Path) -> int:
    """Write the float32 emulation of the graph at ``path`` to ``out`` (one file, weights inline); returns the count
    of tensors rounded to bf16."""
    model = onnx.load(str(path))
    emulated, rounded = emulate_bf16(model)
    # float32 doubles the bf16 weights: past protobuf's 2 GiB limit they go to one external data file.
    external = emulated.ByteSize() > 1 << 30
    onnx.save(emulated, str(out), save_as_external_data=external, location=f"{Path(out).name}.data")
    return rounded
