"""Lower a UniDG model to the four ONNX graphs of a bundle with torch's dynamo exporter (opset 23).

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs onnxscript) is the one that handles FLUX: it
emits fused ``Attention`` and ``RMSNormalization`` at opset 23, where the TorchScript exporter fails on
``aten::rms_norm``. Graphs larger than 2 GB keep their weights in one external-data file beside the graph
(``step.onnx.data``).

The step graph's transformer is ``unidg.export.lowered_flux.LoweredFlux``: diffusers' arithmetic in fewer, larger
kernels (token-major activations, fused projections, RoPE as ``RotaryEmbedding`` or elementwise).

Attention in the step graph:
- ``portable`` (default): opset-23 ``Attention`` with a float mask. onnxruntime's CPU kernel refuses a key-only mask
  ``[B, 1, 1, S]``, so the per-key bias is broadcast in the graph (``Expand`` to ``[B, 1, S, S]``) — or, with
  ``portable_mask="fold"``, folded into an extra head dimension (no mask input at all).
- ``plugin``: the portable graph rewritten by ``unidg.export.plugins.onnx_rewrite`` so every ``Attention`` becomes the
  TensorRT biased-attention plugin node (TensorRT only).

Shapes: static (batch and resolution fixed) or dynamic batch and/or dynamic sequence (image-token count, i.e. any
resolution that is a multiple of 16). All graph inputs and outputs are float32.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from diffusers.utils import logging as diffusers_logging

from unidg.core.attention_bias import build_key_bias
from unidg.core.errors import UniDGError
from unidg.core.latents import LATENT_CHANNELS, MASK_CHANNELS, text_ids
from unidg.core.layout import DiptychLayout, HasLayout
from unidg.core.schedule import flux_sigmas
from unidg.core.settings import MAX_RESOLUTION
from unidg.export.lowered_flux import ROPE_FORMS, LoweredFlux
from unidg.export.plugins.onnx_rewrite import rewrite_attention_file
from unidg.export.step_model import ImageEncoderModel, StepModel, VaeDecoderModel, VaeEncoderModel
from unidg.runtime.bundle import GRAPH_INPUTS, GRAPH_NAMES, GRAPH_OUTPUTS, STEP_INPUTS, TEXT_STEP_INPUTS
from unidg.train.model import UniDGModel

OPSET = 23
PRECISIONS = ("fp32", "fp16", "bf16")
ATTENTION_FORMS = ("portable", "plugin")
PORTABLE_MASKS = ("expand", "fold")
DEFAULT_PORTABLE_MASK = "expand"  # measured faster in onnxruntime at the nano shape, equally exact: docs/export.md
TWO_GIGABYTES = 2**31
# Stay well below protobuf's 2 GB limit: the serialized graph adds to the weights.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
BATCH_AXIS = "batch"
TORCH_PROGRAM_DIR = "torch"  # torch.export programs beside the graphs: unidg.runtime.backends.torch_backend
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Progress = Callable[[str], None]


def print_progress(message: str) -> None:
    print(f"[unidg export] {message}", file=sys.stderr, flush=True)


class ExportError(UniDGError):
    """The model cannot be exported as asked; the message names the option and the fix."""


def check_max_batch(max_batch: int) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"--max-batch {max_batch!r}: the upper bound of a dynamic batch must be an integer >= 1")
    return max_batch


@dataclass(frozen=True)
class ExportOptions:
    resolution: int
    precision: str = "fp32"
    batch: int | str = 1  # a static batch size, or "dynamic"
    dynamic_sequence: bool = False  # image-token count (resolution) as a dynamic axis
    attention: str = "portable"
    portable_mask: str = DEFAULT_PORTABLE_MASK
    opset: int = OPSET
    max_batch: int = 16  # upper bound of a dynamic batch axis (export-time constraint)
    rope: str = "op"  # the step graphs' RoPE: ONNX RotaryEmbedding, or elementwise

    def __post_init__(self) -> None:
        if not 16 <= self.resolution <= MAX_RESOLUTION or self.resolution % 16:
            raise ExportError(
                f"--resolution {self.resolution}: supported are multiples of 16 from 16 to {MAX_RESOLUTION} (each "
                "diptych half is split into 16-pixel tokens); use e.g. 256, 512 or 768"
            )
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision {self.precision!r}: choose one of {list(PRECISIONS)}")
        if self.attention not in ATTENTION_FORMS:
            raise ExportError(f"--attention {self.attention!r}: choose one of {list(ATTENTION_FORMS)}")
        if self.portable_mask not in PORTABLE_MASKS:
            raise ExportError(f"portable mask form {self.portable_mask!r}: choose one of {list(PORTABLE_MASKS)}")
        if self.rope not in ROPE_FORMS:
            raise ExportError(f"--rope {self.rope!r}: choose one of {list(ROPE_FORMS)}")
        if self.batch != "dynamic" and (not isinstance(self.batch, int) or isinstance(self.batch, bool)):
            raise ExportError(f"--batch {self.batch!r}: give a positive integer or 'dynamic'")
        if isinstance(self.batch, int) and self.batch < 1:
            raise ExportError(f"--batch {self.batch}: must be >= 1")
        check_max_batch(self.max_batch)
        if self.opset < 23:
            raise ExportError(f"opset {self.opset}: the portable attention needs opset >= 23 (ONNX Attention)")

    @property
    def dynamic_batch(self) -> bool:
        return self.batch == "dynamic"

    @property
    def mask_form(self) -> str:
        """The attention form traced: the plugin rewrite needs the (expanded) mask to recover the key bias."""
        return "expand" if self.attention == "plugin" else self.portable_mask

    @property
    def example_batch(self) -> int:
        # torch.export specialises axes of size 0/1: a dynamic batch is traced with 2.
        return 2 if self.dynamic_batch else int(self.batch)


@dataclass(frozen=True)
class ModelFacts(HasLayout):
    """The shape facts of a model + settings that a bundle manifest records."""

    resolution: int
    text_tokens: int  # K
    fold_text_tokens: bool
    reference_tokens: int  # R
    context_tokens: int  # C
    joint_dim: int  # J
    reference_size: int  # P
    guidance_embeds: bool
    pooled_dim: int | None = None  # UniDG-Text: CLIP's pooled width, a step input; None in reference mode

    @property
    def step_inputs(self) -> tuple[str, ...]:
        return STEP_INPUTS if self.pooled_dim is None else TEXT_STEP_INPUTS

    @classmethod
    def of(cls, model: UniDGModel, resolution: int, text: bool = False) -> ModelFacts:
        settings = model.settings
        return cls(
            resolution=resolution,
            text_tokens=settings.text_tokens,
            fold_text_tokens=settings.fold_text_tokens,
            reference_tokens=model.reference_tokens,
            context_tokens=model.text_token_count() + model.reference_tokens,
            joint_dim=model.joint_dim,
            reference_size=model.reference_size,
            guidance_embeds=bool(model.transformer.config.guidance_embeds),
            pooled_dim=int(model.transformer.config.pooled_projection_dim) if text else None,
        )

    def metadata(self) -> dict:
        return {
            "resolution": self.resolution,
            "fold_text_tokens": self.fold_text_tokens,
            "text_tokens": self.text_tokens,
            "reference_tokens": self.reference_tokens,
            "context_tokens": self.context_tokens,
            "joint_dim": self.joint_dim,
            "reference_size": self.reference_size,
        }


@dataclass(frozen=True)
class GraphRecord:
    """What the manifest says about one exported graph."""

    name: str
    file: str
    inputs: dict[str, dict]
    outputs: dict[str, dict]
    data_files: tuple[str, ...]  # external-data files beside the graph
    seconds: float
    op_counts: dict[str, int]

    def manifest_entry(self) -> dict:
        return {
            "file": self.file,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "external_data": list(self.data_files),
            "op_counts": self.op_counts,
        }


# ------------------------------------------------------------------------------------------------ example inputs
def step_example_inputs(facts: ModelFacts, batch: int, seed: int = 0, resolution: int | None = None) -> dict:
    """Realistic step inputs: noise, a Fill condition with a binary mask, Redux-like tokens, the real key bias."""
    layout = DiptychLayout(resolution or facts.resolution)
    h_tokens, w_tokens = layout.token_hw
    tokens = layout.image_tokens
    rng = np.random.default_rng(seed)
    defect = np.zeros((batch, h_tokens, w_tokens), dtype=bool)
    defect[:, h_tokens // 4 : h_tokens // 2 + 1, w_tokens // 8 : w_tokens // 4 + 1] = True  # reference defect
    defect[:, h_tokens // 3 : h_tokens // 2 + 1, w_tokens // 2 + 1 : 3 * w_tokens // 4] = True  # target region
    mask_channels = np.repeat(defect.reshape(batch, tokens, 1), MASK_CHANNELS, axis=2).astype(np.float32)
    sigmas = flux_sigmas(28, tokens)
    step = int(rng.integers(0, 27))
    ctx = rng.standard_normal((batch, facts.context_tokens, facts.joint_dim), dtype=np.float32)
    if facts.pooled_dim is None:
        ctx[:, : facts.context_tokens - facts.reference_tokens] = 0.0  # zero text token(s)
    arrays = {
        "x": rng.standard_normal((batch, tokens, 64), dtype=np.float32),
        "cond": np.concatenate([rng.standard_normal((batch, tokens, 64), dtype=np.float32), mask_channels], axis=2),
        "ctx": ctx,
        "key_bias": build_key_bias(
            defect.reshape(batch, tokens), facts.reference_tokens, facts.text_tokens, 2.0, facts.fold_text_tokens
        ),
        "sigma": np.full((batch,), sigmas[step], dtype=np.float32),
        "sigma_next": np.full((batch,), sigmas[step + 1], dtype=np.float32),
        "guidance": np.full((batch,), 3.5, dtype=np.float32),
        "img_ids": layout.image_ids(),
        "txt_ids": text_ids(facts.context_tokens),
    }
    if facts.pooled_dim is not None:
        arrays["pooled"] = rng.standard_normal((batch, facts.pooled_dim), dtype=np.float32)
    return {name: arrays[name] for name in facts.step_inputs}


def graph_example_inputs(name: str, facts: ModelFacts, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Example float32 inputs of one bundle graph (pixels in [-1, 1], latents ~ N(0, 1))."""
    if name == "step":
        return step_example_inputs(facts, batch, seed)
    rng = np.random.default_rng(seed)
    h, w = facts.latent_hw
    if name == "vae_encoder":
        return {"pixels": rng.uniform(-1, 1, (batch, 3, *facts.layout.pixel_hw)).astype(np.float32)}
    if name == "vae_decoder":
        return {"latents": rng.standard_normal((batch, LATENT_CHANNELS, h, w), dtype=np.float32)}
    if name == "image_encoder":
        p = facts.reference_size
        return {"pixels": rng.uniform(-1, 1, (batch, 3, p, p)).astype(np.float32)}
    raise ValueError(f"unknown graph {name!r}; bundle graphs are {list(GRAPH_NAMES)}")


