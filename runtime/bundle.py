"""Read and check a bundle folder (Bundle format v1): ONNX graphs, optional TensorRT plans and torch programs, manifest.

A bundle is what ``unidg export onnx`` writes and every runtime backend reads. ``load_bundle`` refuses, with a message
naming the bundle and the fix: a folder that is not a bundle, another format version, files missing or changed since
export (sha256), settings that contradict the recorded shapes, and a bundle made for other settings than the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from unidg.core.latents import COND_CHANNELS, LATENT_CHANNELS, PACKED_CHANNELS, VAE_SCALE, VAE_SHIFT
from unidg.core.layout import DiptychLayout, HasLayout
from unidg.core.manifest import ManifestError, read_manifest, verify_files
from unidg.core.settings import UniDGSettings
from unidg.core.text import CLIP_GRAPH, T5_GRAPH, TEXT_GRAPH_IO, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

BUNDLE_KIND = "bundle"
BUNDLE_FORMAT = "unidg-bundle"
BUNDLE_FORMAT_VERSION = 1
# Version 2 adds the optional step-cache graphs and settings (``step_cache``); a runtime that reads only version 1
# refuses such a bundle by its version. A bundle without cache data is still written as version 1.
BUNDLE_FORMAT_VERSION_STEP_CACHE = 2
# Version 3 is a UniDG-Text bundle (``text``): the step graph takes CLIP's pooled output as one more input, and the
# text encoders and tokenizers ride along; a runtime that reads only versions 1-2 refuses it by its version.
BUNDLE_FORMAT_VERSION_TEXT = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)
GRAPH_NAMES = ("step", "vae_encoder", "vae_decoder", "image_encoder")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")

# Inputs and outputs of each graph, in call order (Bundle format v1).
STEP_INPUTS = ("x", "cond", "ctx", "key_bias", "sigma", "sigma_next", "guidance", "img_ids", "txt_ids")
STEP_OUTPUTS = ("x_next",)
TEXT_STEP_INPUTS = (*STEP_INPUTS, "pooled")  # a text bundle's step: CLIP's pooled output feeds pooled_projections
STEP_POSITION_INPUTS = ("img_ids", "txt_ids")  # token positions: the only step inputs without a batch axis
GRAPH_INPUTS = {
    "step": STEP_INPUTS,
    "vae_encoder": ("pixels",),
    "vae_decoder": ("latents",),
    "image_encoder": ("pixels",),
}
GRAPH_OUTPUTS = {
    "step": STEP_OUTPUTS,
    "vae_encoder": ("latents",),
    "vae_decoder": ("pixels",),
    "image_encoder": ("tokens",),
}


# The step graph cut after its first block (unidg.runtime.step_cache): head every step, tail on full steps, the cached
# step's output stage otherwise. Hidden states cross between them as float32 [B, N, D] / [B, C, D], temb as [B, D].
CACHE_GRAPH_NAMES = ("step_head", "step_tail", "step_cached")
CACHE_GRAPH_INPUTS = {
    "step_head": ("x", "cond", "ctx", "key_bias", "sigma", "guidance", "img_ids", "txt_ids"),
    "step_tail": ("hidden", "encoder_hidden", "temb", "key_bias", "img_ids", "txt_ids", "x", "sigma", "sigma_next"),
    "step_cached": ("hidden", "tail_residual", "temb", "x", "sigma", "sigma_next"),
}
# A UniDG-Text bundle's head also takes ``pooled``: the instruction enters the transformer only through temb, which
# the head hands to the tail and the cached step, so their inputs stay those above.
TEXT_CACHE_GRAPH_INPUTS = {**CACHE_GRAPH_INPUTS, "step_head": (*CACHE_GRAPH_INPUTS["step_head"], "pooled")}
CACHE_GRAPH_OUTPUTS = {
    "step_head": ("hidden", "encoder_hidden", "temb", "first_residual"),
    "step_tail": ("x_next", "tail_residual"),
    "step_cached": ("x_next",),
}


# Every graph a bundle may hold (the four of format 1, then the step-cache graphs of format 2): inputs and outputs.
ALL_GRAPH_INPUTS = {**GRAPH_INPUTS, **CACHE_GRAPH_INPUTS}
ALL_GRAPH_OUTPUTS = {**GRAPH_OUTPUTS, **CACHE_GRAPH_OUTPUTS}


class BundleError(ManifestError):
    """A bundle folder cannot be used: not a bundle, wrong version, changed files, inconsistent or foreign settings."""


Dim = int | str  # a fixed size, or a symbolic name for a dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[Dim, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


@dataclass(frozen=True)
class Bundle(HasLayout):
    """A checked bundle: its folder, manifest, settings and the shapes every backend needs."""

    path: Path
    settings: UniDGSettings
    metadata: dict
    files: dict[str, str]
    fingerprint: str  # files and manifest metadata (settings included): what batch resume and outputs record
    graphs: dict[str, GraphSpec]
    batch: int | None  # None: dynamic batch
    engines: dict = field(default_factory=dict)
    cache_graphs: dict[str, GraphSpec] = field(default_factory=dict)  # empty: no step-cache graphs (format v1)
    text_graphs: dict[str, GraphSpec] = field(default_factory=dict)  # clip_text, t5_text: a UniDG-Text bundle

    @property
    def text(self) -> dict:
        """The manifest's UniDG-Text table (encoder graphs, tokenizers, pooled width); empty in reference mode."""
        table = self.metadata.get("text")
        return table if isinstance(table, dict) else {}

    @property
    def step_inputs(self) -> tuple[str, ...]:
        """The step graph's inputs in call order: Bundle format v1's, plus ``pooled`` in a text bundle."""
        return TEXT_STEP_INPUTS if self.text else STEP_INPUTS

    @property
    def cache_inputs(self) -> dict[str, tuple[str, ...]]:
        """The step-cache graphs' inputs in call order (a text bundle's head also takes ``pooled``)."""
        return cache_graph_inputs(bool(self.text))

    @property
    def step_cache(self) -> dict:
        """The manifest's step-cache table (graphs, hidden size, the gate's record); empty without one."""
        table = self.metadata.get("step_cache")
        return table if isinstance(table, dict) else {}

    # Shape facts, straight from the manifest (checked against each other by load_bundle).
    @property
    def resolution(self) -> int:
        return int(self.metadata["resolution"])

    @property
    def precision(self) -> str:
        return str(self.metadata.get("precision", "fp32"))

    @property
    def fold_text_tokens(self) -> bool:
        return bool(self.metadata["fold_text_tokens"])

    @property
    def text_tokens(self) -> int:
        return int(self.metadata["text_tokens"])

    @property
    def reference_tokens(self) -> int:
        return int(self.metadata["reference_tokens"])

    @property
    def context_tokens(self) -> int:
        return int(self.metadata["context_tokens"])

    @property
    def joint_dim(self) -> int:
        return int(self.metadata["joint_dim"])

    @property
    def reference_size(self) -> int:
        return int(self.metadata["reference_size"])

    @property
    def vae_scale(self) -> float:
        return float(self.metadata.get("vae_scale", VAE_SCALE))

    @property
    def vae_shift(self) -> float:
        return float(self.metadata.get("vae_shift", VAE_SHIFT))

    def file_path(self, relative: str) -> Path:
        return self.path / relative

    def graph_path(self, name: str) -> Path:
        graph = self.graphs.get(name) or self.cache_graphs.get(name) or self.text_graphs[name]
        return self.path / graph.file

    def describe(self) -> str:
        batch = "dynamic" if self.batch is None else str(self.batch)
        return (
            f"bundle {self.path.name} (S={self.resolution}, {self.precision}, attention "
            f"{self.metadata.get('attention', '?')}, fold={self.fold_text_tokens}, batch {batch}, "
            f"{'UniDG-Text, ' if self.text else ''}"
            f"fingerprint {self.fingerprint[:12]})"
        )


