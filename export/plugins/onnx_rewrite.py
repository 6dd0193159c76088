"""Rewrite portable opset-23 ``Attention`` nodes into the TensorRT biased-attention plugin node.

For every top-level ``Attention`` node (4-D Q/K/V ``[B, H, S, D]``, optional float or bool ``attn_mask``):

- the node becomes ``op_type = "biased_attention"``, ``domain = "unidg"`` with the attributes TensorRT's ONNX parser
  reads for quickly deployable plugins: ``plugin_namespace = "unidg"`` (the parser looks the creator up by op_type +
  namespace), ``plugin_version = "1"``, ``aot = 1`` (use the ahead-of-time implementation, so the kernel is
  embedded in the engine), and ``scale`` (always explicit: the node's ``scale`` or 1/sqrt(D));
- its fourth input becomes the per-key bias ``[B, S_k]`` float32, computed in-graph from ``attn_mask``:
  a mask whose query and head axes have static size 1 (``[B|1, 1, 1, S_k]``, ``[1, S_k]``, ...) is key-only by shape;
  a full ``[B, 1, S_q, S_k]`` mask is traced back through ``Expand``/``Cast``/``Identity`` to such a key-only tensor
  (that is how the exporter broadcasts the key bias for onnxruntime, which rejects ``[B, 1, 1, S]``); a full mask
  that cannot be traced is refused unless ``mask_rows="first_row"``, where the caller asserts all query rows are
  equal and row 0 is used. A bool mask maps True -> 0, False -> -inf. No mask gives a zero bias.
- nodes it cannot express exactly (causal, softcap, past key/value, GQA, 3-D inputs, extra outputs in use) are refused
  with an ``AttentionRewriteError`` naming the node.

``check_rewritten_model`` is the inverse check: onnx.checker and shape inference pass, no ``Attention`` is left, the
plugin-node count equals the original ``Attention`` count, each plugin output has Q's shape, each bias is
``[B, S_k]``, and the graph outputs are unchanged.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from unidg.core.errors import UniDGError
from unidg.export.plugins.trt_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

ATTENTION_OP = "Attention"
ONNX_DOMAINS = ("", "ai.onnx")
MASK_ROW_POLICIES = ("key_only", "first_row")
_PASS_THROUGH_OPS = ("Expand", "Cast", "Identity")


class AttentionRewriteError(UniDGError):
    """An Attention node (or the model) cannot be rewritten exactly into the plugin node."""


@dataclass(frozen=True)
class RewrittenAttention:
    attention_node: str
    plugin_node: str
    scale: float
    bias_source: str  # how the per-key bias was derived from the mask


@dataclass(frozen=True)
class RewriteReport:
    attention_nodes_before: int
    plugin_nodes_after: int
    attention_nodes_after: int
    rewritten: tuple[RewrittenAttention, ...]


def plugin_node_attributes(scale: float) -> dict[str, object]:
    """Attributes of the plugin node (as TensorRT's ONNX parser expects them for an AOT quickly deployable plugin)."""
    return {
        "plugin_namespace": PLUGIN_NAMESPACE,
        "plugin_version": PLUGIN_VERSION,
        "aot": 1,
        "scale": float(scale),
    }


def _is_attention(node) -> bool:
    return node.op == ATTENTION_OP and (node.domain or "") in ONNX_DOMAINS


def _is_plugin(node) -> bool:
    return node.op == PLUGIN_NAME and node.domain == PLUGIN_NAMESPACE


def count_attention_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == ATTENTION_OP and n.domain in ONNX_DOMAINS)


def count_plugin_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == PLUGIN_NAME and n.domain == PLUGIN_NAMESPACE)