# ------------------------------------------------------------------------------------------------ dynamic shapes
def _axes(**dims) -> dict[int, object]:
    """{axis: Dim} without the static axes; keys are written a0, a1, ... (axis numbers)."""
    return {int(key[1:]): dim for key, dim in dims.items() if dim is not None}


def _dynamic_shapes(name: str, facts: ModelFacts, options: ExportOptions) -> dict | None:
    """torch.export dynamic-shape spec for one graph, keyed by forward argument name."""
    if not options.dynamic_batch and not options.dynamic_sequence:
        return None
    dim = torch.export.Dim
    batch = dim(BATCH_AXIS, min=1, max=options.max_batch) if options.dynamic_batch else None
    if name == "step":
        tokens = dim("image_tokens", min=2, max=2**16) if options.dynamic_sequence else None
        keys = tokens + facts.context_tokens if tokens is not None else None
        return {
            "x": _axes(a0=batch, a1=tokens),
            "cond": _axes(a0=batch, a1=tokens),
            "ctx": _axes(a0=batch),
            "key_bias": _axes(a0=batch, a1=keys),
            "sigma": _axes(a0=batch),
            "sigma_next": _axes(a0=batch),
            "guidance": _axes(a0=batch),
            "img_ids": _axes(a0=tokens),
            "txt_ids": {},
            **({"pooled": _axes(a0=batch)} if facts.pooled_dim is not None else {}),
        }
    if name in ("vae_encoder", "vae_decoder"):
        # Pixel sides are 16 * k (one 2x2 token of an 8x VAE), latent sides 2 * k.
        factor = 16 if name == "vae_encoder" else 2
        rows = dim("token_rows", min=1, max=256) * factor if options.dynamic_sequence else None
        cols = dim("token_cols", min=1, max=512) * factor if options.dynamic_sequence else None
        argument = "pixels" if name == "vae_encoder" else "latents"
        return {argument: _axes(a0=batch, a2=rows, a3=cols)}
    return {"pixels": _axes(a0=batch)}


