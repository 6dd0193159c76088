"""The shipped demo assets: UniDG-nano weights, its ONNX bundle and the sample cases, and `unidg demo` on them.

The bundle must be the export of the committed weights (fingerprint, and numerically: a fresh export in onnxruntime
gives the same outputs on fixed inputs), the samples must be what their documented command writes, and the demo must
run end to end with every pixel outside the dilated target mask equal to the source's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unidg.runtime.demo as demo
from unidg.cli import main
from unidg.core.geometry import dilate_mask
from unidg.core.images import load_image, load_mask
from unidg.core.latents import image_ids
from unidg.core.manifest import read_manifest, verify_files
from unidg.core.settings import UniDGSettings
from unidg.core.udg import CATEGORIES, read_index
from unidg.runtime.bundle import GRAPH_NAMES, load_bundle

MAX_SAMPLES_BYTES = 1_000_000
MAX_BUNDLE_BYTES = 64 * 2**20
TOLERANCE = 1e-5  # fp32 graphs of the same weights
# Constants the exporter computes (RoPE frequencies, folded shapes) may round differently by a few float32 ulp with
# other versions of the export tool chain; a real change (another theta, dimension or weight) moves them far more.
FOLDED_CONSTANT_MAX_ULP = 4


def bundle_folder() -> Path:
    return demo.DEFAULT_BUNDLE


def weights_folder() -> Path:
    return demo.DEFAULT_BUNDLE.parent / "unidg-nano"


def samples_folder() -> Path:
    return demo.DEFAULT_SAMPLES


# ------------------------------------------------------------------------------------------------------- samples
def test_samples_load_and_stay_small():
    cases = demo.read_samples(samples_folder())
    assert len(cases) >= 6
    for case in cases:
        reference = load_image(case.reference, "reference")
        reference_mask = load_mask(case.reference_mask, "reference mask")
        source = load_image(case.source, "source")
        target_mask = load_mask(case.mask, "target mask", allow_full=False)
        assert reference_mask.shape == reference.shape[:2] and target_mask.shape == source.shape[:2], case.id
        assert case.category in CATEGORIES, case.id
    entries = json.loads((samples_folder() / demo.SAMPLES_FILE).read_text())
    assert {entry["transfer"] for entry in entries} == {"intra-object", "cross-object"}
    shapes = [load_image(case.source).shape for case in cases]
    assert any(h != w for h, w, _ in shapes), "some sources must be non-square (pad-to-square path)"
    total = sum(path.stat().st_size for path in samples_folder().iterdir())
    assert total < MAX_SAMPLES_BYTES, f"samples take {total} bytes"


def test_samples_are_what_the_documented_command_writes(tmp_path):
    from unidg.train.make_demo_samples import make_demo_samples

    make_demo_samples(tmp_path)
    shipped = samples_folder()
    assert json.loads((tmp_path / demo.SAMPLES_FILE).read_text()) == json.loads(
        (shipped / demo.SAMPLES_FILE).read_text()
    ), "samples.json differs; rebuild with `python -m unidg.train.make_demo_samples`"
    names = sorted(path.name for path in tmp_path.glob("*.png"))
    assert names == sorted(path.name for path in shipped.glob("*.png"))
    rebuild = "rebuild with `python -m unidg.train.make_demo_samples`"
    for name in names:
        fresh, committed = (np.asarray(Image.open(folder / name)) for folder in (tmp_path, shipped))
        assert np.array_equal(fresh, committed), f"{name} differs; {rebuild}"


# -------------------------------------------------------------------------------------------------------- bundle
def test_bundle_passes_the_runtime_checks_and_names_the_committed_weights():
    bundle = load_bundle(bundle_folder())  # manifest, sha256 of every file, facts vs settings, graph shapes
    weights = read_manifest(weights_folder(), kind="weights")
    verify_files(weights_folder(), weights)
    assert bundle.metadata["weights"] == {"path": "unidg-nano", "fingerprint": weights.fingerprint}
    settings = UniDGSettings.load(weights_folder())
    assert bundle.resolution == settings.resolution
    assert bundle.metadata["settings"] == settings.to_dict()
    assert bundle.precision == "fp32" and bundle.metadata["attention"] == "portable"
    size = sum(path.stat().st_size for path in bundle_folder().iterdir())
    assert size < MAX_BUNDLE_BYTES, f"the shipped bundle takes {size / 2**20:.1f} MiB"


@pytest.fixture(scope="module")
def fresh_bundle(tmp_path_factory) -> Path:
    """The committed weights exported again, with the options recorded in the committed bundle's manifest."""
    from unidg.export.bundle import export_bundle

    meta = load_bundle(bundle_folder()).metadata
    out = tmp_path_factory.mktemp("export") / "bundle"
    export_bundle(
        weights_folder(),
        out,
        precision=meta["precision"],
        resolution=meta["resolution"],
        batch=meta["batch"],
        max_batch=meta.get("max_batch", 16),
        dynamic_sequence=meta["sequence"] == "dynamic",
        attention=meta["attention"],
        portable_mask=meta["attention_form"],
        progress=None,
    )
    return out