def elem_type(dtype) -> int | None:
    """ONNX element type of an onnx-graphsurgeon tensor dtype: a numpy dtype, or the ONNX type number itself for
    types numpy lacks (bf16 is 16, the FP8 types 17-20), which is how onnx-graphsurgeon keeps them."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _is_static_one(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and int(dim) == 1


def is_key_only_shape(shape) -> bool:
    """True when a mask of this (inferred) shape can only vary along the key axis (and the batch axis of a 4-D mask)."""
    if shape is None or not 1 <= len(shape) <= 4:
        return False
    if len(shape) == 4:
        middle = shape[1:3]
    else:
        middle = shape[:-1]
    return all(_is_static_one(d) for d in middle)


class _Rewriter:
    def __init__(self, graph: gs.Graph, mask_rows: str) -> None:
        self.graph = graph
        self.mask_rows = mask_rows
        self.graph_outputs = {t.name for t in graph.outputs}
        # One bias per (mask, batch, key count): the 57 attentions of a FLUX step share one key bias.
        self.bias_cache: dict[tuple, tuple[gs.Variable, str]] = {}

    def const(self, name: str, values, dtype=np.int64) -> gs.Constant:
        return gs.Constant(name, np.asarray(values, dtype=dtype))

    def op(self, op: str, name: str, inputs: list, attrs: dict | None = None, dtype=None, shape=None) -> gs.Variable:
        out = gs.Variable(f"{name}_out", dtype=dtype, shape=shape)
        self.graph.nodes.append(gs.Node(op=op, name=name, inputs=inputs, outputs=[out], attrs=attrs or {}))
        return out

    def check_supported(self, node) -> None:
        attrs = node.attrs
        problems = []
        if int(attrs.get("is_causal", 0)) != 0:
            problems.append("is_causal=1 (the plugin has a per-key bias, no causal mask)")
        if float(attrs.get("softcap", 0.0)) != 0.0:
            problems.append("softcap")
        for index, what in ((4, "past_key"), (5, "past_value")):
            if len(node.inputs) > index and node.inputs[index].name:
                problems.append(f"{what} input (KV cache)")
        for index, out in enumerate(node.outputs[1:], start=1):
            if out.name and (out.outputs or out.name in self.graph_outputs):
                problems.append(f"output {index} ({out.name}) is used")
        q, k, v = node.inputs[:3]
        for name, t in (("Q", q), ("K", k), ("V", v)):
            if t.shape is None or len(t.shape) != 4:
                problems.append(f"{name} is not 4-D [B, H, S, D] (shape {t.shape}); export with 4-D attention")
        if not problems:
            if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
                problems.append(f"K/V heads {k.shape[1]}/{v.shape[1]} differ from Q heads {q.shape[1]} (GQA)")
            if v.shape[3] != q.shape[3] or k.shape[3] != q.shape[3]:
                problems.append("Q, K and V head sizes differ")
        if problems:
            raise AttentionRewriteError(f"Attention node {node.name!r} cannot become the plugin: {'; '.join(problems)}")

    def scale_of(self, node) -> float:
        if "scale" in node.attrs and node.attrs["scale"] is not None:
            return float(node.attrs["scale"])
        head_dim = node.inputs[0].shape[3]
        if not isinstance(head_dim, (int, np.integer)):
            raise AttentionRewriteError(
                f"Attention node {node.name!r} has no scale attribute and a dynamic head size; export with a static D"
            )
        return 1.0 / math.sqrt(int(head_dim))

    def trace_key_only(self, mask: gs.Tensor) -> tuple[gs.Tensor, str] | None:
        tensor, hops = mask, []
        while True:
            if is_key_only_shape(tensor.shape):
                return tensor, "key-only mask" if not hops else "key-only mask through " + " <- ".join(hops)
            producers = tensor.inputs
            if len(producers) != 1 or producers[0].op not in _PASS_THROUGH_OPS:
                return None
            hops.append(producers[0].op)
            tensor = producers[0].inputs[0]

    def key_bias(self, node, prefix: str) -> tuple[gs.Variable, str]:
        q, k = node.inputs[0], node.inputs[1]
        mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        if q.shape[0] is None or k.shape[2] is None:  # unknown dims: cannot prove two nodes' biases are alike
            return self.build_key_bias(node, mask, prefix)
        cache_key = (mask.name if mask is not None else None, q.shape[0], k.shape[2])
        if cache_key not in self.bias_cache:
            self.bias_cache[cache_key] = self.build_key_bias(node, mask, prefix)
        return self.bias_cache[cache_key]

    def build_key_bias(self, node, mask: gs.Tensor | None, prefix: str) -> tuple[gs.Variable, str]:
        q, k = node.inputs[0], node.inputs[1]
        batch_and_keys = self.op(
            "Gather",
            f"{prefix}_bias_shape",
            [self.op("Shape", f"{prefix}_k_shape", [k]), self.const(f"{prefix}_bk", [0, 2])],
        )
        bias_shape = [q.shape[0], k.shape[2]]
        if mask is None:
            zeros = self.op(
                "ConstantOfShape",
                f"{prefix}_zero_bias",
                [batch_and_keys],
                attrs={"value": gs.Constant(f"{prefix}_zero", np.zeros(1, dtype=np.float32))},
                dtype=np.float32,
                shape=bias_shape,
            )
            return zeros, "no mask (zero bias)"

        traced = self.trace_key_only(mask)
        if traced is not None:
            source, how = traced
        elif self.mask_rows == "first_row":
            if mask.shape is None or len(mask.shape) < 2:
                raise AttentionRewriteError(f"Attention node {node.name!r}: mask {mask.name!r} has unknown rank")
            source = self.op(
                "Slice",
                f"{prefix}_mask_row0",
                [
                    mask,
                    self.const(f"{prefix}_r0", [0]),
                    self.const(f"{prefix}_r1", [1]),
                    self.const(f"{prefix}_ax", [-2]),
                ],
                dtype=mask.dtype,
            )
            source.shape = list(mask.shape[:-2]) + [1, mask.shape[-1]]
            how = "first query row of the mask (caller asserts key-only)"
            if len(mask.shape) == 4 and not _is_static_one(mask.shape[1]):
                raise AttentionRewriteError(
                    f"Attention node {node.name!r}: mask {mask.name!r} has a head axis of {mask.shape[1]}; "
                    "the plugin's bias is shared by all heads"
                )
        else:
            raise AttentionRewriteError(
                f"Attention node {node.name!r}: mask {mask.name!r} of shape {mask.shape} is not key-only by shape and "
                "is not an Expand of a [B, 1, 1, S_k] tensor. Export the key bias broadcast with Expand, or pass "
                "mask_rows='first_row' if every query row of the mask is equal."
            )

        source_type = elem_type(source.dtype)
        if source_type == onnx.TensorProto.BOOL:
            # Bool masks: True attends (bias 0), False is masked (bias -inf).
            source = self.op(
                "Where",
                f"{prefix}_bool_bias",
                [
                    source,
                    self.const(f"{prefix}_b0", 0.0, np.float32),
                    self.const(f"{prefix}_binf", -np.inf, np.float32),
                ],
                dtype=np.float32,
                shape=source.shape,
            )
        elif source_type != onnx.TensorProto.FLOAT:
            source = self.op(
                "Cast", f"{prefix}_bias_fp32", [source], {"to": onnx.TensorProto.FLOAT}, np.float32, source.shape
            )
        rank = len(source.shape)
        flat = self.op("Flatten", f"{prefix}_bias_flat", [source], {"axis": rank - 1}, np.float32)
        bias = self.op("Expand", f"{prefix}_key_bias", [flat, batch_and_keys], dtype=np.float32, shape=bias_shape)
        return bias, how

    def rewrite(self, node, index: int) -> RewrittenAttention:
        self.check_supported(node)
        prefix = node.name or f"attention_{index}"
        scale = self.scale_of(node)
        bias, how = self.key_bias(node, prefix)
        q, k, v = node.inputs[:3]
        out = node.outputs[0]
        plugin = gs.Node(
            op=PLUGIN_NAME,
            name=f"{prefix}_plugin",
            domain=PLUGIN_NAMESPACE,
            inputs=[q, k, v, bias],
            outputs=[out],
            attrs=plugin_node_attributes(scale),
        )
        node.inputs.clear()
        node.outputs.clear()
        self.graph.nodes.append(plugin)
        return RewrittenAttention(node.name, plugin.name, scale, how)


_SHAPE_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def _shape_arithmetic(node) -> bool:
    return all(elem_type(t.dtype) in _SHAPE_TYPES for t in node.inputs if t.name)


def _graph_with_attention_shapes(model: onnx.ModelProto) -> gs.Graph:
    """The model as an onnx-graphsurgeon graph with inferred shapes. Where Q/K/V shapes stay unknown (the legacy
    exporter behind ModelOpt's Q/DQ graphs computes reshape targets with ``Mod`` of constants, which ONNX data
    propagation does not evaluate), the integer shape arithmetic is folded first: only nodes whose inputs are all
    int32/int64 are evaluated, so weights and their Q/DQ stay as they are."""
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model, data_prop=True))
    if all(t.shape is not None for n in graph.nodes if _is_attention(n) for t in n.inputs[:3]):
        return graph
    graph.fold_constants(should_exclude_node=lambda node: not _shape_arithmetic(node))
    graph.cleanup(remove_unused_graph_inputs=False)
    folded = gs.export_onnx(graph)
    folded.ir_version = model.ir_version
    return gs.import_onnx(onnx.shape_inference.infer_shapes(folded, data_prop=True))


def rewrite_attention_to_plugin(
    model: onnx.ModelProto, mask_rows: str = "key_only"
) -> tuple[onnx.ModelProto, RewriteReport]:
    """Replace every top-level opset-23 ``Attention`` node by the plugin node; the input model is not modified."""
    if mask_rows not in MASK_ROW_POLICIES:
        raise ValueError(f"mask_rows must be one of {MASK_ROW_POLICIES}, got {mask_rows!r}")
    before = count_attention_nodes(model)
    graph = _graph_with_attention_shapes(model)
    rewriter = _Rewriter(graph, mask_rows)
    rewritten = []
    for index, node in enumerate([n for n in graph.nodes if _is_attention(n)]):
        rewritten.append(rewriter.rewrite(node, index))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if rewritten and not any(d.domain == PLUGIN_NAMESPACE for d in graph.import_domains or []):
        graph.import_domains = list(graph.import_domains or []) + [onnx.helper.make_opsetid(PLUGIN_NAMESPACE, 1)]
    out_model = gs.export_onnx(graph)
    out_model.ir_version = model.ir_version
    report = RewriteReport(
        attention_nodes_before=before,
        plugin_nodes_after=count_plugin_nodes(out_model),
        attention_nodes_after=count_attention_nodes(out_model),
        rewritten=tuple(rewritten),
    )
    return out_model, report


@dataclass(frozen=True)
class KeyMaskReport:
    attention_nodes: int
    rewired: int  # Attention nodes whose expanded mask was replaced by its key-only source
    masks: tuple[str, ...]  # the key-only tensors now feeding the nodes


def rewrite_attention_to_key_mask(model: onnx.ModelProto) -> tuple[onnx.ModelProto, KeyMaskReport]:
    """Feed every top-level ``Attention`` node the key-only ``[B, 1, 1, S_k]`` source of its mask instead of the
    ``[B, 1, S_q, S_k]`` broadcast the exporter writes for onnxruntime (which refuses key-only masks).

    TensorRT's attention layer (the ONNX parser's ``Attention`` importer, 10.14+) broadcasts mask dimensions of size
    1, so the per-sample mask shrinks from B·S_q·S_k to B·S_k elements. The node, Q/K/V and every initializer stay as
    they are; a ``Cast`` on the way is kept so the mask keeps the node's dtype. The input model is not modified.
    """
    before = count_attention_nodes(model)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = gs.import_onnx(inferred)
    tracer = _Rewriter(graph, "key_only")
    replacements: dict[str, gs.Tensor] = {}  # one key-only mask per expanded mask (the blocks share one)
    rewired = 0
    for node in [n for n in graph.nodes if _is_attention(n)]:
        if len(node.inputs) < 4 or not node.inputs[3].name:
            continue
        mask = node.inputs[3]
        if is_key_only_shape(mask.shape) and len(mask.shape) == 4:
            continue
        if mask.name not in replacements:
            traced = tracer.trace_key_only(mask)
            if traced is None or len(traced[0].shape) != 4:
                raise AttentionRewriteError(
                    f"Attention node {node.name!r}: mask {mask.name!r} of shape {mask.shape} is not an Expand of a "
                    "[B, 1, 1, S_k] tensor, so no key-only form can be derived"
                )
            source = traced[0]
            to, have = elem_type(mask.dtype), elem_type(source.dtype)
            if to is not None and have is not None and have != to:
                source = tracer.op("Cast", f"{mask.name}_key_only", [source], {"to": to}, mask.dtype, source.shape)
            replacements[mask.name] = source
        node.inputs[3] = replacements[mask.name]
        rewired += 1
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out_model = gs.export_onnx(graph)
    out_model.ir_version = model.ir_version
    if count_attention_nodes(out_model) != before:
        raise AttentionRewriteError("the key-only rewrite changed the number of Attention nodes")
    return out_model, KeyMaskReport(before, rewired, tuple(sorted({t.name for t in replacements.values()})))


def attention_mask_shapes(model: onnx.ModelProto) -> list[list | None]:
    """Inferred shape of the mask input of every top-level ``Attention`` node (None: no mask)."""
    shapes = _value_shapes(onnx.shape_inference.infer_shapes(model, data_prop=True))
    return [
        shapes.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        for node in model.graph.node
        if node.op_type == ATTENTION_OP and node.domain in ONNX_DOMAINS
    ]


def _value_shapes(model: onnx.ModelProto) -> dict[str, list | None]:
    shapes: dict[str, list | None] = {}
    graph = model.graph
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = info.type.tensor_type
        if not t.HasField("shape"):
            shapes[info.name] = None
            continue
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _same_dims(a, b) -> bool:
    """Dims agree where both are known (ints or the same symbol)."""
    return a is None or b is None or a == b


def check_rewritten_model(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, run_checker: bool = True
) -> RewriteReport:
    """Inverse check of the rewrite; raises AttentionRewriteError when the rewritten graph is inconsistent.

    ``run_checker=False`` skips onnx.checker, for models whose external data is not beside the working directory
    (check the saved file with ``onnx.checker.check_model(path)`` instead).
    """
    if run_checker:
        onnx.checker.check_model(rewritten)
    inferred = onnx.shape_inference.infer_shapes(rewritten, check_type=True, strict_mode=True, data_prop=True)
    before, after = count_attention_nodes(original), count_plugin_nodes(inferred)
    left = count_attention_nodes(inferred)
    problems = []
    if left:
        problems.append(f"{left} Attention node(s) left")
    if before != after:
        problems.append(f"{before} Attention node(s) before but {after} plugin node(s) after")
    if not any(d.domain == PLUGIN_NAMESPACE for d in inferred.opset_import) and after:
        problems.append(f"no opset import for domain {PLUGIN_NAMESPACE!r}")

    shapes = _value_shapes(inferred)
    for node in inferred.graph.node:
        if node.op_type != PLUGIN_NAME or node.domain != PLUGIN_NAMESPACE:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("plugin_namespace", b"").decode() != PLUGIN_NAMESPACE or attrs.get("aot") != 1:
            problems.append(f"{node.name}: plugin_namespace/aot attributes missing")
        if not attrs.get("scale", 0.0) > 0.0:
            problems.append(f"{node.name}: scale attribute missing or not positive")
        if len(node.input) != 4 or len(node.output) != 1:
            problems.append(f"{node.name}: expected inputs (Q, K, V, key_bias) and one output")
            continue
        q, k, _, bias = (shapes.get(name) for name in node.input)
        out = shapes.get(node.output[0])
        if q is None or len(q) != 4:
            problems.append(f"{node.name}: Q shape unknown or not 4-D")
            continue
        if out is None or len(out) != 4 or not all(_same_dims(a, b) for a, b in zip(out, q)):
            problems.append(f"{node.name}: output shape {out} differs from Q shape {q}")
        if bias is None or len(bias) != 2 or not _same_dims(bias[0], q[0]) or (k and not _same_dims(bias[1], k[2])):
            problems.append(f"{node.name}: key bias shape {bias} is not [B, S_k]")

    original_outputs = {o.name: o.type for o in original.graph.output}
    new_outputs = {o.name: o.type for o in rewritten.graph.output}
    if original_outputs != new_outputs:
        problems.append("graph outputs changed")
    if problems:
        raise AttentionRewriteError("rewritten model is inconsistent: " + "; ".join(problems))
    return RewriteReport(before, after, left, ())


def external_data_files(model: onnx.ModelProto) -> list[str]:
    """Relative paths of the external-data files the model's initializers refer to."""
    files = []
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(entry.value for entry in tensor.external_data if entry.key == "location")
            if location not in files:
                files.append(location)
    return files


