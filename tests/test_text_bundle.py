"""UniDG-Text bundles (format 3) end to end on a tiny model: `unidg export onnx` of a merged UniDG-Text folder, the
runtime's instruction encoders, step graph and generation against the torch model, the refusals (prompts, backends,
text encoders, manifests) and `unidg generate --prompt`.

One tiny model serves the module: a nano merged SFT folder, `unidg train text` for 2 steps with random nano encoders,
`unidg train merge`, then one export with a dynamic batch (so one runtime pass mixes both instruction forms) and
torch programs (for `--backend torch`)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from runtime_fixtures import rewrite_manifest, sample_request_arrays, write_sample_files
from text_fixtures import tiny_text_weights

from unidg.cli import main
from unidg.core.geometry import build_text_diptych, defect_token_mask, right_half
from unidg.core.images import InputError
from unidg.core.instructions import REFERENCE_INSTRUCTION
from unidg.core.latents import pixels_to_model
from unidg.core.manifest import read_manifest, sha256_file
from unidg.core.text import CLIP_GRAPH, CLIP_TOKENIZER_FOLDER, T5_GRAPH, T5_TOKENIZER_FOLDER, TOKENIZER_FILE
from unidg.core.weights_folder import WeightsError
from unidg.export.bundle import export_bundle
from unidg.export.cache_graphs import add_cache_graphs, cache_example_inputs
from unidg.export.onnx_export import ModelFacts, step_example_inputs
from unidg.export.step_model import StepModel
from unidg.runtime.backends import create_backend
from unidg.runtime.backends.base import BackendError, StepConditioning
from unidg.runtime.bundle import GRAPH_NAMES, TEXT_STEP_INPUTS, BundleError, load_bundle
from unidg.runtime.demo import DEFAULT_BUNDLE
from unidg.runtime.prompt_encoder import PromptEncoder
from unidg.runtime.sampler import initial_noise, sampling_sigmas
from unidg.runtime.synthesizer import DefectSynthesizer, RequestError, SynthesisRequest, resize_reference
from unidg.train.loading import load_model
from unidg.train.model import UniDGModel, image_ids, unpack_latents
from unidg.train.text_encoders import TextEncoders, load_text_encoders
from unidg.train.text_sft import encoders_digest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# K = 32 of the tiny T5's tokens: the short instructions below fit; the reference instruction (43 tokens) does not and
# is truncated to K, as `unidg train text` truncated it for every reference-form sample.
K = 32
PROMPT = "Add the scratch defect to the image."  # 25 tokens
OTHER_PROMPT = "Add the sharp combined defect to the image."
PROMPTS = [
    PROMPT,
    OTHER_PROMPT,
    "Add the 裂纹 defect to the image.",
    "Add the small 🙂 scratch defect to the image 🔧🔩.",
    "<|endoftext|> add the <pad> crack </s> defect <unk>",
    "Ｆｕｌｌｗｉｄｔｈ ｃｒａｃｋ and ﬁne ligatures",
]
TOO_LONG = "Add the brown, diagonal foreign matter defect to the image."  # 35 tokens
STEPS = 3
ENCODER_TOLERANCE = 1e-5  # the same fp32 encoders in onnxruntime and torch
STEP_TOLERANCE = 1e-4  # one fp32 step graph vs the torch step
# The runtime rounds the decoded diptych to uint8; the torch side stays float: rounding (0.5) plus the loop's float
# differences (a few 1e-5 of [-1, 1], i.e. < 0.01 of a pixel level).
PIXEL_TOLERANCE = 0.5 + 0.02


# ---------------------------------------------------------------------------------------------- the tiny model
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_text_weights(tmp_path_factory.mktemp("text"), text_tokens=K)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, weights: Path) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "text-bundle"
    args = ["export", "onnx", "--weights", str(weights), "--out", str(out), "--batch", "dynamic", "--max-batch", "4"]
    args.append("--torch-programs")
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def model(weights: Path) -> UniDGModel:
    return load_model(weights)


@pytest.fixture(scope="module")
def encoders(weights: Path) -> TextEncoders:
    return load_text_encoders(weights.parent / "run" / "text_encoders")


@pytest.fixture(scope="module")
def synth(bundle: Path):
    with DefectSynthesizer.from_bundle(bundle, threads=1) as synthesizer:
        yield synthesizer


def _request(with_reference: bool = False, **options) -> SynthesisRequest:
    reference, reference_mask, source, target_mask = sample_request_arrays(seed=1)
    if not with_reference:
        reference = reference_mask = None
    return SynthesisRequest(reference, reference_mask, source, target_mask, **options)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---------------------------------------------------------------------------------------------- export
def test_export_writes_a_format_3_bundle(bundle: Path, weights: Path, model: UniDGModel) -> None:
    loaded = load_bundle(bundle)  # the runtime's checks: format, sha256 of every file, shapes, the text table
    meta = loaded.metadata
    assert meta["weights"] == {"path": weights.name, "fingerprint": read_manifest(weights).fingerprint}
    assert meta["format_version"] == 3 and meta["fold_text_tokens"] is False and meta["text_tokens"] == K
    assert meta["context_tokens"] == K + model.reference_tokens
    text = meta["text"]
    pooled_dim = model.transformer.config.pooled_projection_dim
    assert text["mode"] == "instruction" and text["pooled_dim"] == pooled_dim
    assert text["tokenizers"] == {"clip": CLIP_TOKENIZER_FOLDER, "t5": T5_TOKENIZER_FOLDER}
    assert text["reference_instruction"] == REFERENCE_INSTRUCTION
    assert text["training"] == {"random_encoders": "nano", "no_reference": 0.5, "instruction_seed": 0}
    step = meta["graphs"]["step"]["inputs"]
    assert tuple(step) == TEXT_STEP_INPUTS == loaded.step_inputs and step["pooled"]["shape"] == ["batch", pooled_dim]
    session = ort.InferenceSession(str(bundle / "step.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(TEXT_STEP_INPUTS)  # the graph takes it, not just the table
    assert text["graphs"][T5_GRAPH]["outputs"]["hidden"]["shape"] == ["batch", "text_tokens", model.joint_dim]
    assert text["graphs"][CLIP_GRAPH]["outputs"]["pooled"]["shape"] == ["batch", pooled_dim]
    graph_files = {f"{name}.onnx" for name in (*GRAPH_NAMES, CLIP_GRAPH, T5_GRAPH)}
    tokenizer_files = {
        f"{folder}/{name}"
        for folder in (CLIP_TOKENIZER_FOLDER, T5_TOKENIZER_FOLDER)
        for name in (TOKENIZER_FILE, "tokenizer_config.json")
    }
    program_files = {f"torch/{name}.pt2" for name in GRAPH_NAMES}  # --torch-programs: the four graphs, not the encoders
    assert meta["torch_programs"] == {name: f"torch/{name}.pt2" for name in GRAPH_NAMES}
    assert set(loaded.files) == graph_files | tokenizer_files | program_files
    for name, digest in loaded.files.items():
        assert sha256_file(bundle / name) == digest, name
    assert set(loaded.text_graphs) == {CLIP_GRAPH, T5_GRAPH}


# ---------------------------------------------------------------------------------------------- parity
def test_prompt_encoder_equals_the_torch_encoders(synth: DefectSynthesizer, encoders: TextEncoders) -> None:
    # The reference instruction and the repeated word go past K (and CLIP's 77): truncated alike on both sides.
    texts = [*PROMPTS, REFERENCE_INSTRUCTION, "crack " * 100]
    prompts = PromptEncoder(synth.bundle, *synth.backend.onnxruntime_placement())
    pooled, hidden = prompts.encode(texts)
    want_pooled, want_hidden = (t.numpy() for t in encoders.encode(texts, max_length=K))
    assert pooled.shape == want_pooled.shape == (len(texts), synth.bundle.text["pooled_dim"])
    assert hidden.shape == want_hidden.shape == (len(texts), K, synth.bundle.joint_dim)
    pooled_error = float(np.abs(pooled - want_pooled).max())
    hidden_error = float(np.abs(hidden - want_hidden).max())
    figures = f"encoders: max |runtime - torch| CLIP pooled {pooled_error:.2e}, T5 states {hidden_error:.2e}"
    print(figures)
    assert pooled_error <= ENCODER_TOLERANCE and hidden_error <= ENCODER_TOLERANCE, figures
    # Kept instructions come back as encoded the first time, whatever they are batched with.
    again_pooled, again_hidden = prompts.encode([texts[2], "Add the dent defect to the image.", texts[0]])
    assert np.array_equal(again_pooled[[0, 2]], pooled[[2, 0]]) and np.array_equal(again_hidden[[0, 2]], hidden[[2, 0]])
    fresh = encoders.encode(["Add the dent defect to the image."], max_length=K)[1].numpy()
    assert float(np.abs(again_hidden[1] - fresh[0]).max()) <= ENCODER_TOLERANCE


def test_prompt_encoder_runs_with_the_backends_thread_policy(bundle: Path) -> None:
    for threads, spin in ((1, False), (2, True)):
        with DefectSynthesizer.from_bundle(bundle, threads=threads, spin=spin) as synth:
            for session in synth.prompts.sessions.values():
                options = session.get_session_options()
                assert options.intra_op_num_threads == threads
                assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(spin))


def test_step_graph_equals_the_torch_step(bundle: Path, model: UniDGModel, encoders: TextEncoders) -> None:
    facts = ModelFacts.of(model, model.settings.resolution, text=True)
    feeds = step_example_inputs(facts, batch=2, seed=3)
    pooled, hidden = encoders.encode(PROMPTS[:2], max_length=K)
    feeds["ctx"][:, :K] = hidden.numpy()  # T5 states, then the (random) Redux tokens
    feeds["pooled"] = pooled.numpy()
    session = ort.InferenceSession(str(bundle / "step.onnx"), providers=["CPUExecutionProvider"])
    (runtime,) = session.run(None, feeds)
    step = StepModel(model).eval()
    with torch.no_grad():
        expected = step(**{name: torch.from_numpy(value) for name, value in feeds.items()}).numpy()
        without_pooled = step(**{name: torch.from_numpy(value) for name, value in feeds.items() if name != "pooled"})
    error = float(np.abs(runtime - expected).max())
    moved = float(np.abs(expected - without_pooled.numpy()).max())
    figures = f"step: max |onnxruntime - torch| {error:.2e} (|x_next| up to {np.abs(expected).max():.2f})"
    figures += f"; zero pooled moves x_next by {moved:.2e}"
    print(figures)
    assert error <= STEP_TOLERANCE, figures
    assert moved > 10 * STEP_TOLERANCE, figures  # the graph reads pooled: zeros would give another step


@torch.no_grad()
def _torch_diptych(
    model: UniDGModel, encoders: TextEncoders, request: SynthesisRequest, prompt: str, zero_redux: bool
) -> np.ndarray:
    """The result diptych's float pixels (S, 2S, 3) in [0, 255] as `unidg train text` trained the model: the black
    left half and zero Redux tokens without a reference; context [T5 states; Redux tokens], never folded; CLIP's
    pooled output as pooled_projections; the runtime's noise, schedule and Euler step."""
    settings, size = model.settings, model.settings.resolution
    if request.reference is None:
        diptych = build_text_diptych(
            request.source, request.target_mask, size, settings.dilate_kernel, settings.dilate_iterations
        )
    else:
        diptych = settings.diptych(request.reference, request.reference_mask, request.source, request.target_mask)
    cond = model.build_condition(
        torch.from_numpy(pixels_to_model(diptych.image[None])), torch.from_numpy(diptych.mask[None])
    )
    reference = resize_reference(diptych.reference.image, model.reference_size)
    redux = model.encode_reference(torch.from_numpy(pixels_to_model(reference[None])))
    if zero_redux:
        redux = torch.zeros_like(redux)
    pooled, hidden = encoders.encode([prompt], max_length=K)
    ctx, txt_ids = model.context(redux, fold_text=False, text_states=hidden)
    key_bias = model.key_bias(torch.from_numpy(defect_token_mask(diptych)[None]), fold_text=False)
    height, width = size // 16, 2 * size // 16
    ids = image_ids(height, width)
    x = torch.from_numpy(initial_noise([request.seed], height * width))
    sigmas = sampling_sigmas(request.steps, height * width).tolist()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = model.velocity(x, cond, ctx, key_bias, sigma, request.guidance, ids, txt_ids, pooled=pooled)
        x = x + (sigma_next - sigma) * v.float()
    pixels = model.decode_latents(unpack_latents(x, height, width)).float().numpy()[0]
    return np.clip(np.moveaxis(pixels, 0, -1) / 2 + 0.5, 0.0, 1.0) * 255