def _graph_inputs(name: str, bundle) -> dict[str, np.ndarray]:
    """Fixed inputs of graph ``name`` in its manifest shapes: noise, ids and a key bias as the runtime builds them."""
    rng = np.random.default_rng(2026)
    specs = bundle.metadata["graphs"][name]["inputs"]
    feeds = {}
    for input_name, spec in specs.items():
        shape = [1 if not isinstance(d, int) else d for d in spec["shape"]]
        feeds[input_name] = rng.uniform(-1, 1, shape).astype(np.float32)
    if name == "step":
        s = bundle.resolution
        batch, context = feeds["key_bias"].shape[0], bundle.context_tokens
        feeds["img_ids"] = image_ids(s // 16, 2 * s // 16).astype(np.float32)
        feeds["txt_ids"] = np.zeros_like(feeds["txt_ids"])
        key_bias = np.zeros(feeds["key_bias"].shape, dtype=np.float32)
        key_bias[:, 0] = np.log(bundle.text_tokens)
        key_bias[:, context + rng.choice(bundle.image_tokens, 20, replace=False)] = np.log(2.0)
        feeds["key_bias"] = key_bias
        feeds["sigma"] = np.full(batch, 0.7, np.float32)
        feeds["sigma_next"] = np.full(batch, 0.65, np.float32)
        feeds["guidance"] = np.full(batch, bundle.metadata["settings"]["guidance"], np.float32)
    return feeds


def test_committed_bundle_matches_a_fresh_export_of_the_committed_weights(fresh_bundle):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    committed, fresh = load_bundle(bundle_folder()), load_bundle(fresh_bundle)
    assert fresh.metadata["weights"] == committed.metadata["weights"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for name in GRAPH_NAMES:
        paths = [b.graph_path(name) for b in (committed, fresh)]
        weights = [
            {t.name: numpy_helper.to_array(t) for t in onnx.load(str(p), load_external_data=True).graph.initializer}
            for p in paths
        ]
        assert weights[0], f"{name}: no initializers found"
        assert weights[0].keys() == weights[1].keys(), f"{name}: the graphs hold different initializers"
        for key, value in weights[0].items():
            _assert_same_initializer(f"{name}: initializer {key}", value, weights[1][key], folded="." not in key)
        feeds = _graph_inputs(name, committed)
        sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
        outputs = [session.run(None, feeds) for session in sessions]
        for got, want in zip(outputs[0], outputs[1], strict=True):
            assert np.isfinite(got).all(), f"{name}: non-finite output"
            difference = float(np.max(np.abs(got - want)))
            assert difference <= TOLERANCE, f"{name}: max abs difference {difference:.2e} > {TOLERANCE}"


def _assert_same_initializer(what: str, committed: np.ndarray, fresh: np.ndarray, *, folded: bool) -> None:
    """Weights (named by their module path) must be bit-identical; computed float constants within a few ulp."""
    assert committed.dtype == fresh.dtype and committed.shape == fresh.shape, f"{what}: dtype or shape differs"
    if not folded or not np.issubdtype(committed.dtype, np.floating):
        assert np.array_equal(committed, fresh), f"{what} differs"
        return
    ulps = _ulp_distance(committed, fresh)
    assert ulps <= FOLDED_CONSTANT_MAX_ULP, f"{what} differs by {ulps} ulp (> {FOLDED_CONSTANT_MAX_ULP})"


def _ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in units in the last place between two float arrays of one dtype (0 for equal arrays)."""
    if a.size == 0:
        return 0
    integer = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    # Map the float bit patterns onto a monotonic integer line, so neighbours differ by one.
    ordered = []
    for values in (a, b):
        bits = values.view(integer).astype(np.int64)
        ordered.append(np.where(bits < 0, np.iinfo(integer).min - bits, bits))
    return int(np.max(np.abs(ordered[0] - ordered[1])))


def test_ulp_distance_counts_float32_neighbours():
    x = np.array([0.21544348, -1.5, 0.0], np.float32)
    up = np.nextafter(np.nextafter(x, np.float32(np.inf)), np.float32(np.inf))
    assert _ulp_distance(x, x) == 0
    assert _ulp_distance(x, up) == 2
    assert _ulp_distance(np.array([0.0], np.float32), np.array([-0.0], np.float32)) == 0
    assert _ulp_distance(np.array([1.0], np.float32), np.array([1.001], np.float32)) > 1000  # a real change
    _assert_same_initializer("rope", x, np.nextafter(x, np.float32(np.inf)), folded=True)
    with pytest.raises(AssertionError, match="differs"):
        _assert_same_initializer("weight", x, np.nextafter(x, np.float32(np.inf)), folded=False)


# ---------------------------------------------------------------------------------------------------------- demo
def test_demo_runs_on_the_shipped_bundle(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2"]) == 0, capsys.readouterr().err
    cases = demo.read_samples(samples_folder())
    quadruplets = read_index(out)
    assert [q.id for q in quadruplets] == [case.id for case in cases]
    settings = load_bundle(bundle_folder()).metadata["settings"]
    for case, quadruplet in zip(cases, quadruplets, strict=True):
        source = load_image(case.source)
        dilated = dilate_mask(load_mask(case.mask), settings["dilate_kernel"], settings["dilate_iterations"])
        output = quadruplet.load_abnormal()
        assert np.array_equal(quadruplet.load_normal(), source), case.id
        assert np.array_equal(quadruplet.load_mask(), dilated), case.id
        assert output.shape == source.shape, case.id
        assert np.array_equal(output[~dilated], source[~dilated]), f"{case.id}: pixels outside the mask changed"
        assert (output[dilated] != source[dilated]).any(), f"{case.id}: nothing was generated in the mask"
        metadata = json.loads((out / "metadata" / f"{case.id}.json").read_text())
        assert metadata["steps"] == 2 and metadata["seed"] == case.seed
    sheet = Image.open(out / demo.CONTACT_SHEET)
    assert sheet.format == "PNG"
    assert sheet.size == (3 * 256 + 4 * 6, 24 + len(cases) * (256 + 20 + 6) + 6)


# ------------------------------------------------------------------------------------------------- UniDG-nano-text
MAX_TEXT_BUNDLE_ADDED_BYTES = 12 * 2**20  # what the text bundle adds beside the nano bundle (its own files)


def test_text_bundle_is_a_text_bundle_that_shares_the_nano_graphs():
    text = load_bundle(demo.DEFAULT_TEXT_BUNDLE)  # manifest, sha256 of every file, the text table, shapes
    nano = load_bundle(bundle_folder())
    assert text.metadata["format_version"] == 3 and text.text["mode"] == "instruction"
    assert text.step_inputs[-1] == "pooled" and not text.fold_text_tokens
    assert text.metadata["shared_graphs"]["fingerprint"] == nano.fingerprint
    shared = text.metadata["shared_graphs"]["graphs"]
    assert shared == ["vae_encoder", "vae_decoder", "image_encoder"]
    for name in shared:  # byte for byte: a repository or a package stores them once
        assert text.graph_path(name).read_bytes() == nano.graph_path(name).read_bytes(), name
    own = [p for p in text.path.rglob("*") if p.is_file() and p.name not in {f"{n}.onnx" for n in shared}]
    added = sum(p.stat().st_size for p in own)
    assert added < MAX_TEXT_BUNDLE_ADDED_BYTES, f"the text bundle adds {added / 2**20:.1f} MiB"


def test_demo_text_runs_both_forms_on_the_shipped_text_bundle(tmp_path, capsys):
    pytest.importorskip("tokenizers", reason="tokenizers (unidg[text]) is not installed")
    out = tmp_path / "demo-text"
    assert main(["demo", "--text", "--out", str(out), "--steps", "2"]) == 0, capsys.readouterr().err
    cases = demo.read_samples(samples_folder())
    quadruplets = {q.id: q for q in read_index(out)}
    assert sorted(quadruplets) == sorted(
        [case.id for case in cases] + [f"{case.id}{demo.INSTRUCTION_SUFFIX}" for case in cases]
    )
    for case in cases:
        with_reference = quadruplets[case.id].load_abnormal()
        alone = quadruplets[f"{case.id}{demo.INSTRUCTION_SUFFIX}"].load_abnormal()
        mask = quadruplets[case.id].load_mask()
        source = load_image(case.source)
        for output in (with_reference, alone):
            assert np.array_equal(output[~mask], source[~mask]), f"{case.id}: pixels outside the mask changed"
        assert not np.array_equal(with_reference, alone), f"{case.id}: both forms gave the same image"
        metadata = json.loads((out / "metadata" / f"{case.id}{demo.INSTRUCTION_SUFFIX}.json").read_text())
        assert metadata["prompt"] == f"Add the {case.category} defect to the image."
        assert metadata["with_reference"] is False
    sheet = Image.open(out / demo.CONTACT_SHEET)
    assert sheet.size == (4 * 256 + 5 * 6, 24 + len(cases) * (256 + 20 + 6) + 6)


def test_demo_text_refuses_a_reference_mode_bundle(tmp_path, capsys):
    pytest.importorskip("tokenizers", reason="tokenizers (unidg[text]) is not installed")
    code = main(["demo", "--text", "--bundle", str(bundle_folder()), "--out", str(tmp_path / "d"), "--steps", "1"])
    assert code != 0
    assert "--text needs a UniDG-Text bundle" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