def _fail(folder: Path, problem: str, fix: str = "re-export it with `unidg export onnx`") -> BundleError:
    return BundleError(f"bundle {folder}: {problem}; {fix}")


def _parse_shape(folder: Path, where: str, raw: object) -> tuple[Dim, ...]:
    if not isinstance(raw, list | tuple) or not all(isinstance(d, int | str) for d in raw):
        raise _fail(folder, f"{where} has shape {raw!r}, expected a list of ints / axis names")
    return tuple(raw)


def _parse_graph(
    folder: Path,
    name: str,
    raw: object,
    files: dict[str, str],
    inputs: dict[str, tuple[str, ...]] = GRAPH_INPUTS,
    outputs: dict[str, tuple[str, ...]] = GRAPH_OUTPUTS,
) -> GraphSpec:
    if not isinstance(raw, dict) or "file" not in raw:
        raise _fail(folder, f"manifest graph '{name}' has no 'file'")
    specs: dict[str, dict[str, TensorSpec]] = {}
    for direction, wanted in (("inputs", inputs[name]), ("outputs", outputs[name])):
        given = raw.get(direction)
        if not isinstance(given, dict):
            raise _fail(folder, f"manifest graph '{name}' has no '{direction}' table")
        missing = [t for t in wanted if t not in given]
        if missing:
            raise _fail(folder, f"graph '{name}' lacks {direction} {missing} (Bundle format v1 needs {list(wanted)})")
        specs[direction] = {
            t: TensorSpec(
                _parse_shape(folder, f"{name}.{t}", given[t].get("shape")), str(given[t].get("dtype", "float32"))
            )
            for t in wanted
        }
        wrong = [f"{t}: {s.dtype}" for t, s in specs[direction].items() if s.dtype != "float32"]
        if wrong:
            raise _fail(folder, f"graph '{name}' has non-float32 I/O {wrong}; v1 graphs take and give float32")
    if raw["file"] not in files:
        raise _fail(folder, f"graph file {raw['file']} is not listed in the manifest's files")
    return GraphSpec(name=name, file=raw["file"], inputs=specs["inputs"], outputs=specs["outputs"])