def test_generation_equals_the_torch_loop(synth: DefectSynthesizer, model: UniDGModel, encoders: TextEncoders) -> None:
    # One runtime pass holds both forms: an instruction alone, and a reference with the default instruction.
    free = synth.check(_request(prompt=PROMPT, seed=5, steps=STEPS, name="free"))
    referenced = synth.check(_request(with_reference=True, seed=6, steps=STEPS, name="referenced"))
    assert referenced.prompt == REFERENCE_INSTRUCTION  # the default, truncated to K as in training
    results = synth.generate_batch([free, referenced])
    figures = []
    for request, result in zip((free, referenced), results):
        expected = _torch_diptych(model, encoders, request, request.prompt, request.reference is None)
        error = float(np.abs(result.diptych - expected).max())
        figures.append(f"{request.name}: max {error:.3f} levels, PSNR {_psnr(result.diptych, expected):.1f} dB")
        assert error <= PIXEL_TOLERANCE, figures
        assert np.array_equal(result.image[~result.mask], request.source[~result.mask])
        assert result.metadata["prompt"] == request.prompt
        assert result.metadata["with_reference"] is (request.reference is not None)
    # The comparison has teeth: another instruction, or the Redux tokens of the black half left in, move the output
    # far beyond the tolerance.
    for prompt, zero_redux in ((OTHER_PROMPT, True), (PROMPT, False)):
        other = _torch_diptych(model, encoders, free, prompt, zero_redux)
        moved = float(np.abs(right_half(results[0].diptych).astype(np.float64) - right_half(other)).max())
        figures.append(f"torch with {prompt!r}, zero Redux {zero_redux}: max {moved:.1f} levels from the runtime's")
        assert moved > 4 * PIXEL_TOLERANCE, figures
    print("; ".join(figures))