# ------------------------------------------------------------------------------------------------ exporting
def parameter_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def _dims(value: onnx.ValueInfoProto) -> list:
    dims = []
    for dim in value.type.tensor_type.shape.dim:
        dims.append(int(dim.dim_value) if dim.HasField("dim_value") else (dim.dim_param or "?"))
    return dims


_ONNX_DTYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
}


def io_table(values) -> dict[str, dict]:
    return {
        v.name: {"shape": _dims(v), "dtype": _ONNX_DTYPE_NAMES.get(v.type.tensor_type.elem_type, "other")}
        for v in values
    }


def check_onnx(path: Path) -> None:
    """onnx.checker on the file (the path form handles graphs with external data and > 2 GB)."""
    onnx.checker.check_model(str(path), full_check=False)


def export_module(
    module: torch.nn.Module,
    inputs: dict[str, np.ndarray],
    path: Path,
    output_names: tuple[str, ...],
    *,
    dynamic_shapes: dict | None = None,
    opset: int = OPSET,
    external_data: bool | None = None,
    weight_bytes: int | None = None,
    progress: Progress | None = None,
) -> GraphRecord:
    """Export ``module(**inputs)`` to ``path`` with the dynamo exporter; returns the manifest facts of the graph."""
    started = time.perf_counter()
    path = Path(path)
    name = path.stem
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.values())
    weight_bytes = parameter_bytes(module) if weight_bytes is None else weight_bytes
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_THRESHOLD
    if progress:
        size_mb = weight_bytes / 2**20
        progress(f"{name}: tracing ({size_mb:.1f} MB of weights, external data: {'yes' if external_data else 'no'})")
    with torch.no_grad(), warnings_quiet():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=list(inputs),
            output_names=list(output_names),
            dynamic_shapes=tuple(dynamic_shapes[k] for k in inputs) if dynamic_shapes else None,
            optimize=True,
            verbose=False,
        )
    if progress:
        progress(f"{name}: writing {path.name} ({time.perf_counter() - started:.1f} s so far)")
    data_name = f"{path.name}.data"
    if external_data:
        # One data file, named after the graph, so the manifest lists exactly two files per big graph.
        import onnx_ir

        onnx_ir.save(program.model, path, external_data=data_name)
    else:
        program.save(path, external_data=False)
    check_onnx(path)
    model = onnx.load(str(path), load_external_data=False)
    inputs_table = io_table(model.graph.input)
    outputs_table = io_table(model.graph.output)
    counts = Counter(node.op_type for node in model.graph.node)
    data_files = (data_name,) if (path.parent / data_name).exists() else ()
    seconds = time.perf_counter() - started
    if progress:
        progress(f"{name}: done in {seconds:.1f} s ({sum(counts.values())} nodes)")
    return GraphRecord(
        name=name,
        file=path.name,
        inputs=inputs_table,
        outputs=outputs_table,
        data_files=data_files,
        seconds=seconds,
        op_counts=dict(sorted(counts.items())),
    )


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def graph_module(name: str, model: UniDGModel) -> torch.nn.Module:
    """The module of one bundle graph (a text bundle's step takes ``pooled`` as its tenth input: the same module)."""
    return {
        "step": StepModel,
        "vae_encoder": VaeEncoderModel,
        "vae_decoder": VaeDecoderModel,
        "image_encoder": ImageEncoderModel,
    }[name](model).eval()


