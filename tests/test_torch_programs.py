"""`unidg export onnx --torch-programs`: the bundle also carries each graph as a torch.export program, which the
torch backend runs end to end with the same results as onnxruntime on the same bundle (fp32, CPU)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from export_fixtures import RESOLUTION, nano_bundle, nano_weights, single_thread, workspace

from unidg.cli import main
from unidg.core.manifest import sha256_file
from unidg.export.onnx_export import ModelFacts, graph_example_inputs
from unidg.runtime.backends import BackendError, create_backend
from unidg.runtime.bundle import GRAPH_NAMES, load_bundle

# fp32 on both sides, reductions ordered differently; per graph measured max |diff| <= 6e-6 (vae_decoder).
GRAPH_ATOL = 1e-4
# End to end (28 steps, VAE decode, 8-bit pixels): at most one level apart; measured 4 of 9408 values differ by 1.
PIXEL_LEVELS = 1


@functools.cache
def program_bundle() -> Path:
    out = workspace() / "bundle-torch-programs"
    with single_thread():
        code = main(
            ["export", "onnx", "--weights", str(nano_weights()), "--out", str(out)]
            + ["--resolution", str(RESOLUTION), "--torch-programs"]
        )
    assert code == 0
    return out


def test_torch_programs_are_listed_in_the_manifest():
    bundle = load_bundle(program_bundle())  # checks the sha256 of every listed file
    table = bundle.metadata["torch_programs"]
    assert table == {name: f"torch/{name}.pt2" for name in GRAPH_NAMES}
    for file in table.values():
        assert bundle.files[file] == sha256_file(bundle.path / file)
    # the ONNX part is what a default export writes, and the default export carries no programs
    plain = load_bundle(nano_bundle())
    assert "torch_programs" not in plain.metadata and not any(f.startswith("torch/") for f in plain.files)
    assert {f: h for f, h in bundle.files.items() if f.endswith(".onnx")} == {
        f: h for f, h in plain.files.items() if f.endswith(".onnx")
    }
    with pytest.raises(BackendError, match="no torch exported programs"):
        create_backend("torch", plain)


def test_each_program_matches_its_onnx_graph():
    bundle = load_bundle(program_bundle())
    facts = ModelFacts(
        resolution=RESOLUTION,
        text_tokens=bundle.metadata["text_tokens"],
        fold_text_tokens=bundle.metadata["fold_text_tokens"],
        reference_tokens=bundle.metadata["reference_tokens"],
        context_tokens=bundle.metadata["context_tokens"],
        joint_dim=bundle.metadata["joint_dim"],
        reference_size=bundle.metadata["reference_size"],
        guidance_embeds=bundle.metadata["guidance_embeds"],
    )
    import onnxruntime as ort

    with single_thread():
        torch_backend = create_backend("torch", bundle)
        for name in GRAPH_NAMES:
            inputs = graph_example_inputs(name, facts, 1, seed=5)
            session = ort.InferenceSession(str(bundle.graph_path(name)), providers=["CPUExecutionProvider"])
            (expected,) = session.run(None, inputs)
            got = torch_backend._run(name, *(torch_backend._tensor(a) for a in inputs.values()))
            np.testing.assert_allclose(got, expected, atol=GRAPH_ATOL, rtol=0, err_msg=name)


def _generate(backend: str, out: Path, files: dict[str, Path], seed: int) -> np.ndarray:
    from PIL import Image

    args = ["generate", "--bundle", str(program_bundle()), "--out", str(out), "--seed", str(seed)]
    args += ["--backend", backend, "--reference", str(files["reference"])]
    args += ["--reference-mask", str(files["reference_mask"]), "--source", str(files["source"])]
    args += ["--mask", str(files["mask"])]
    with single_thread():
        assert main(args) == 0
    (abnormal,) = (out / "abnormal").iterdir()
    return np.asarray(Image.open(abnormal)).astype(np.int16)


def test_generate_with_the_torch_backend_equals_onnxruntime(tmp_path):
    from runtime_fixtures import write_sample_files

    files = write_sample_files(tmp_path, "case", seed=3)
    torch_image = _generate("torch", tmp_path / "torch", files, seed=11)
    again = _generate("torch", tmp_path / "again", files, seed=11)
    other_seed = _generate("torch", tmp_path / "other", files, seed=12)
    onnx_image = _generate("onnxruntime", tmp_path / "onnx", files, seed=11)
    assert np.array_equal(torch_image, again)  # deterministic per seed
    assert not np.array_equal(torch_image, other_seed)
    assert np.abs(torch_image - onnx_image).max() <= PIXEL_LEVELS