# ---------------------------------------------------------------------------------------------- refused requests
@pytest.mark.parametrize(
    "prompt, words",
    [
        ("", ["the prompt is empty", "describe the defect to add"]),
        (" \t\n", ["the prompt is empty", "describe the defect to add"]),
        (TOO_LONG, ["the prompt is 35 T5 tokens", f"at most {K}", "shorten the instruction"]),
    ],
    ids=["empty", "whitespace", "over-K"],
)
def test_unusable_prompts_are_refused(synth: DefectSynthesizer, prompt: str, words: list[str]) -> None:
    for with_reference in (False, True):
        with pytest.raises(RequestError) as caught:
            synth.check(_request(with_reference, prompt=prompt, name="job-7"))
        message = str(caught.value)
        assert caught.value.option == "prompt" and message.startswith("job-7: ")
        for word in words:
            assert word in message, message


def test_the_reference_instruction_is_taken_at_its_trained_length(synth: DefectSynthesizer) -> None:
    # Longer than K here: `unidg train text` cut it to K for every reference-form sample, as the runtime does.
    assert synth.prompts.tokenizers.t5.token_count(REFERENCE_INSTRUCTION) > K
    for request in (_request(with_reference=True), _request(with_reference=True, prompt=REFERENCE_INSTRUCTION)):
        assert synth.check(request).prompt == REFERENCE_INSTRUCTION