ATTENTION_REWRITES = ("plugin", "key_mask")


def rewrite_attention_file(
    src: str | os.PathLike, dst: str | os.PathLike, mask_rows: str = "key_only", form: str = "plugin"
) -> RewriteReport | KeyMaskReport:
    """Rewrite and check the model file ``src`` into ``dst`` (``dst`` may be ``src``): Attention nodes become the
    plugin node (``form="plugin"``) or take the key-only mask (``form="key_mask"``).

    Weights are never loaded: initializers kept in external-data files stay there (the rewrite only adds small
    constants), and the files are copied beside ``dst`` when it is in another folder. That keeps a 24 GB FLUX step
    graph a few-megabyte protobuf through the rewrite.
    """
    src, dst = Path(src), Path(dst)
    if form not in ATTENTION_REWRITES:
        raise ValueError(f"form must be one of {ATTENTION_REWRITES}, got {form!r}")
    if not src.is_file():
        raise FileNotFoundError(f"ONNX model {src} does not exist")
    original = onnx.load(str(src), load_external_data=False)
    if form == "plugin":
        rewritten, report = rewrite_attention_to_plugin(original, mask_rows=mask_rows)
        check_rewritten_model(original, rewritten, run_checker=False)
    else:
        rewritten, report = rewrite_attention_to_key_mask(original)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.parent.resolve() != src.parent.resolve():
        for name in external_data_files(original):
            target = dst.parent / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src.parent / name, target)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        onnx.save_model(rewritten, str(tmp))
        onnx.checker.check_model(str(tmp))  # the path form resolves external data beside the file
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return report
