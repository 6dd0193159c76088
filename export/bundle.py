"""Write a bundle folder (Bundle format v1): the four ONNX graphs and ``manifest.json`` kind="bundle".

A bundle is written into a temporary folder beside ``OUT`` and renamed into place at the end, so a failed or
interrupted export leaves nothing half-written. The manifest ties the bundle to its weights folder (the weights
manifest's fingerprint) and records shapes, dtypes, opset, the UniDG settings and the tool versions; the runtime
(``unidg.runtime.bundle.load_bundle``) checks all of it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from unidg.core.instructions import REFERENCE_INSTRUCTION
from unidg.core.latents import LATENT_CHANNELS, VAE_SCALE, VAE_SHIFT
from unidg.core.manifest import Manifest, tool_versions, write_manifest
from unidg.core.settings import MAX_RESOLUTION, UniDGSettings
from unidg.core.text import CLIP_TOKENIZER_FOLDER, T5_TOKENIZER_FOLDER, TEXT_GRAPH_IO
from unidg.core.weights_folder import (
    OutputFolderError,
    WeightsError,
    WeightsInfo,
    check_output,
    read_weights,
    staged_folder,
)
from unidg.export.onnx_export import (
    ExportOptions,
    GraphRecord,
    ModelFacts,
    Progress,
    cast_for_precision,
    check_max_batch,
    export_graphs,
    print_progress,
    torch_program_file,
)
from unidg.export.shared_graphs import share_graphs
from unidg.export.text_graphs import export_text_encoders
from unidg.runtime.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    BUNDLE_FORMAT_VERSION_TEXT,
    BUNDLE_KIND,
    GRAPH_NAMES,
)
from unidg.train.loading import load_weights_model
from unidg.train.text_encoders import TextEncoders, load_text_encoders
from unidg.train.text_sft import encoders_digest

__all__ = ["WeightsError", "OutputFolderError", "export_bundle", "bundle_metadata", "read_weights", "staged_folder"]
TOOLS = (
    "unidg",
    "torch",
    "diffusers",
    "transformers",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "nvidia-modelopt",
    "tensorrt",
)


# ------------------------------------------------------------------------------------------------ manifest
def graph_table(records: dict[str, GraphRecord]) -> dict[str, dict]:
    missing = [name for name in GRAPH_NAMES if name not in records]
    if missing:
        raise OutputFolderError(f"bundle is missing graphs {missing}")
    return {name: records[name].manifest_entry() for name in GRAPH_NAMES}


def bundle_metadata(
    facts: ModelFacts,
    settings: UniDGSettings,
    options: ExportOptions,
    records: dict[str, GraphRecord],
    weights: WeightsInfo,
    *,
    precision: str | None = None,
    vae_scale: float = VAE_SCALE,
    vae_shift: float = VAE_SHIFT,
    extra: dict | None = None,
) -> dict:
    """The ``metadata`` of a bundle manifest (Bundle format v1)."""
    metadata = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "settings": settings.to_dict(),
        **facts.metadata(),
        "precision": precision or options.precision,
        "attention": options.attention,
        "attention_form": options.mask_form,
        "rope": options.rope,
        "latent_channels": LATENT_CHANNELS,
        "vae_scale": vae_scale,
        "vae_shift": vae_shift,
        "batch": "dynamic" if options.dynamic_batch else int(options.batch),
        "sequence": "dynamic" if options.dynamic_sequence else "static",
        "opset": options.opset,
        "guidance_embeds": facts.guidance_embeds,
        "graphs": graph_table(records),
        "weights": weights.reference(),
        "engines": {},
        "tools": tool_versions(*TOOLS),
    }
    if options.dynamic_batch:
        metadata["max_batch"] = options.max_batch
    if extra:
        metadata.update(extra)
    return metadata


def write_bundle_manifest(folder: Path, metadata: dict) -> Manifest:
    return write_manifest(folder, BUNDLE_KIND, metadata)


# ------------------------------------------------------------------------------------------------ export
def export_bundle(
    weights_folder: str | Path,
    out: str | Path,
    *,
    precision: str = "fp32",
    resolution: int | None = None,
    batch: int | str = 1,
    max_batch: int = 16,
    dynamic_sequence: bool = False,
    attention: str = "portable",
    portable_mask: str | None = None,
    overwrite: bool = False,
    verify_weights: bool = True,
    torch_programs: bool = False,
    rope: str = "op",
    text_encoders: str | Path | None = None,
    share_graphs_with: str | Path | None = None,
    progress: Progress | None = print_progress,
) -> Manifest:
    """``unidg export onnx``: weights folder -> bundle folder (atomically). Returns the bundle manifest.

    ``torch_programs`` also saves each graph as a ``torch.export`` program (``torch/<graph>.pt2``, listed in the
    manifest's files and its ``torch_programs`` table) for ``--backend torch``; without it the bundle is unchanged.
    The step graphs and programs compute the transformer in the lowered form (``unidg.export.lowered_flux``: fused
    projections, token-major activations); ``rope``: ``"op"`` (ONNX RotaryEmbedding) or ``"elementwise"`` RoPE in the
    ONNX step graphs (the torch programs use the elementwise form).

    A UniDG-Text model (its manifest's ``text`` record, ``unidg train text`` + merge) gives a text bundle (format 3):
    the step takes ``pooled``, and the encoders the model was trained with (``text_encoders``, default: the folder its
    record names, checked against the record's hash) go in as ``clip_text.onnx``, ``t5_text.onnx`` and their
    tokenizer folders (``unidg.export.text_graphs``).

    ``share_graphs_with``: another bundle whose VAE / image-encoder graphs are taken byte for byte where they are the
    same computation (``unidg.export.shared_graphs``), so fine-tunes of one base store them once."""
    check_output(out, overwrite=overwrite)  # refused before the weights are read and the graphs exported
    check_max_batch(max_batch)
    if resolution is not None:
        check_resolution(resolution)
    weights = read_weights(weights_folder, verify=verify_weights, progress=progress)
    resolution = check_resolution(weights.settings.resolution if resolution is None else resolution)
    settings = replace(weights.settings, resolution=resolution)
    option_args = {"portable_mask": portable_mask} if portable_mask else {}
    options = ExportOptions(
        resolution=resolution,
        precision=precision,
        batch=batch,
        max_batch=max_batch,
        dynamic_sequence=dynamic_sequence,
        attention=attention,
        rope=rope,
        **option_args,
    )
    if progress:
        progress(f"loading {weights.path} (fingerprint {weights.fingerprint[:12]})")
    record = weights.manifest.metadata.get("text")
    encoders = load_trained_encoders(weights, record, text_encoders) if record else None
    model = cast_for_precision(load_weights_model(weights, settings), precision)
    facts = ModelFacts.of(model, resolution, text=encoders is not None)
    with staged_folder(out, overwrite=overwrite) as staging:
        records = export_graphs(
            model, staging, options, torch_programs=torch_programs, text=encoders is not None, progress=progress
        )
        extra = {"torch_programs": {name: torch_program_file(name) for name in GRAPH_NAMES}} if torch_programs else {}
        if share_graphs_with is not None:
            records, extra["shared_graphs"] = share_graphs(
                staging, records, share_graphs_with, facts, options.example_batch, progress
            )
        if encoders is not None:
            if progress:
                progress("text encoders: clip_text.onnx, t5_text.onnx and their tokenizers")
            text_records = export_text_encoders(encoders, staging, max_batch=max_batch, progress=progress)
            extra.update(format_version=BUNDLE_FORMAT_VERSION_TEXT, text=text_table(facts, record, text_records))
        metadata = bundle_metadata(
            facts,
            settings,
            options,
            records,
            weights,
            vae_scale=float(model.vae.config.scaling_factor),
            vae_shift=float(model.vae.config.shift_factor),
            extra=extra or None,
        )
        if progress:
            progress("hashing files and writing manifest.json")
        manifest = write_bundle_manifest(staging, metadata)
    if progress:
        progress(f"bundle written to {out}")
    return manifest


def load_trained_encoders(weights: WeightsInfo, record: dict, folder: str | Path | None) -> TextEncoders:
    """The text encoders a UniDG-Text model was trained with: ``folder``, or the one its ``text`` record names;
    refused when their files differ from the record's hash (other encoders would feed features it never saw)."""
    location = Path(folder if folder is not None else record.get("encoders", ""))
    fix = "pass the encoders it was trained with: --text-encoders FOLDER (a FLUX.1 folder or the run's text_encoders/)"
    if not location.is_dir():
        raise WeightsError(f"--weights {weights.path} is a UniDG-Text model; its text encoders {location} are not a "
                           f"folder here; {fix}")  # fmt: skip
    digest = record.get("encoders_sha256")
    if digest and encoders_digest(location) != digest:
        raise WeightsError(
            f"--text-encoders {location}: its files differ from those --weights {weights.path} was trained with "
            f"(sha256 {digest[:12]}); {fix}"
        )
    return load_text_encoders(location)


def text_table(facts: ModelFacts, record: dict, graphs: dict[str, GraphRecord]) -> dict:
    """The bundle manifest's ``text`` table (unidg.runtime.bundle reads it)."""
    return {
        "mode": "instruction",
        "graphs": {name: graphs[name].manifest_entry() for name in TEXT_GRAPH_IO},
        "tokenizers": {"clip": CLIP_TOKENIZER_FOLDER, "t5": T5_TOKENIZER_FOLDER},
        "pooled_dim": facts.pooled_dim,
        "reference_instruction": record.get("reference_instruction", REFERENCE_INSTRUCTION),
        "training": {k: record.get(k) for k in ("random_encoders", "no_reference", "instruction_seed")},
    }


def check_resolution(resolution: int, name: str = "--resolution") -> int:
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, int)
        or not 16 <= resolution <= MAX_RESOLUTION
        or resolution % 16
    ):
        raise OutputFolderError(
            f"{name} {resolution!r}: supported are multiples of 16 from 16 to {MAX_RESOLUTION} (the diptych is cut "
            "into 16-pixel tokens); use e.g. 256, 512 or 768"
        )
    return resolution