def _parse_batch(folder: Path, raw: object) -> int | None:
    if raw == "dynamic":
        return None
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        return raw
    raise _fail(folder, f"manifest 'batch' is {raw!r}; expected a positive int or 'dynamic'")


def expected_shapes(meta: dict, batch: Dim) -> dict[str, dict[str, tuple[Dim, ...]]]:
    """The v1 shape of every graph tensor for the manifest's facts (``batch``: an int, or any axis name)."""
    layout = DiptychLayout(int(meta["resolution"]))
    n, (h, w), pixel_hw = layout.image_tokens, layout.latent_hw, layout.pixel_hw
    c, j, r, p = (int(meta[k]) for k in ("context_tokens", "joint_dim", "reference_tokens", "reference_size"))
    return {
        "step": {
            "x": (batch, n, PACKED_CHANNELS),
            "cond": (batch, n, COND_CHANNELS),
            "ctx": (batch, c, j),
            "key_bias": (batch, c + n),
            "sigma": (batch,),
            "sigma_next": (batch,),
            "guidance": (batch,),
            "img_ids": (n, 3),
            "txt_ids": (c, 3),
            "x_next": (batch, n, PACKED_CHANNELS),
            **({"pooled": (batch, int(meta["text"]["pooled_dim"]))} if isinstance(meta.get("text"), dict) else {}),
        },
        "vae_encoder": {"pixels": (batch, 3, *pixel_hw), "latents": (batch, LATENT_CHANNELS, h, w)},
        "vae_decoder": {"latents": (batch, LATENT_CHANNELS, h, w), "pixels": (batch, 3, *pixel_hw)},
        "image_encoder": {"pixels": (batch, 3, p, p), "tokens": (batch, r, j)},
    }


def shape_mismatch(expected: tuple[Dim, ...], actual: tuple[Dim, ...]) -> bool:
    """True when two shapes disagree on rank or on any axis that both give as a fixed int."""
    if len(expected) != len(actual):
        return True
    return any(isinstance(e, int) and isinstance(a, int) and e != a for e, a in zip(expected, actual))


def _check_shapes(folder: Path, meta: dict, graphs: dict[str, GraphSpec], batch: int | None) -> None:
    want = expected_shapes(meta, batch if batch is not None else "batch")
    for name, graph in graphs.items():
        for tensor, spec in {**graph.inputs, **graph.outputs}.items():
            expected = want[name][tensor]
            if shape_mismatch(expected, spec.shape):
                raise _fail(
                    folder,
                    f"graph '{name}' tensor '{tensor}' has shape {list(spec.shape)} but the manifest's settings "
                    f"(S={meta['resolution']}, C={meta['context_tokens']}, J={meta['joint_dim']}, "
                    f"R={meta['reference_tokens']}, P={meta['reference_size']}, batch={meta['batch']}) "
                    f"need {list(expected)}",
                    "the manifest and the graphs come from different exports; re-export the bundle",
                )