def test_a_text_bundle_without_reference_needs_a_prompt(synth: DefectSynthesizer) -> None:
    with pytest.raises(RequestError, match="without a reference image, say which defect to add") as caught:
        synth.check(_request())
    assert caught.value.option == "prompt"


@pytest.mark.parametrize("missing", ["reference_mask", "reference"])
def test_a_reference_comes_with_its_mask(synth: DefectSynthesizer, missing: str) -> None:
    request = replace(_request(with_reference=True, prompt=PROMPT), **{missing: None})
    given = "reference image" if missing == "reference_mask" else "reference mask"
    with pytest.raises(InputError, match=f"is missing while the {given} is given; pass both, or neither"):
        synth.check(request)


@pytest.fixture(scope="module")
def reference_synth():
    with DefectSynthesizer.from_bundle(DEFAULT_BUNDLE, threads=1) as synthesizer:
        yield synthesizer


def test_the_reference_mode_bundle_refuses_prompts_and_requests_without_reference(reference_synth) -> None:
    with pytest.raises(RequestError) as caught:
        reference_synth.check(_request(with_reference=True, prompt=PROMPT))
    message = str(caught.value)
    assert caught.value.option == "prompt" and "is a reference-mode bundle" in message and "drop the prompt" in message
    with pytest.raises(RequestError) as caught:
        reference_synth.check(_request())
    message = str(caught.value)
    assert caught.value.option == "reference" and "no reference image" in message
    assert "needs the reference image and its defect mask" in message


