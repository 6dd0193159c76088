"""DefectSynthesizer: reference defect + source image + target mask -> source with the defect painted in.

    synth = DefectSynthesizer.from_bundle("bundle/", backend="onnxruntime")
    result = synth.generate(SynthesisRequest.from_files("ref.png", "ref_mask.png", "src.png", "mask.png", seed=7))
    result.image, result.mask, result.metadata

One request runs: diptych (Alg. 1, runtime.geometry) -> masked diptych VAE-encoded once and the reference encoded once
-> Fill condition, context tokens, key bias -> ``steps`` Euler steps of the step graph from seeded noise -> VAE decode
-> right half pasted back into the source, so every pixel outside the dilated target mask is the source's own.
Requests with the same step count run as one batch (up to the bundle's batch size; a static bundle pads with copies).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from unidg import __version__
from unidg.core import images
from unidg.core.attention_bias import build_key_bias
from unidg.core.errors import OptionError, UniDGError
from unidg.core.geometry import (
    Diptych,
    build_text_diptych,
    defect_token_mask,
    dilated_target_mask,
    paste_back,
    right_half,
)
from unidg.core.latents import (
    fill_condition,
    model_to_pixels,
    pixels_to_model,
    text_ids,
    unpack_latents,
)
from unidg.core.settings import UniDGSettings
from unidg.core.udg import check_category
from unidg.runtime.backends import Backend, StepConditioning, create_backend
from unidg.runtime.backends.base import check_finite
from unidg.runtime.bundle import Bundle, load_bundle
from unidg.runtime.prompt_encoder import PromptEncoder
from unidg.runtime.sampler import MAX_SEED, ProgressCallback, denoise, denoise_cached, initial_noise, sampling_sigmas
from unidg.runtime.step_cache import OFF, StepCache, StepCacheError, bundle_step_cache

MAX_STEPS = 1000
DEFAULT_MAX_BATCH = 4
NOISE_RECIPE = "numpy.random.default_rng(seed).standard_normal((N, 64), dtype=float32)"


class RequestError(UniDGError):
    """A request option (seed, steps, guidance, category) is unusable; ``option`` names it, the message says why."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True, eq=False)
class SynthesisRequest:
    """Inputs of one generation: uint8 (H, W, 3) RGB images, bool (H, W) masks; options default to the bundle's.

    UniDG-Text bundles: ``prompt`` is the instruction (default with a reference: the bundle's reference instruction);
    without a reference (``reference`` and ``reference_mask`` None) it is required.
    """

    reference: np.ndarray | None
    reference_mask: np.ndarray | None
    source: np.ndarray
    target_mask: np.ndarray
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    category: str | None = None
    prompt: str | None = None
    name: str = "request"  # names the request in errors and metadata (job id, file name)
    # Set by DefectSynthesizer.check (the one validation of a request): the layers inside trust a checked request.
    checked: bool = field(default=False, repr=False)

    @classmethod
    def from_files(
        cls,
        reference: str | Path | None,
        reference_mask: str | Path | None,
        source: str | Path,
        target_mask: str | Path,
        **options: object,
    ) -> SynthesisRequest:
        """Read and check the files (errors name the input and its file); no reference pair: an instruction alone."""
        arrays = images.load_request(reference, reference_mask, source, target_mask)
        return cls(*arrays, **options)


@dataclass(eq=False)
class SynthesisResult:
    image: np.ndarray  # (H, W, 3) uint8: the source with the generated defect; outside ``mask`` == source
    mask: np.ndarray  # (H, W) bool: the dilated target mask (the only pixels that may differ from the source)
    diptych: np.ndarray  # (S, 2S, 3) uint8: the decoded diptych (left: reference crop, right: generated square)
    metadata: dict = field(default_factory=dict)


def check_request_options(request: SynthesisRequest, settings: UniDGSettings) -> SynthesisRequest:
    """Validate seed/steps/guidance/category and fill defaults from ``settings``; returns the completed request."""
    name = request.name
    seed = request.seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) <= MAX_SEED:
        raise RequestError(f"{name}: seed must be an integer in [0, 2^63 - 1] (got {seed!r})", "seed")
    steps = settings.steps if request.steps is None else request.steps
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or not 1 <= int(steps) <= MAX_STEPS:
        raise RequestError(
            f"{name}: steps must be an integer in [1, {MAX_STEPS}] (got {steps!r}); the model was trained for "
            f"{settings.steps}",
            "steps",
        )
    guidance = settings.guidance if request.guidance is None else request.guidance
    if isinstance(guidance, bool) or not isinstance(guidance, int | float | np.floating | np.integer):
        raise RequestError(f"{name}: guidance must be a number (got {guidance!r})", "guidance")
    if not math.isfinite(float(guidance)) or float(guidance) < 0:
        raise RequestError(
            f"{name}: guidance must be a finite number >= 0 (got {guidance!r}); this model's default is "
            f"{settings.guidance}",
            "guidance",
        )
    category = request.category
    if category is not None:
        try:
            check_category(category)
        except UniDGError as error:
            raise RequestError(f"{name}: {error}", "category") from error
    return replace(request, seed=int(seed), steps=int(steps), guidance=float(guidance))