def _check_facts(folder: Path, meta: dict, settings: UniDGSettings) -> None:
    required = (
        "resolution",
        "fold_text_tokens",
        "text_tokens",
        "reference_tokens",
        "context_tokens",
        "joint_dim",
        "reference_size",
        "batch",
    )
    missing = [k for k in required if k not in meta]
    if missing:
        raise _fail(folder, f"manifest metadata lacks {missing}")
    for key in ("resolution", "text_tokens", "reference_tokens", "context_tokens", "joint_dim", "reference_size"):
        value = meta[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(folder, f"manifest '{key}' is {value!r}, expected a positive int")
    if meta["resolution"] != settings.resolution:
        raise _fail(folder, f"manifest resolution {meta['resolution']} != settings resolution {settings.resolution}")
    if bool(meta["fold_text_tokens"]) != settings.fold_text_tokens:
        raise _fail(folder, "manifest fold_text_tokens contradicts its settings")
    if meta["text_tokens"] != settings.text_tokens:
        raise _fail(folder, f"manifest text_tokens {meta['text_tokens']} != settings K {settings.text_tokens}")
    context = (1 if meta["fold_text_tokens"] else meta["text_tokens"]) + meta["reference_tokens"]
    if meta["context_tokens"] != context:
        raise _fail(
            folder,
            f"manifest context_tokens {meta['context_tokens']} != (1 if folded else K) + R = {context}",
        )
    if meta.get("latent_channels", LATENT_CHANNELS) != LATENT_CHANNELS:
        raise _fail(folder, f"latent_channels {meta['latent_channels']} != {LATENT_CHANNELS} (FLUX VAE)")
    precision = meta.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise _fail(folder, f"unknown precision {precision!r} (known: {list(PRECISIONS)})")


def _compare_settings(folder: Path, have: UniDGSettings, want: UniDGSettings) -> None:
    # Sampling defaults (steps, guidance) may differ: they are per-request choices, not part of the graphs.
    per_request = {"steps", "guidance"}
    diffs = [
        f"{k}: bundle {v!r} vs requested {want.to_dict()[k]!r}"
        for k, v in have.to_dict().items()
        if k not in per_request and want.to_dict()[k] != v
    ]
    if diffs:
        raise _fail(
            folder,
            "was exported for other UniDG settings (" + "; ".join(diffs) + ")",
            "use a bundle exported with these settings, or drop the settings override",
        )


def load_bundle(
    path: str | Path,
    *,
    verify: bool = True,
    expected_settings: UniDGSettings | None = None,
) -> Bundle:
    """Read ``path/manifest.json`` and check the bundle; ``verify`` re-hashes every file (sha256).

    ``expected_settings``: refuse a bundle exported for other UniDG settings (alpha, beta, resolution, K, folding...).
    """
    folder = Path(path)
    if not folder.exists():
        raise BundleError(f"bundle {folder} does not exist; pass the folder written by `unidg export onnx`")
    manifest = read_manifest(folder, kind=BUNDLE_KIND)
    meta = manifest.metadata
    if meta.get("format") != BUNDLE_FORMAT:
        raise _fail(folder, f"manifest format is {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    version = meta.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise _fail(
            folder,
            f"format_version {version!r} is not supported (this unidg reads format_version "
            f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))})",
            "export the bundle with the same unidg release as the runtime",
        )
    if not isinstance(meta.get("settings"), dict) or not meta["settings"]:
        raise _fail(folder, "manifest has no 'settings' table")
    try:
        settings = UniDGSettings.from_dict(meta["settings"])
    except (TypeError, ValueError) as error:
        raise _fail(folder, f"manifest settings are invalid ({error})") from error
    _check_facts(folder, meta, settings)
    batch = _parse_batch(folder, meta["batch"])
    raw_graphs = meta.get("graphs")
    if not isinstance(raw_graphs, dict):
        raise _fail(folder, "manifest has no 'graphs' table")
    missing = [g for g in GRAPH_NAMES if g not in raw_graphs]
    if missing:
        raise _fail(folder, f"manifest lacks graphs {missing} (Bundle format v1 needs {list(GRAPH_NAMES)})")
    text_graphs = _parse_text(folder, meta, manifest.files, version)
    inputs = {**GRAPH_INPUTS, "step": TEXT_STEP_INPUTS} if text_graphs else GRAPH_INPUTS
    graphs = {name: _parse_graph(folder, name, raw_graphs[name], manifest.files, inputs) for name in GRAPH_NAMES}
    _check_shapes(folder, meta, graphs, batch)
    if verify:
        try:
            verify_files(folder, manifest)
        except ManifestError as error:
            raise BundleError(f"bundle {folder}: {error}") from error
    if expected_settings is not None:
        _compare_settings(folder, settings, expected_settings)
    cache_graphs = _parse_step_cache(folder, meta, manifest.files, batch, version)
    engines = meta.get("engines") or {}
    if not isinstance(engines, dict):
        raise _fail(folder, f"manifest 'engines' is {type(engines).__name__}, expected a table")
    return Bundle(
        path=folder,
        settings=settings,
        metadata=meta,
        files=dict(manifest.files),
        fingerprint=manifest.content_fingerprint,
        graphs=graphs,
        batch=batch,
        engines=engines,
        cache_graphs=cache_graphs,
        text_graphs=text_graphs,
    )