def test_the_tensorrt_backend_refuses_a_text_bundle_by_name(bundle: Path) -> None:
    # Refused before TensorRT is imported: the message is the same whether it is installed or not.
    words = r"UniDG-Text bundle.*only the onnxruntime and torch backends.*--backend onnxruntime.*--backend torch"
    with pytest.raises(BackendError, match=words):
        DefectSynthesizer.from_bundle(bundle, backend="tensorrt")


# ---------------------------------------------------------------------------------------------- the torch backend
TORCH_TOLERANCE = 1e-4  # the exported fp32 step program vs the fp32 ONNX step graph, both on the CPU


def test_torch_backend_steps_equal_onnxruntime(bundle: Path, model: UniDGModel, encoders: TextEncoders) -> None:
    # Per step and as the captured loop (--cuda-graph: on the CPU the same euler_loop runs without a graph), with
    # the instructions' pooled features fed as the program's tenth input.
    loaded = load_bundle(bundle)
    feeds = step_example_inputs(ModelFacts.of(model, model.settings.resolution, text=True), batch=2, seed=4)
    pooled, hidden = encoders.encode(PROMPTS[:2], max_length=K)
    feeds["ctx"][:, :K] = hidden.numpy()
    feeds["pooled"] = pooled.numpy()
    conditioning = StepConditioning(
        **{name: feeds[name] for name in ("cond", "ctx", "key_bias", "guidance", "img_ids", "txt_ids", "pooled")}
    )
    sigmas = sampling_sigmas(STEPS, feeds["x"].shape[1])
    with (
        create_backend("onnxruntime", loaded, threads=1) as onnx_backend,
        create_backend("torch", loaded) as torch_backend,
        create_backend("torch", loaded, cuda_graph=True) as loop_backend,
    ):
        assert loop_backend.captures_loop
        expected = actual = feeds["x"]
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            expected = onnx_backend.step(expected, conditioning, float(sigma), float(sigma_next))
            actual = torch_backend.step(actual, conditioning, float(sigma), float(sigma_next))
        looped = loop_backend.denoise_all(feeds["x"], conditioning, sigmas)
        unpooled = torch_backend.step(
            feeds["x"], replace(conditioning, pooled=np.zeros_like(feeds["pooled"])), float(sigmas[0]), float(sigmas[1])
        )
        first = onnx_backend.step(feeds["x"], conditioning, float(sigmas[0]), float(sigmas[1]))
    step_error = float(np.abs(actual - expected).max())
    loop_error = float(np.abs(looped - expected).max())
    moved = float(np.abs(unpooled - first).max())
    figures = f"{STEPS} steps: max |torch - onnxruntime| {step_error:.2e}, captured loop {loop_error:.2e} "
    figures += f"(|x| up to {np.abs(expected).max():.2f}); zero pooled moves one torch step by {moved:.2e}"
    print(figures)
    assert step_error <= TORCH_TOLERANCE and loop_error <= TORCH_TOLERANCE, figures
    assert moved > 10 * TORCH_TOLERANCE, figures  # the program reads the pooled input it is fed


def test_torch_backend_generates_what_onnxruntime_does(synth: DefectSynthesizer) -> None:
    requests = [
        synth.check(_request(prompt=PROMPT, seed=5, steps=STEPS, name="free")),
        synth.check(_request(with_reference=True, seed=6, steps=STEPS, name="referenced")),
    ]
    expected = synth.generate_batch(requests)
    with DefectSynthesizer.from_bundle(synth.bundle.path, backend="torch", device="cpu") as torch_synth:
        assert torch_synth.backend.name == "torch" and torch_synth.prompts is not None
        actual = torch_synth.generate_batch(requests)
    figures = []
    for request, ours, theirs in zip(requests, actual, expected):
        error = int(np.abs(ours.diptych.astype(np.int16) - theirs.diptych).max())
        figures.append(f"{request.name}: max {error} uint8 levels")
        # float differences of ~1e-5 of [-1, 1] only flip a rounding: at most one level
        assert error <= 1, figures
        assert np.array_equal(ours.image[~ours.mask], request.source[~ours.mask])
        assert ours.metadata["prompt"] == request.prompt == theirs.metadata["prompt"]
    print("; ".join(figures))


