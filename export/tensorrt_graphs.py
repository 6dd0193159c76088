"""The graphs a TensorRT build parses, derived from a bundle's own graphs (which stay what onnxruntime runs).

A bundle keeps the form onnxruntime runs; TensorRT needs a few changes, made on a copy written to another file:

- **Attention mask** of the step graph (``attention_mask``): ``key`` feeds each ``Attention`` node the key-only
  ``[B, 1, 1, S_kv]`` source of its mask (S times smaller); ``full`` keeps the ``[B, 1, S_q, S_kv]`` broadcast the
  bundle carries, the mask shape NVIDIA documents for ``IAttention`` (``[a0, a1, s_q, s_kv]``, only a0/a1
  broadcast). Or the plugin node (``attention="plugin"``, unidg.export.plugins.onnx_rewrite).
- **``TRT_decomposable = 1``** on every ``Attention`` node (``decomposable``): TensorRT's ONNX importer makes the
  attention layer non-decomposable unless the node carries it, so a build with no matching fused kernel fails instead
  of falling back to MatMul/Softmax/MatMul. The attribute is TensorRT's own: ``onnx.checker`` rejects it, so the
  file is checked with the attribute stripped (the only difference) and then written with it.
- **Elementwise RoPE** (``elementwise_rope``): the ONNX ``RotaryEmbedding`` nodes of the step graphs
  (``unidg.export.lowered_flux``, ``--rope op``) become the Mul/Sub/Add rotation they define, so a TensorRT whose
  ONNX parser lacks the operator builds the same graph (TensorRT fuses the pointwise chain either way).
- **fp32 ``Resize``**: TensorRT has no bf16 ``Resize`` in strongly typed networks, so every bf16 ``Resize`` gets its
  data input cast to fp32 and its output cast back (what NVIDIA's demo/Diffusion does around the VAE upsamplers).
  In nearest mode (the VAE decoder's three upsamplers) the result is bit-identical: bf16 -> fp32 -> bf16 is exact.

Weights are never loaded: external-data files are hard-linked beside the derived graph (copied where the filesystem
cannot link), so the source bundle is only read.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from unidg.export.plugins.onnx_rewrite import (
    ATTENTION_OP,
    ONNX_DOMAINS,
    attention_mask_shapes,
    check_rewritten_model,
    count_plugin_nodes,
    external_data_files,
    rewrite_attention_to_key_mask,
    rewrite_attention_to_plugin,
)

ATTENTION_MASKS = ("key", "full")
DECOMPOSABLE_ATTRIBUTE = "TRT_decomposable"
RESIZE_OP = "Resize"
ROTARY_OP = "RotaryEmbedding"
# Element types TensorRT resizes only in fp32 in strongly typed networks.
FP32_RESIZE_TYPES = (onnx.TensorProto.BFLOAT16,)


@dataclass(frozen=True)
class GraphDerivation:
    """What changes between a bundle graph and the graph TensorRT parses."""

    attention: str | None = None  # step graph: "native" (opset-23 Attention) or "plugin"; None: leave attention
    attention_mask: str = "key"  # native step attention: "key" [B, 1, 1, S] or "full" [B, 1, S, S]
    decomposable: bool = False  # TRT_decomposable = 1 on every Attention node
    fp32_resize: bool = True  # cast bf16 Resize to fp32
    elementwise_rope: bool = True  # RotaryEmbedding nodes as Mul/Sub/Add

    def changes(self, model: onnx.ModelProto, attention_form: str | None) -> bool:
        """Would deriving change ``model`` (a graph whose step attention form is ``attention_form``)?"""
        if self.attention == "plugin":
            return True
        if self.attention == "native" and self.attention_mask == "key" and attention_form != "fold":
            return True
        if self.decomposable and any(_is_attention(n) for n in model.graph.node):
            return True
        if self.elementwise_rope and any(_is_rotary(n) for n in model.graph.node):
            return True
        return self.fp32_resize and bool(low_precision_resizes(model))

    def suffix(self) -> str:
        """File-name part that tells derived graphs apart (``step.native.onnx``, ``vae_decoder.trt.onnx``)."""
        parts = []
        if self.attention == "plugin":
            parts.append("plugin")
        elif self.attention == "native":
            parts.append("native" if self.attention_mask == "key" else "native-full")
        if self.decomposable:
            parts.append("decomposable")
        return "-".join(parts) or "trt"


def _is_attention(node: onnx.NodeProto) -> bool:
    return node.op_type == ATTENTION_OP and node.domain in ONNX_DOMAINS


def _is_rotary(node: onnx.NodeProto) -> bool:
    return node.op_type == ROTARY_OP and node.domain in ONNX_DOMAINS


def rotary_to_elementwise(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every ``RotaryEmbedding`` node (the form ``LoweredFlux`` writes: 4-D input
    ``[B, H, S, d]``, interleaved pairs, caches ``[B, S, d/2]``, no position ids) as the rotation it defines:
    ``(a, b) -> (a cos - b sin, b cos + a sin)`` on each pair; (model, count). Other forms are refused by name."""
    out = copy.deepcopy(model)
    if not any(_is_rotary(node) for node in out.graph.node):
        return out, 0
    make, nodes, count = onnx.helper.make_node, [], 0
    constants = {
        "rope/pairs": [0, 0, 0, -1, 2],  # [B, H, S, d] -> [B, H, S, d/2, 2]; 0 keeps a dimension
        "rope/flat": [0, 0, 0, -1],
        "rope/cache_axes": [1, 4],  # [B, S, d/2] -> [B, 1, S, d/2, 1]
    }
    for name, values in constants.items():
        out.graph.initializer.append(onnx.numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    caches: dict[str, str] = {}
    for node in out.graph.node:
        if not _is_rotary(node):
            nodes.append(node)
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input)
        position_ids = len(inputs) > 3 and bool(inputs[3])
        if (
            attributes.get("interleaved") != 1
            or attributes.get("rotary_embedding_dim", 0)
            or attributes.get("num_heads", 0)
            or position_ids
        ):
            raise ValueError(
                f"RotaryEmbedding node {node.name!r}: only the 4-D interleaved form without position ids or partial "
                f"rotation is rewritten (attributes {attributes}); export the bundle with --rope elementwise"
            )
        x, cos, sin = inputs[:3]
        prefix = f"{node.name or f'rotary_{count}'}/"
        for cache in (cos, sin):
            if cache not in caches:
                caches[cache] = f"{cache}/pairs"
                nodes.append(make("Unsqueeze", [cache, "rope/cache_axes"], [caches[cache]], f"{cache}/unsqueeze"))
        pairs, even, odd = prefix + "pairs", prefix + "even", prefix + "odd"
        nodes.append(make("Reshape", [x, "rope/pairs"], [pairs], prefix + "to_pairs"))
        nodes.append(make("Split", [pairs], [even, odd], prefix + "split", axis=-1, num_outputs=2))
        products = {}
        for part in (even, odd):
            for cache in (cos, sin):
                products[part, cache] = f"{part}*{cache}"
                nodes.append(make("Mul", [part, caches[cache]], [products[part, cache]], f"{part}/mul_{cache}"))
        rotated_even, rotated_odd = prefix + "rotated_even", prefix + "rotated_odd"
        nodes.append(make("Sub", [products[even, cos], products[odd, sin]], [rotated_even], prefix + "sub"))
        nodes.append(make("Add", [products[odd, cos], products[even, sin]], [rotated_odd], prefix + "add"))
        joined = prefix + "joined"
        nodes.append(make("Concat", [rotated_even, rotated_odd], [joined], prefix + "concat", axis=-1))
        nodes.append(make("Reshape", [joined, "rope/flat"], [node.output[0]], prefix + "from_pairs"))
        count += 1
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, count


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every named value (inferred; initializers with external data need not be loaded)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    return types