def cache_graph_inputs(text: bool) -> dict[str, tuple[str, ...]]:
    """The step-cache graphs' inputs in call order, in a reference-mode or a UniDG-Text (``text``) bundle."""
    return TEXT_CACHE_GRAPH_INPUTS if text else CACHE_GRAPH_INPUTS


def expected_cache_shapes(meta: dict, hidden_dim: int, batch: Dim) -> dict[str, dict[str, tuple[Dim, ...]]]:
    """The shape of every step-cache graph tensor (``hidden_dim``: the transformer's inner width D)."""
    inputs = cache_graph_inputs(isinstance(meta.get("text"), dict))
    step = expected_shapes(meta, batch)["step"]
    n, c = step["x"][1], step["ctx"][1]
    hidden, encoder, temb = (batch, n, hidden_dim), (batch, c, hidden_dim), (batch, hidden_dim)
    common = {**step, "hidden": hidden, "encoder_hidden": encoder, "temb": temb}
    tables = {
        "step_head": {**common, "first_residual": hidden},
        "step_tail": {**common, "tail_residual": hidden},
        "step_cached": {**common, "tail_residual": hidden},
    }
    return {
        name: {t: tables[name][t] for t in (*inputs[name], *CACHE_GRAPH_OUTPUTS[name])} for name in CACHE_GRAPH_NAMES
    }


def bundle_graph_names(bundle: Bundle) -> tuple[str, ...]:
    """The graphs ``bundle`` holds: the four of format 1, plus the step-cache graphs when it has them."""
    return (*GRAPH_NAMES, *(CACHE_GRAPH_NAMES if bundle.cache_graphs else ()))


def bundle_shapes(meta: dict, batch: Dim) -> dict[str, dict[str, tuple[Dim, ...]]]:
    """``expected_shapes`` plus, for a manifest with a step-cache table, the step-cache graphs' shapes."""
    shapes = expected_shapes(meta, batch)
    table = meta.get("step_cache")
    if isinstance(table, dict) and table.get("hidden_dim"):
        shapes.update(expected_cache_shapes(meta, int(table["hidden_dim"]), batch))
    return shapes


def _parse_step_cache(
    folder: Path, meta: dict, files: dict[str, str], batch: int | None, version: object
) -> dict[str, GraphSpec]:
    table = meta.get("step_cache")
    if table is None:
        return {}
    if version not in (BUNDLE_FORMAT_VERSION_STEP_CACHE, BUNDLE_FORMAT_VERSION_TEXT):
        raise _fail(folder, f"manifest has a 'step_cache' table but format_version {version!r} (needs 2 or 3)")
    if not isinstance(table, dict) or not isinstance(table.get("graphs"), dict):
        raise _fail(folder, "manifest 'step_cache' has no 'graphs' table", "re-run `unidg export cache-graphs`")
    hidden_dim = table.get("hidden_dim")
    if not isinstance(hidden_dim, int) or isinstance(hidden_dim, bool) or hidden_dim < 1:
        raise _fail(folder, f"step_cache hidden_dim is {hidden_dim!r}, expected a positive int")
    missing = [g for g in CACHE_GRAPH_NAMES if g not in table["graphs"]]
    if missing:
        raise _fail(folder, f"step_cache lacks graphs {missing}", "re-run `unidg export cache-graphs`")
    inputs = cache_graph_inputs(isinstance(meta.get("text"), dict))
    graphs = {
        name: _parse_graph(folder, name, table["graphs"][name], files, inputs, CACHE_GRAPH_OUTPUTS)
        for name in CACHE_GRAPH_NAMES
    }
    want = expected_cache_shapes(meta, hidden_dim, batch if batch is not None else "batch")
    for name, graph in graphs.items():
        for tensor, spec in {**graph.inputs, **graph.outputs}.items():
            if shape_mismatch(want[name][tensor], spec.shape):
                raise _fail(
                    folder,
                    f"step-cache graph '{name}' tensor '{tensor}' has shape {list(spec.shape)}, the manifest's "
                    f"settings need {list(want[name][tensor])}",
                    "re-run `unidg export cache-graphs`",
                )
    return graphs