# ---------------------------------------------------------------------------------------------- refused exports
def test_export_refuses_missing_or_other_text_encoders(tmp_path: Path, weights: Path, capsys) -> None:
    trained = weights.parent / "run" / "text_encoders"
    with pytest.raises(WeightsError, match=r"its text encoders .*nope are not a folder here; .*--text-encoders FOLDER"):
        export_bundle(weights, tmp_path / "out", text_encoders=tmp_path / "nope", progress=None)
    changed = shutil.copytree(trained, tmp_path / "changed")
    assert encoders_digest(changed) == read_manifest(weights).metadata["text"]["encoders_sha256"]  # a copy passes
    config = changed / "tokenizer_2" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 77}))
    with pytest.raises(WeightsError, match=r"--text-encoders .*changed: its files differ from those --weights"):
        export_bundle(weights, tmp_path / "out", text_encoders=changed, progress=None)
    # The default, the folder the weights' manifest names, moved away: refused by the command, naming the option.
    moved = trained.rename(tmp_path / "moved")
    try:
        code = main(["export", "onnx", "--weights", str(weights), "--out", str(tmp_path / "out")])
    finally:
        moved.rename(trained)
    error = capsys.readouterr().err
    assert code == 2 and "is a UniDG-Text model" in error and "--text-encoders FOLDER" in error, error
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def cached_bundle(tmp_path_factory, bundle: Path, weights: Path) -> Path:
    out = tmp_path_factory.mktemp("text-cache") / "bundle"
    add_cache_graphs(bundle, weights, out, progress=None)
    return out


def test_step_cache_graphs_of_a_text_bundle_take_the_instruction(cached_bundle: Path, bundle: Path) -> None:
    """A UniDG-Text bundle gets the step-cache graphs (format 3 kept); its head takes ``pooled``, the only way the
    instruction reaches temb, so every step cached or not follows the instruction. A threshold no step stays under
    runs head + tail every step: the uncached generation to float rounding."""
    loaded = load_bundle(cached_bundle)
    assert loaded.metadata["format_version"] == 3 and loaded.text and loaded.cache_graphs
    assert loaded.cache_inputs["step_head"][-1] == "pooled"
    assert loaded.cache_graphs["step_head"].inputs["pooled"].shape[-1] == loaded.text["pooled_dim"]
    prompt = "Add the scratch defect to the image."
    for request in (_request(steps=6, seed=3, prompt=prompt), _request(with_reference=True, steps=6, seed=3)):
        with DefectSynthesizer.from_bundle(bundle, threads=1) as plain:
            uncached = plain.generate(plain.check(request))
        with DefectSynthesizer.from_bundle(cached_bundle, threads=1, cache="dynamic", cache_threshold=1e-9) as full:
            every_step = full.generate(full.check(request))
        assert every_step.metadata["step_cache"]["full_steps"] == 6
        levels = np.abs(every_step.image.astype(int) - uncached.image.astype(int)).max()
        assert levels <= 1, levels
        with DefectSynthesizer.from_bundle(cached_bundle, threads=1, cache="dynamic", cache_threshold=10.0) as loose:
            skipping = loose.generate(loose.check(request))
        assert skipping.metadata["step_cache"]["full_steps"] < 6
        assert _psnr(skipping.image, uncached.image) > 15


def test_the_text_head_reads_pooled(cached_bundle: Path, model: UniDGModel) -> None:
    loaded = load_bundle(cached_bundle)
    facts = ModelFacts.of(model, loaded.resolution, text=True)
    feeds = cache_example_inputs(model, facts, 1)["step_head"]
    session = ort.InferenceSession(str(loaded.graph_path("step_head")), providers=["CPUExecutionProvider"])
    temb = session.run(["temb"], feeds)[0]
    other = session.run(["temb"], {**feeds, "pooled": feeds["pooled"] + 1.0})[0]
    assert np.abs(temb - other).max() > 1e-4


# ---------------------------------------------------------------------------------------------- refused manifests
def _meta_edit(edit):
    return lambda bundle: rewrite_manifest(bundle, edit)


def _text_edit(edit):
    return lambda bundle: rewrite_manifest(bundle, lambda meta: edit(meta["text"]))


def _drop(relative: str):
    def make(bundle: Path) -> None:
        (bundle / relative).unlink()
        rewrite_manifest(bundle, lambda meta: None)  # consistently re-signed: only the text checks catch it

    return make


def _t5_width(text: dict) -> None:
    text["graphs"][T5_GRAPH]["outputs"]["hidden"]["shape"][-1] = 32