def low_precision_resizes(model: onnx.ModelProto) -> list[str]:
    """Names of the ``Resize`` nodes whose data input is bf16."""
    types = value_types(model)
    return [
        node.name
        for node in model.graph.node
        if node.op_type == RESIZE_OP and types.get(node.input[0]) in FP32_RESIZE_TYPES
    ]


def cast_resize_to_fp32(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every bf16 ``Resize`` computed in fp32 (Cast in, Cast back out); (model, count)."""
    types = value_types(model)
    out = copy.deepcopy(model)
    nodes, count = [], 0
    for node in out.graph.node:
        elem = types.get(node.input[0]) if node.op_type == RESIZE_OP else None
        if elem not in FP32_RESIZE_TYPES:
            nodes.append(node)
            continue
        name = node.name or f"resize_{count}"
        data_fp32, result_fp32, result = f"{name}/input_fp32", f"{name}/output_fp32", node.output[0]
        nodes.append(
            onnx.helper.make_node("Cast", [node.input[0]], [data_fp32], f"{name}/cast_fp32", to=onnx.TensorProto.FLOAT)
        )
        node.input[0] = data_fp32
        node.output[0] = result_fp32
        nodes.append(node)
        nodes.append(onnx.helper.make_node("Cast", [result_fp32], [result], f"{name}/cast_back", to=elem))
        count += 1
    del out.graph.node[:]
    out.graph.node.extend(nodes)  # the Resize output keeps its name and bf16 type (now the Cast back's)
    return out, count


def set_decomposable(model: onnx.ModelProto, value: int = 1) -> int:
    """Set ``TRT_decomposable`` on every top-level Attention node of ``model`` (in place); returns the count."""
    count = 0
    for node in model.graph.node:
        if not _is_attention(node):
            continue
        kept = [a for a in node.attribute if a.name != DECOMPOSABLE_ATTRIBUTE]
        del node.attribute[:]
        node.attribute.extend(kept + [onnx.helper.make_attribute(DECOMPOSABLE_ATTRIBUTE, value)])
        count += 1
    return count


def without_tensorrt_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the TensorRT-only ``TRT_decomposable`` attribute (what onnx.checker can validate)."""
    out = copy.deepcopy(model)
    for node in out.graph.node:
        kept = [a for a in node.attribute if a.name != DECOMPOSABLE_ATTRIBUTE]
        del node.attribute[:]
        node.attribute.extend(kept)
    return out


def tensorrt_graph_census(model: onnx.ModelProto) -> dict:
    """What a TensorRT build of ``model`` meets: Resize element types (in -> out), Attention mask shapes, the
    decomposable attribute of each Attention node, and the plugin-node count."""
    types = value_types(model)
    name = {number: onnx.TensorProto.DataType.Name(number) for number in onnx.TensorProto.DataType.values()}
    resizes = [
        f"{name.get(types.get(n.input[0]), '?')}->{name.get(types.get(n.output[0]), '?')}"
        for n in model.graph.node
        if n.op_type == RESIZE_OP
    ]
    decomposable = []
    for node in model.graph.node:
        if _is_attention(node):
            values = [onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == DECOMPOSABLE_ATTRIBUTE]
            decomposable.append(values[0] if values else None)
    return {
        "resize": resizes,
        "bf16_resize": sum(1 for r in resizes if r.startswith("BFLOAT16")),
        "attention_masks": attention_mask_shapes(without_tensorrt_attributes(model)),
        "decomposable": decomposable,
        "plugin_nodes": count_plugin_nodes(model),
        "rotary_nodes": sum(1 for node in model.graph.node if _is_rotary(node)),
    }


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` at ``target`` (copy across filesystems); the source file is never written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and os.path.samefile(source, target):
        return
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def derive_graph_model(
    original: onnx.ModelProto, derivation: GraphDerivation, attention_form: str | None = None
) -> onnx.ModelProto:
    """The TensorRT form of one bundle graph (in memory; external data stays referenced, not loaded)."""
    model = original
    if derivation.attention == "plugin":
        model, _ = rewrite_attention_to_plugin(model)
        check_rewritten_model(original, model, run_checker=False)
    elif derivation.attention == "native" and derivation.attention_mask == "key" and attention_form != "fold":
        model, _ = rewrite_attention_to_key_mask(model)
    if derivation.elementwise_rope:
        model, _ = rotary_to_elementwise(model)
    if derivation.fp32_resize:
        model, _ = cast_resize_to_fp32(model)
    else:
        model = copy.deepcopy(model)
    if derivation.decomposable:
        set_decomposable(model)
    return model


def derive_graph_file(
    source: str | os.PathLike, target: str | os.PathLike, derivation: GraphDerivation, attention_form: str | None = None
) -> dict:
    """Write the TensorRT form of the graph file ``source`` to ``target`` (another file, never ``source``);
    returns its census. The graph is checked with onnx.checker and strict shape inference with the TensorRT-only
    attribute stripped; external data is linked beside ``target``."""
    source, target = Path(source), Path(target)
    if target.resolve() == source.resolve():
        raise ValueError(f"the TensorRT graph must go to another file than its source {source}")
    original = onnx.load(str(source), load_external_data=False)
    model = derive_graph_model(original, derivation, attention_form)
    checkable = without_tensorrt_attributes(model)
    onnx.checker.check_model(checkable)
    onnx.shape_inference.infer_shapes(checkable, check_type=True, strict_mode=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.parent.resolve() != source.parent.resolve():
        for name in external_data_files(original):
            link_or_copy(source.parent / name, target.parent / name)
    tmp = target.with_name(target.name + ".tmp")
    try:
        onnx.save_model(model, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return tensorrt_graph_census(model)