def lowered_transformer(
    model: UniDGModel, options: ExportOptions, blocks: tuple[int, int] | None = None, program: bool = False
) -> LoweredFlux:
    """The transformer of the step graphs (``blocks``: a range of it): diffusers' arithmetic in fewer, larger kernels.
    ``program``: for a torch program (key-only mask, elementwise RoPE) instead of an ONNX graph."""
    if program:
        return LoweredFlux(model, attention="key", rope="elementwise", blocks=blocks).eval()
    return LoweredFlux(model, attention=options.mask_form, rope=options.rope, blocks=blocks).eval()


def cast_for_precision(model: UniDGModel, precision: str) -> UniDGModel:
    """Cast in place: transformer and image encoder to the precision; the VAE too, except fp16 for a VAE whose
    config asks for fp32 (``force_upcast``, as the FLUX VAE: it overflows in fp16)."""
    dtype = TORCH_DTYPES[precision]
    if dtype == torch.float32:
        return model
    parts = [model.transformer, model.image_encoder, model.redux]
    if not (precision == "fp16" and getattr(model.vae.config, "force_upcast", False)):
        parts.append(model.vae)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # it warns about casting after loading; the cast is deliberate here
    try:
        for part in parts:
            part.to(dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return model


def graph_parameters(name: str, model: UniDGModel) -> list[torch.nn.Module]:
    """The sub-networks whose weights a graph carries (to size it and decide on external data)."""
    vae = model.vae
    return {
        "step": [model.transformer],
        "vae_encoder": [vae.encoder] + ([vae.quant_conv] if vae.quant_conv is not None else []),
        "vae_decoder": [vae.decoder] + ([vae.post_quant_conv] if vae.post_quant_conv is not None else []),
        "image_encoder": [model.image_encoder, model.redux],
    }[name]


def export_graph(
    name: str,
    model: UniDGModel,
    folder: Path,
    options: ExportOptions,
    *,
    facts: ModelFacts | None = None,
    progress: Progress | None = None,
    external_data: bool | None = None,
) -> GraphRecord:
    """Export one bundle graph (``step``, ``vae_encoder``, ``vae_decoder``, ``image_encoder``) into ``folder``."""
    facts = facts or ModelFacts.of(model, options.resolution)
    inputs = graph_example_inputs(name, facts, options.example_batch)
    module = StepModel(model, lowered_transformer(model, options)) if name == "step" else graph_module(name, model)
    path = Path(folder) / f"{name}.onnx"
    record = export_module(
        module,
        inputs,
        path,
        GRAPH_OUTPUTS[name],
        dynamic_shapes=_dynamic_shapes(name, facts, options),
        opset=options.opset,
        external_data=external_data,
        weight_bytes=parameter_bytes(*graph_parameters(name, model)),
        progress=progress,
    )
    wanted = facts.step_inputs if name == "step" else GRAPH_INPUTS[name]
    if tuple(record.inputs) != wanted or tuple(record.outputs) != GRAPH_OUTPUTS[name]:
        raise ExportError(
            f"{name}.onnx has inputs {list(record.inputs)} / outputs {list(record.outputs)}; the bundle needs "
            f"{list(wanted)} / {list(GRAPH_OUTPUTS[name])} (an input the graph does not use was dropped "
            "by the exporter)"
        )
    if name == "step" and options.attention == "plugin":
        record = _rewrite_to_plugin(path, record, progress)
    return record


def export_torch_program(
    name: str,
    model: UniDGModel,
    path: Path,
    options: ExportOptions,
    *,
    facts: ModelFacts | None = None,
    progress: Progress | None = None,
) -> Path:
    """Save one bundle graph as a ``torch.export`` program (``.pt2``) for the runtime's torch backend.

    Same module, example inputs and dynamic shapes as the ONNX graph; the step's lowered transformer takes the torch
    program form: one ``scaled_dot_product_attention`` per attention with a key-only mask ``[B, 1, 1, N]`` (the form
    the torch backend's ``--fused-attention`` rewrites) and diffusers' elementwise RoPE. The attention and RoPE forms
    chosen for ONNX do not apply here.
    """
    started = time.perf_counter()
    facts = facts or ModelFacts.of(model, options.resolution)
    inputs = graph_example_inputs(name, facts, options.example_batch)
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.values())
    spec = _dynamic_shapes(name, facts, options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "step":
        module = StepModel(model, lowered_transformer(model, options, program=True)).eval()
    else:
        module = graph_module(name, model)
    with torch.no_grad(), warnings_quiet():
        program = torch.export.export(module, args, dynamic_shapes=tuple(spec[k] for k in inputs) if spec else None)
    torch.export.save(program, str(path))
    if progress:
        progress(f"{name}: torch program {path.name} in {time.perf_counter() - started:.1f} s")
    return path


def _rewrite_to_plugin(path: Path, record: GraphRecord, progress: Progress | None) -> GraphRecord:
    if progress:
        progress("step: replacing Attention nodes by the TensorRT biased-attention plugin node")
    report = rewrite_attention_file(path, path)
    check_onnx(path)
    model = onnx.load(str(path), load_external_data=False)
    counts = Counter(node.op_type for node in model.graph.node)
    if progress:
        progress(f"step: {report.plugin_nodes_after} plugin nodes, {report.attention_nodes_after} Attention left")
    return GraphRecord(
        name=record.name,
        file=record.file,
        inputs=io_table(model.graph.input),
        outputs=io_table(model.graph.output),
        data_files=record.data_files,
        seconds=record.seconds,
        op_counts=dict(sorted(counts.items())),
    )


def export_graphs(
    model: UniDGModel,
    folder: Path,
    options: ExportOptions,
    *,
    graphs: tuple[str, ...] = GRAPH_NAMES,
    torch_programs: bool = False,
    text: bool = False,
    progress: Progress | None = print_progress,
) -> dict[str, GraphRecord]:
    """Export the bundle graphs of ``model`` (already cast to the precision) into ``folder``; with
    ``torch_programs``, also each graph's ``torch.export`` program as ``folder/torch/<graph>.pt2``; ``text``: the
    step of a UniDG-Text bundle (``pooled`` input)."""
    facts = ModelFacts.of(model, options.resolution, text)
    records = {}
    for name in graphs:
        records[name] = export_graph(name, model, folder, options, facts=facts, progress=progress)
        if torch_programs:
            path = Path(folder) / torch_program_file(name)
            export_torch_program(name, model, path, options, facts=facts, progress=progress)
    return records


def torch_program_file(name: str) -> str:
    """Where a bundle keeps the torch program of a graph (the runtime's torch backend reads this layout)."""
    return f"{TORCH_PROGRAM_DIR}/{name}.pt2"