def _float_ids(text: dict) -> None:
    text["graphs"][CLIP_GRAPH]["inputs"]["input_ids"]["dtype"] = "float32"


def _bare_dtype(text: dict) -> None:
    text["graphs"][T5_GRAPH]["outputs"]["hidden"] = "float32"  # a dtype where the tensor's table belongs


MANIFEST_CASES = [
    ("format-2", _meta_edit(lambda m: m.update(format_version=2)), ["'text' table but format_version 2 (needs 3)"]),
    ("no-text-table", _meta_edit(lambda m: m.pop("text")), ["format_version 3", "no 'text' table"]),
    ("no-tokenizer", _drop(f"{T5_TOKENIZER_FOLDER}/{TOKENIZER_FILE}"), ["tokenizer_2/", TOKENIZER_FILE]),
    ("no-tokenizer-config", _drop(f"{CLIP_TOKENIZER_FOLDER}/tokenizer_config.json"), ["tokenizer/", "config"]),
    ("pooled-width", _text_edit(lambda t: t.update(pooled_dim=16)), ["CLIP pooled [32] for pooled_dim 16"]),
    ("t5-width", _text_edit(_t5_width), ["T5 hidden [32] for joint_dim 64"]),
    ("ids-as-floats", _text_edit(_float_ids), ["text graph 'clip_text' inputs", "['input_ids'] int64"]),
    ("spec-not-a-table", _text_edit(_bare_dtype), ["text graph 't5_text' outputs", "['hidden'] float32"]),
    ("graph-not-listed", _text_edit(lambda t: t["graphs"][T5_GRAPH].update(file="t5.onnx")), ["t5_text", "not listed"]),
    ("step-cache", _meta_edit(lambda m: m.update(step_cache={"graphs": {}})), ["step_cache hidden_dim", "None"]),
]


@pytest.mark.parametrize("edit, words", [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_damaged_text_manifests_are_refused(tmp_path: Path, bundle: Path, edit, words: list[str]) -> None:
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    edit(copy)
    with pytest.raises(BundleError) as caught:
        load_bundle(copy)
    message = str(caught.value)
    assert message.startswith(f"bundle {copy}: "), message
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, Path]:
    return write_sample_files(tmp_path_factory.mktemp("inputs"))


def test_generate_with_a_prompt_alone_writes_the_quadruplet(tmp_path: Path, bundle: Path, samples, capsys) -> None:
    from unidg.core.udg import read_index

    out = tmp_path / "result"
    args = ["generate", "--bundle", str(bundle), "--prompt", PROMPT, "--source", str(samples["source"])]
    args += ["--mask", str(samples["mask"]), "--out", str(out), "--steps", "2", "--threads", "1", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    (quadruplet,) = read_index(out)
    source, mask = quadruplet.load_normal(), quadruplet.load_mask()
    abnormal = quadruplet.load_abnormal()
    assert np.array_equal(abnormal[~mask], source[~mask]) and not np.array_equal(abnormal, source)
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["prompt"] == PROMPT and metadata["with_reference"] is False and metadata["steps"] == 2
    assert metadata["inputs"]["reference"] is None and metadata["inputs"]["reference_mask"] is None


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--reference", "r.png"], ["--reference and --reference-mask are required", "--prompt alone"]),
        (["--reference-mask", "rm.png"], ["--reference and --reference-mask are required", "--prompt alone"]),
    ],
    ids=["reference-without-mask", "mask-without-reference"],
)
def test_generate_refuses_half_a_reference_before_loading(tmp_path: Path, capsys, extra, words) -> None:
    out = tmp_path / "new" / "result"
    args = ["generate", "--bundle", str(tmp_path / "no-bundle"), "--prompt", PROMPT, *extra]
    assert main([*args, "--source", "s.png", "--mask", "m.png", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    for word in words:
        assert word in error, error
    assert "no-bundle" not in error and "s.png" not in error  # refused before the bundle or any file is read
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_an_empty_prompt_and_writes_nothing(tmp_path: Path, bundle: Path, samples, capsys) -> None:
    out = tmp_path / "result"
    args = ["generate", "--bundle", str(bundle), "--prompt", " ", "--source", str(samples["source"])]
    assert main([*args, "--mask", str(samples["mask"]), "--out", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "the prompt is empty" in error and "Traceback" not in error, error
    assert not out.exists()