def resolve_step_cache(
    bundle: Bundle, backend: Backend, mode: str | None, threshold: float | None
) -> tuple[StepCache, bool]:
    """The cache setting a synthesizer runs with, and whether the caller chose it: ``mode`` None takes the bundle's
    gated default, which turns off on a backend that cannot run the cache graphs; a chosen mode is refused there."""
    step_cache = bundle_step_cache(bundle, mode, threshold)
    chosen = mode is not None or threshold is not None
    problem = backend.step_cache_problem(step_cache.mode) if step_cache.enabled else None
    if problem:
        if not chosen:
            return OFF, False
        raise StepCacheError(problem)
    return step_cache, chosen


def resize_reference(crop: np.ndarray, size: int) -> np.ndarray:
    """The S x S reference crop at the image encoder's input size (Pillow bicubic, as the bundle contract says)."""
    if crop.shape[:2] == (size, size):
        return crop
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


class DefectSynthesizer:
    """Runs UniDG generation on one bundle with one backend. Thread-compatible, not thread-safe: one call at a time."""

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        max_batch: int | None = None,
        step_cache: StepCache = OFF,
        cache_chosen: bool = False,
    ) -> None:
        """``step_cache``: the cache setting (unidg.runtime.step_cache); ``cache_chosen``: asked for by the caller,
        so a static schedule refuses requests of another step count (the bundle's default just turns off for them)."""
        self.bundle = bundle
        self.backend = backend
        # UniDG-Text: the instruction encoders run in onnxruntime beside the backend (its device; CPU otherwise).
        self.prompts = PromptEncoder(bundle, *backend.onnxruntime_placement()) if bundle.text else None
        self.step_cache = step_cache
        self.cache_chosen = cache_chosen
        if max_batch is not None and max_batch < 1:
            raise OptionError(f"max_batch (--batch-size) {max_batch}: give a batch size >= 1")
        # A static bundle runs exactly its batch; a dynamic one up to max_batch (default 4) within the backend's limit.
        if bundle.batch is not None:
            self.batch_size = bundle.batch
        else:
            self.batch_size = min(max_batch or DEFAULT_MAX_BATCH, backend.max_batch or DEFAULT_MAX_BATCH * 1024)

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        backend: str = "onnxruntime",
        *,
        verify: bool = True,
        settings: UniDGSettings | None = None,
        max_batch: int | None = None,
        cache: str | None = None,
        cache_threshold: float | None = None,
        **backend_options: object,
    ) -> DefectSynthesizer:
        """Load and check the bundle at ``path`` (manifest, sha256 of every file, shapes) and create the backend.

        ``settings``: refuse a bundle exported for other UniDG settings. ``cache`` (off, static, dynamic; None: the
        bundle's gated default) and ``cache_threshold``: step caching (unidg.runtime.step_cache). ``backend_options``
        go to the backend (onnxruntime: providers=["cuda"], threads=4; tensorrt: device=0, cuda_graph=True; torch:
        device="cuda").
        """
        bundle = load_bundle(path, verify=verify, expected_settings=settings)
        bundle_step_cache(bundle, cache, cache_threshold)  # refuse a bad setting before loading the graphs
        backend_instance = create_backend(backend, bundle, **backend_options)
        try:
            step_cache, chosen = resolve_step_cache(bundle, backend_instance, cache, cache_threshold)
        except StepCacheError:
            backend_instance.close()
            raise
        return cls(bundle, backend_instance, max_batch=max_batch, step_cache=step_cache, cache_chosen=chosen)

    @property
    def settings(self) -> UniDGSettings:
        return self.bundle.settings

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> DefectSynthesizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ checking
    def check(self, request: SynthesisRequest) -> SynthesisRequest:
        """Validate a request completely without running the model; returns it with defaults filled in, marked
        checked (a checked request is not checked again)."""
        if request.checked:
            return request
        images.validate_request(request.reference, request.reference_mask, request.source, request.target_mask)
        dilated_target_mask(request.target_mask, self.settings.dilate_kernel, self.settings.dilate_iterations)
        checked = check_request_options(self._check_prompt(request), self.settings)
        if self.cache_chosen:
            try:
                self.step_cache.check_steps(checked.steps)
            except StepCacheError as error:
                raise RequestError(f"{checked.name}: {error}", "steps") from error
        return replace(checked, checked=True)

    def _check_prompt(self, request: SynthesisRequest) -> SynthesisRequest:
        """A text bundle's instruction (the reference instruction by default with a reference); none elsewhere."""
        name, prompt = request.name, request.prompt
        if self.prompts is None:
            if prompt is not None:
                raise RequestError(
                    f"{name}: a prompt was given but {self.bundle.path} is a reference-mode bundle (no text encoders); "
                    "drop the prompt, or use a UniDG-Text bundle (`unidg train text`, then `unidg export onnx`)",
                    "prompt",
                )
            if request.reference is None:
                raise RequestError(
                    f"{name}: no reference image; {self.bundle.path} is a reference-mode bundle and needs the "
                    "reference image and its defect mask",
                    "reference",
                )
            return request
        if prompt is None:
            if request.reference is None:
                raise RequestError(
                    f"{name}: without a reference image, say which defect to add: a prompt such as 'Add the scratch "
                    "defect to the image.'",
                    "prompt",
                )
            prompt = str(self.bundle.text["reference_instruction"])
        try:
            return replace(request, prompt=self.prompts.check(prompt, name))
        except UniDGError as error:
            raise RequestError(str(error), "prompt") from error

    def cache_for(self, steps: int) -> StepCache:
        """The cache setting a batch of ``steps`` steps runs with: a bundle's default schedule only at its length."""
        cache = self.step_cache
        if cache.mode == "static" and len(cache.schedule or ()) != steps and not self.cache_chosen:
            return OFF
        return cache

    # ---------------------------------------------------------------------------------------------- generating
    def generate(self, request: SynthesisRequest, progress: ProgressCallback | None = None) -> SynthesisResult:
        """One request; ``progress(step, total)`` after each step (returning False cancels: GenerationCancelled)."""
        return self.generate_batch([request], progress)[0]

    def generate_batch(
        self, requests: Sequence[SynthesisRequest], progress: ProgressCallback | None = None
    ) -> list[SynthesisResult]:
        """Many requests, batched where their step counts agree; results in request order.

        ``progress(done, total)`` counts steps over all batches. Every request is checked before any runs.
        """
        checked = [self.check(request) for request in requests]
        groups: dict[int, list[int]] = {}
        for index, request in enumerate(checked):
            groups.setdefault(request.steps, []).append(index)
        chunks = [
            indices[start : start + self.batch_size]
            for indices in groups.values()
            for start in range(0, len(indices), self.batch_size)
        ]
        total = sum(checked[chunk[0]].steps for chunk in chunks)
        results: list[SynthesisResult | None] = [None] * len(checked)
        done = 0
        for chunk in chunks:
            offset = done

            def chunk_progress(step: int, _steps: int, offset: int = offset) -> bool | None:
                return None if progress is None else progress(offset + step, total)

            outputs = self._run_chunk([checked[i] for i in chunk], chunk_progress)
            for index, result in zip(chunk, outputs):
                results[index] = result
            done += checked[chunk[0]].steps
        return results  # type: ignore[return-value]

    def _run_chunk(self, requests: list[SynthesisRequest], callback: Callable[[int, int], bool | None]) -> list:
        bundle, backend = self.bundle, self.backend
        settings = self.settings
        timings: dict[str, float] = {}
        started = time.perf_counter()

        diptychs = [self._diptych(r) for r in requests]
        count = len(requests)
        padded = count if bundle.batch is None else bundle.batch  # a static graph needs exactly its batch
        order = list(range(count)) + [count - 1] * (padded - count)
        pixel_mask = np.stack([diptychs[i].mask for i in order])[:, None].astype(np.float32)  # (B, 1, S, 2S)
        # As FluxFillPipeline: the VAE sees the diptych with the masked region zeroed in [-1, 1] space.
        masked_pixels = pixels_to_model(np.stack([diptychs[i].image for i in order])) * (1.0 - pixel_mask)
        reference_pixels = pixels_to_model(
            np.stack([resize_reference(diptychs[i].reference.image, bundle.reference_size) for i in order])
        )
        defect_tokens = np.stack([defect_token_mask(diptychs[i]) for i in order])
        timings["prepare"] = time.perf_counter() - started

        mark = time.perf_counter()
        latents = backend.encode_images(masked_pixels)
        check_finite(latents, "VAE encoder graph", bundle)
        timings["encode_images"] = time.perf_counter() - mark

        mark = time.perf_counter()
        reference_tokens = backend.encode_reference(reference_pixels)
        check_finite(reference_tokens, "image encoder graph", bundle)
        timings["encode_reference"] = time.perf_counter() - mark

        pooled = None
        if self.prompts is None:
            text = np.zeros((padded, bundle.context_tokens - bundle.reference_tokens, bundle.joint_dim), np.float32)
        else:
            mark = time.perf_counter()
            pooled, text = self.prompts.encode([requests[i].prompt for i in order])
            # As trained: a request without a reference has zero Redux tokens beside its black left half.
            with_reference = np.array([requests[i].reference is not None for i in order], np.float32)
            reference_tokens = reference_tokens * with_reference[:, None, None]
            timings["encode_prompt"] = time.perf_counter() - mark
        conditioning = StepConditioning(
            cond=fill_condition(latents, pixel_mask),
            ctx=np.ascontiguousarray(np.concatenate([text, reference_tokens.astype(np.float32)], axis=1)),
            key_bias=build_key_bias(
                defect_tokens,
                bundle.reference_tokens,
                bundle.text_tokens,
                settings.alpha,
                fold_text=bundle.fold_text_tokens,
            ),
            guidance=np.array([requests[i].guidance for i in order], dtype=np.float32),
            img_ids=bundle.layout.image_ids(),
            txt_ids=text_ids(bundle.context_tokens),
            pooled=pooled,
        )
        steps = requests[0].steps
        sigmas = sampling_sigmas(steps, bundle.image_tokens)
        noise = initial_noise([requests[i].seed for i in order], bundle.image_tokens)

        mark = time.perf_counter()
        cache = self.cache_for(steps)
        if cache.enabled:
            x, decider = denoise_cached(backend, noise, conditioning, sigmas, cache, callback)
            cache_report = decider.report()
        else:
            x = denoise(backend, noise, conditioning, sigmas, callback)
            cache_report = {"mode": "off", "steps": steps, "full_steps": steps, "cached_steps": 0}
        timings["denoise"] = time.perf_counter() - mark

        mark = time.perf_counter()
        h_latent, w_latent = bundle.latent_hw
        decoded = backend.decode_latents(unpack_latents(x, h_latent, w_latent))
        check_finite(decoded, "VAE decoder graph", bundle)
        diptych_images = model_to_pixels(decoded[:count])
        timings["decode"] = time.perf_counter() - mark

        mark = time.perf_counter()
        pasted = [paste_back(d, right_half(img), r.source) for d, img, r in zip(diptychs, diptych_images, requests)]
        timings["paste_back"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - started

        return [
            SynthesisResult(
                image=image,
                mask=diptych.dilated_mask.copy(),
                diptych=diptych_image,
                metadata={**self._metadata(request, diptych, timings, count), "step_cache": cache_report},
            )
            for request, diptych, diptych_image, image in zip(requests, diptychs, diptych_images, pasted)
        ]

    def _diptych(self, request: SynthesisRequest) -> Diptych:
        settings, size = self.settings, self.bundle.resolution
        if request.reference is None:  # UniDG-Text without a reference: black left half
            return build_text_diptych(
                request.source, request.target_mask, size, settings.dilate_kernel, settings.dilate_iterations
            )
        return settings.diptych(
            request.reference, request.reference_mask, request.source, request.target_mask, size, validated=True
        )

    def _metadata(self, request: SynthesisRequest, diptych: Diptych, timings: dict, batch: int) -> dict:
        bundle = self.bundle
        crop = diptych.reference
        text = {"prompt": request.prompt, "with_reference": request.reference is not None} if self.prompts else {}
        return {
            "name": request.name,
            "seed": request.seed,
            "steps": request.steps,
            "guidance": request.guidance,
            "category": request.category,
            **text,
            "noise": NOISE_RECIPE,
            "source_size": [int(request.source.shape[0]), int(request.source.shape[1])],
            "reference_crop": {
                "bbox": list(crop.bbox),
                "area_ratio": crop.area_ratio,
                "crop_ratio": crop.crop_ratio,
                "box": list(crop.box),
            },
            "settings": self.settings.to_dict(),
            "bundle": {
                "path": str(bundle.path),
                "fingerprint": bundle.fingerprint,
                "precision": bundle.precision,
                "attention": bundle.metadata.get("attention"),
                "batch": "dynamic" if bundle.batch is None else bundle.batch,
                "weights": bundle.metadata.get("weights"),
            },
            "backend": self.backend.name,
            "batch_size": batch,
            "timings_s": {k: round(v, 6) for k, v in timings.items()},
            "unidg_version": __version__,
        }
