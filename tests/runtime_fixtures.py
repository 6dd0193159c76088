"""Test fixtures for the runtime: a tiny Bundle-format-v1 bundle whose four ONNX graphs are small, fixed formulas.

The formulas are not UniDG; they exercise every part of the runtime that does not depend on what the graphs compute
(manifest checks, shapes, batching, seeds, the loop, paste-back, jobs, errors) in milliseconds. Parity with the real
model is tested on bundles made by ``unidg export onnx`` (tests/test_runtime_parity.py).

step:          x_next = x + (sigma_next - sigma) * (x - cond @ Wc - mean_tokens(ctx @ Wx) - 0.1 * mean(key_bias)
                                                  - 0.01 * guidance - 0.001 * img_ids @ Wi)
vae_encoder:   conv1x1(avgpool8(pixels))           vae_decoder: tanh(convtranspose8(latents))
image_encoder: transpose(reshape(conv1x1(avgpool(pixels))))
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from unidg.core.manifest import write_manifest
from unidg.core.settings import UniDGSettings
from unidg.runtime.backends.base import Backend

OPSET = 17


def _value(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "toy", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def toy_weights(joint_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "Wc": (rng.standard_normal((320, 64)) * 0.05).astype(np.float32),
        "Wx": (rng.standard_normal((joint_dim, 64)) * 0.1).astype(np.float32),
        "Wi": (rng.standard_normal((3, 64)) * 0.1).astype(np.float32),
        "W_enc": (rng.standard_normal((16, 3, 1, 1)) * 0.5).astype(np.float32),
        "B_enc": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "W_dec": (rng.standard_normal((16, 3, 8, 8)) * 0.2).astype(np.float32),
        "W_img": (rng.standard_normal((joint_dim, 3, 1, 1)) * 0.5).astype(np.float32),
    }


def toy_graphs(s: int, batch, context: int, joint_dim: int, ref_tokens: int, ref_size: int, weights: dict):
    n = (s // 16) * (2 * s // 16)
    h, w = s // 8, 2 * s // 8
    b = batch
    scalar = lambda name, value: (name, np.array(value, dtype=np.float32))  # noqa: E731
    step = _model(
        [
            helper.make_node("MatMul", ["cond", "Wc"], ["c"]),
            helper.make_node("MatMul", ["ctx", "Wx"], ["cx"]),
            helper.make_node("ReduceMean", ["cx"], ["cm"], axes=[1], keepdims=1),
            helper.make_node("ReduceMean", ["key_bias"], ["kb"], axes=[1], keepdims=1),
            helper.make_node("Unsqueeze", ["kb", "ax2"], ["kb3"]),
            helper.make_node("Mul", ["kb3", "k01"], ["kbs"]),
            helper.make_node("Unsqueeze", ["guidance", "ax12"], ["g3"]),
            helper.make_node("Mul", ["g3", "k001"], ["gs"]),
            helper.make_node("MatMul", ["img_ids", "Wi"], ["ii"]),
            helper.make_node("Mul", ["ii", "k0001"], ["iis"]),
            helper.make_node("Sub", ["x", "c"], ["v1"]),
            helper.make_node("Sub", ["v1", "cm"], ["v2"]),
            helper.make_node("Sub", ["v2", "kbs"], ["v3"]),
            helper.make_node("Sub", ["v3", "gs"], ["v4"]),
            helper.make_node("Sub", ["v4", "iis"], ["v"]),
            helper.make_node("Sub", ["sigma_next", "sigma"], ["dt"]),
            helper.make_node("Unsqueeze", ["dt", "ax12"], ["dt3"]),
            helper.make_node("Mul", ["dt3", "v"], ["dx"]),
            helper.make_node("Add", ["x", "dx"], ["x_next"]),
        ],
        [
            _value("x", [b, n, 64]),
            _value("cond", [b, n, 320]),
            _value("ctx", [b, context, joint_dim]),
            _value("key_bias", [b, context + n]),
            _value("sigma", [b]),
            _value("sigma_next", [b]),
            _value("guidance", [b]),
            _value("img_ids", [n, 3]),
            _value("txt_ids", [context, 3]),
        ],
        [_value("x_next", [b, n, 64])],
        [
            ("Wc", weights["Wc"]),
            ("Wx", weights["Wx"]),
            ("Wi", weights["Wi"]),
            scalar("k01", 0.1),
            scalar("k001", 0.01),
            scalar("k0001", 0.001),
            ("ax2", np.array([2], dtype=np.int64)),
            ("ax12", np.array([1, 2], dtype=np.int64)),
        ],
    )
    encoder = _model(
        [
            helper.make_node("AveragePool", ["pixels"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
            helper.make_node("Conv", ["pooled", "W_enc", "B_enc"], ["latents"]),
        ],
        [_value("pixels", [b, 3, s, 2 * s])],
        [_value("latents", [b, 16, h, w])],
        [("W_enc", weights["W_enc"]), ("B_enc", weights["B_enc"])],
    )
    decoder = _model(
        [
            helper.make_node("ConvTranspose", ["latents", "W_dec"], ["up"], strides=[8, 8]),
            helper.make_node("Tanh", ["up"], ["pixels"]),
        ],
        [_value("latents", [b, 16, h, w])],
        [_value("pixels", [b, 3, s, 2 * s])],
        [("W_dec", weights["W_dec"])],
    )
    grid = int(round(ref_tokens**0.5))
    pool = ref_size // grid
    image_encoder = _model(
        [
            helper.make_node("AveragePool", ["pixels"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
            helper.make_node("Conv", ["pooled", "W_img"], ["features"]),
            helper.make_node("Reshape", ["features", "flat"], ["flattened"]),
            helper.make_node("Transpose", ["flattened"], ["tokens"], perm=[0, 2, 1]),
        ],
        [_value("pixels", [b, 3, ref_size, ref_size])],
        [_value("tokens", [b, ref_tokens, joint_dim])],
        [("W_img", weights["W_img"]), ("flat", np.array([0, joint_dim, -1], dtype=np.int64))],
    )
    return {"step": step, "vae_encoder": encoder, "vae_decoder": decoder, "image_encoder": image_encoder}


def make_toy_bundle(
    folder: str | Path,
    *,
    resolution: int = 64,
    batch: int | str = "dynamic",
    fold_text_tokens: bool = True,
    text_tokens: int = 4,
    reference_tokens: int = 16,
    joint_dim: int = 32,
    reference_size: int = 32,
    steps: int = 28,
    nan_weight: bool = False,
    seed: int = 0,
) -> Path:
    """Write a toy bundle (four ONNX graphs + manifest) to ``folder``; ``nan_weight`` plants a NaN in step.onnx."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = UniDGSettings(
        resolution=resolution, text_tokens=text_tokens, steps=steps, guidance=1.0, fold_text_tokens=fold_text_tokens
    )
    context = (1 if fold_text_tokens else text_tokens) + reference_tokens
    weights = toy_weights(joint_dim, seed)
    if nan_weight:
        weights["Wc"][3, 5] = np.nan
    dim = "batch" if batch == "dynamic" else batch
    graphs = toy_graphs(resolution, dim, context, joint_dim, reference_tokens, reference_size, weights)
    table = {}
    for name, model in graphs.items():
        onnx.save(model, str(folder / f"{name}.onnx"))
        io = {}
        for direction, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
            io[direction] = {
                v.name: {
                    "shape": [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim],
                    "dtype": "float32",
                }
                for v in values
            }
        table[name] = {"file": f"{name}.onnx", **io}
    metadata = {
        "format": "unidg-bundle",
        "format_version": 1,
        "settings": settings.to_dict(),
        "resolution": resolution,
        "precision": "fp32",
        "attention": "portable",
        "fold_text_tokens": fold_text_tokens,
        "text_tokens": text_tokens,
        "reference_tokens": reference_tokens,
        "context_tokens": context,
        "joint_dim": joint_dim,
        "reference_size": reference_size,
        "latent_channels": 16,
        "vae_scale": 0.3611,
        "vae_shift": 0.1159,
        "batch": batch,
        "graphs": table,
        "weights": {"path": "toy", "fingerprint": "0" * 64},
        "tools": {},
    }
    write_manifest(folder, "bundle", metadata)
    return folder