def _parse_text(folder: Path, meta: dict, files: dict[str, str], version: object) -> dict[str, GraphSpec]:
    """The encoder graphs of a UniDG-Text bundle (its ``text`` table), checked; {} for a reference-mode bundle."""
    table = meta.get("text")
    if table is None:
        if version == BUNDLE_FORMAT_VERSION_TEXT:  # its step graph takes `pooled`, which nothing would feed
            raise _fail(folder, "format_version 3 is a UniDG-Text bundle, but the manifest has no 'text' table")
        return {}
    if version != BUNDLE_FORMAT_VERSION_TEXT:
        raise _fail(folder, f"manifest has a 'text' table but format_version {version!r} (needs 3)")
    if meta.get("fold_text_tokens"):
        raise _fail(folder, "a UniDG-Text bundle cannot fold its text tokens (fold_text_tokens is true)")
    if not isinstance(table, dict) or not isinstance(table.get("graphs"), dict):
        raise _fail(folder, "manifest 'text' has no 'graphs' table")
    pooled = table.get("pooled_dim")
    if not isinstance(pooled, int) or isinstance(pooled, bool) or pooled < 1:
        raise _fail(folder, f"text pooled_dim is {pooled!r}, expected a positive int")
    tokenizers = table.get("tokenizers")
    if not isinstance(tokenizers, dict) or set(tokenizers) != {"clip", "t5"}:
        raise _fail(folder, f"text tokenizers is {tokenizers!r}, expected folders for 'clip' and 't5'")
    for which, sub in tokenizers.items():
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):  # the runtime's tokenizers read both
            if f"{sub}/{name}" not in files:
                raise _fail(folder, f"the {which} tokenizer folder {sub}/ has no {name} in the manifest's files")
    graphs = {}
    for name, (inputs, outputs) in TEXT_GRAPH_IO.items():
        raw = table["graphs"].get(name)
        if not isinstance(raw, dict) or raw.get("file") not in files:
            raise _fail(folder, f"text graph '{name}' is missing or its file is not listed in the manifest's files")
        specs = {}
        for direction, wanted, dtype in (("inputs", inputs, "int64"), ("outputs", outputs, "float32")):
            given = raw.get(direction) or {}
            if (
                not isinstance(given, dict)
                or tuple(given) != wanted
                or any(not isinstance(given[t], dict) or given[t].get("dtype") != dtype for t in wanted)
            ):
                raise _fail(folder, f"text graph '{name}' {direction} are {given!r}, expected {list(wanted)} {dtype}")
            specs[direction] = {
                t: TensorSpec(_parse_shape(folder, f"{name}.{t}", given[t].get("shape")), dtype) for t in wanted
            }
        graphs[name] = GraphSpec(name, raw["file"], specs["inputs"], specs["outputs"])
    t5_width = graphs[T5_GRAPH].outputs["hidden"].shape[-1:]
    clip_width = graphs[CLIP_GRAPH].outputs["pooled"].shape[-1:]
    if t5_width != (meta["joint_dim"],) or clip_width != (pooled,):
        raise _fail(
            folder,
            f"the text graphs' widths do not feed the step graph: T5 hidden {list(t5_width)} for joint_dim "
            f"{meta['joint_dim']}, CLIP pooled {list(clip_width)} for pooled_dim {pooled}",
        )
    return graphs