def rewrite_manifest(folder: Path, edit) -> None:
    """Apply ``edit(metadata)`` to a bundle's manifest and re-hash the files (a consistently re-signed bundle)."""
    data = json.loads((folder / "manifest.json").read_text())
    edit(data["metadata"])
    write_manifest(folder, "bundle", data["metadata"])


def sample_request_arrays(size: tuple[int, int] = (48, 40), seed: int = 0):
    """A reference with a dark blob defect and a textured source with a target box (uint8 RGB, bool masks)."""
    rng = np.random.default_rng(seed)
    height, width = size
    reference = rng.integers(120, 200, (height, width, 3), dtype=np.uint8)
    reference_mask = np.zeros((height, width), dtype=bool)
    reference_mask[10:20, 12:22] = True
    reference[reference_mask] = (40, 30, 20)
    source = rng.integers(0, 256, (height + 8, width + 16, 3), dtype=np.uint8)
    target_mask = np.zeros(source.shape[:2], dtype=bool)
    target_mask[20:30, 25:37] = True
    return reference, reference_mask, source, target_mask


def write_sample_files(folder: Path, name: str = "case", seed: int = 0) -> dict[str, Path]:
    """The sample request as PNG files: {reference, reference_mask, source, mask} -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    reference, reference_mask, source, target_mask = sample_request_arrays(seed=seed)
    paths = {
        "reference": folder / f"{name}_ref.png",
        "reference_mask": folder / f"{name}_ref_mask.png",
        "source": folder / f"{name}_src.png",
        "mask": folder / f"{name}_mask.png",
    }
    Image.fromarray(reference).save(paths["reference"])
    Image.fromarray(reference_mask.astype(np.uint8) * 255).save(paths["reference_mask"])
    Image.fromarray(source).save(paths["source"])
    Image.fromarray(target_mask.astype(np.uint8) * 255).save(paths["mask"])
    return paths


class StepOnlyBackend(Backend):
    """A numpy backend of Bundle format 1's four graphs and no step-cache graphs: the encoders and the decoder hand
    their input back and a step keeps x. Subclasses give the step a test needs."""

    name = "step-only"

    @classmethod
    def from_bundle(cls, bundle, **options):
        return cls(bundle)

    def encode_images(self, pixels):
        return pixels

    def decode_latents(self, latents):
        return latents

    def encode_reference(self, pixels):
        return pixels

    def step(self, x, conditioning, sigma, sigma_next):
        return x
