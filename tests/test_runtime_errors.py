"""Bad inputs to `unidg generate`: each one gives a clear error naming the input, and nothing is written to --out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from runtime_fixtures import make_toy_bundle, rewrite_manifest, write_sample_files

from unidg.cli import main


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, Path]:
    return write_sample_files(tmp_path_factory.mktemp("inputs"))


def _args(bundle: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--bundle",
        str(bundle),
        "--reference",
        str(files["reference"]),
        "--reference-mask",
        str(files["reference_mask"]),
        "--source",
        str(files["source"]),
        "--mask",
        str(files["mask"]),
        "--out",
        str(out),
        *extra,
    ]


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


# Each case: (id, how to break the inputs, words the error must contain). ``make`` gets (tmp folder, files dict,
# bundle path) and returns (files, bundle, extra CLI args).
def _replace(key: str, build):
    def make(tmp: Path, files: dict, bundle: Path):
        return {**files, key: build(tmp, files)}, bundle, []

    return make


def _option(*extra: str):
    def make(tmp: Path, files: dict, bundle: Path):
        return files, bundle, list(extra)

    return make


def _bundle(edit):
    def make(tmp: Path, files: dict, bundle: Path):
        copy = tmp / "bundle"
        shutil.copytree(bundle, copy)
        edit(copy)
        return files, copy, []

    return make


def _mask_of(files: dict, key: str) -> np.ndarray:
    return np.asarray(Image.open(files[key]).convert("L")) > 127


def _resized_mask(key: str):
    def build(tmp: Path, files: dict) -> Path:
        mask = _mask_of(files, key)
        return _png(tmp / "resized.png", np.pad(mask, ((0, 3), (0, 5))).astype(np.uint8) * 255)

    return build


def _blank_mask(key: str, value: int):
    def build(tmp: Path, files: dict) -> Path:
        return _png(tmp / f"{value}.png", np.full(_mask_of(files, key).shape, value, dtype=np.uint8))

    return build


def _full_once_dilated(tmp: Path, files: dict) -> Path:
    mask = np.zeros(_mask_of(files, "mask").shape, dtype=np.uint8)
    mask[6:-6, 6:-6] = 255  # the 7x7 dilation, twice, reaches the border: no source pixel would be kept
    return _png(tmp / "nearly-full.png", mask)


def _drop_manifest_version(bundle: Path) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    del data["version"]
    (bundle / "manifest.json").write_text(json.dumps(data))


def _rgba_with_transparency(key: str):
    def build(tmp: Path, files: dict) -> Path:
        rgb = np.asarray(Image.open(files[key]).convert("RGB"))
        alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)
        alpha[:4, :4] = 0
        return _png(tmp / "rgba.png", np.concatenate([rgb, alpha], axis=2))

    return build


def _float_image(tmp: Path, files: dict) -> Path:
    values = np.asarray(Image.open(files["reference"]).convert("L"), dtype=np.float32) / 255.0
    path = tmp / "float.tiff"
    Image.fromarray(values, mode="F").save(path)
    return path


def _bytes(name: str, data: bytes):
    def build(tmp: Path, files: dict) -> Path:
        path = tmp / name
        path.write_bytes(data)
        return path

    return build


def _truncated(key: str):
    def build(tmp: Path, files: dict) -> Path:
        data = files[key].read_bytes()
        path = tmp / "truncated.png"
        path.write_bytes(data[: len(data) // 2])
        return path

    return build


def _tamper(bundle: Path) -> None:
    data = bytearray((bundle / "vae_decoder.onnx").read_bytes())
    data[-5] ^= 0xFF
    (bundle / "vae_decoder.onnx").write_bytes(bytes(data))


def _nan_weights(bundle: Path) -> None:
    model = onnx.load(str(bundle / "step.onnx"))
    for tensor in model.graph.initializer:
        if tensor.name == "Wc":
            values = onnx.numpy_helper.to_array(tensor).copy()
            values[0, 0] = np.nan
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, "Wc"))
    onnx.save(model, str(bundle / "step.onnx"))
    rewrite_manifest(bundle, lambda meta: None)  # a consistently re-signed bundle: only the NaN check catches it


def _swap_graph(bundle: Path) -> None:
    other = make_toy_bundle(bundle.parent / "other", resolution=32)
    shutil.copy(other / "step.onnx", bundle / "step.onnx")
    rewrite_manifest(bundle, lambda meta: None)


def _format_version(bundle: Path) -> None:
    rewrite_manifest(bundle, lambda meta: meta.update(format_version=4))


def _other_settings(bundle: Path) -> None:
    def edit(meta: dict) -> None:
        meta["settings"]["resolution"] = 128
        meta["resolution"] = 128

    rewrite_manifest(bundle, edit)


def _weights_kind(bundle: Path) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    data["kind"] = "weights"
    (bundle / "manifest.json").write_text(json.dumps(data))


CASES = [
    ("missing-reference", _replace("reference", lambda t, f: t / "nope.png"), ["reference image", "not found"]),
    ("source-is-folder", _replace("source", lambda t, f: t), ["source image", "not a file"]),
    ("corrupt-source", _replace("source", _bytes("junk.png", b"\x89PNG\r\n\x1a\nnot really")), ["source image"]),
    ("truncated-source", _replace("source", _truncated("source")), ["source image", "readable"]),
    ("empty-file-mask", _replace("mask", _bytes("empty.png", b"")), ["target mask"]),
    ("text-as-image", _replace("reference", _bytes("notes.png", b"hello")), ["reference image"]),
    ("rgba-reference", _replace("reference", _rgba_with_transparency("reference")), ["reference image", "transp"]),
    ("rgba-mask", _replace("mask", _rgba_with_transparency("source")), ["target mask", "transp"]),
    ("float-reference", _replace("reference", _float_image), ["reference image", "floating-point"]),
    ("empty-reference-mask", _replace("reference_mask", _blank_mask("reference_mask", 0)), ["reference mask", "empty"]),
    ("empty-target-mask", _replace("mask", _blank_mask("mask", 0)), ["target mask", "empty"]),
    ("full-target-mask", _replace("mask", _blank_mask("mask", 255)), ["target mask", "whole image"]),
    ("full-target-mask-once-dilated", _replace("mask", _full_once_dilated), ["target mask", "once dilated"]),
    ("reference-mask-size", _replace("reference_mask", _resized_mask("reference_mask")), ["reference mask", "match"]),
    ("target-mask-size", _replace("mask", _resized_mask("mask")), ["target mask", "match"]),
    ("zero-steps", _option("--steps", "0"), ["steps"]),
    ("negative-steps", _option("--steps", "-3"), ["steps"]),
    ("too-many-steps", _option("--steps", "100000"), ["steps"]),
    ("negative-guidance", _option("--guidance", "-1"), ["guidance", ">= 0"]),
    ("nan-guidance", _option("--guidance", "nan"), ["guidance", "finite"]),
    ("negative-seed", _option("--seed", "-5"), ["seed"]),
    ("unknown-category", _option("--category", "sparkles"), ["category", "sparkles"]),
    ("tensorrt-missing", _option("--backend", "tensorrt"), ["tensorrt"]),
    ("cuda-provider-missing", _option("--device", "cuda"), ["CUDAExecutionProvider", "onnxruntime-gpu"]),
    ("cuda-graph-on-onnxruntime", _option("--cuda-graph"), ["--cuda-graph", "does not apply to --backend onnxruntime"]),
    ("threads-on-torch", _option("--backend", "torch", "--threads", "2"), ["--threads", "--backend torch"]),
    ("negative-threads", _option("--threads", "-2"), ["--threads -2", ">= 1"]),
    ("zero-threads", _option("--threads", "0"), ["--threads 0", ">= 1"]),
    ("missing-bundle", lambda t, f, b: (f, t / "no-bundle", []), ["does not exist"]),
    ("missing-manifest", _bundle(lambda b: (b / "manifest.json").unlink()), ["manifest.json"]),
    ("manifest-without-version", _bundle(_drop_manifest_version), ["manifest.json has no 'version'"]),
    ("weights-not-bundle", _bundle(_weights_kind), ["'weights'", "'bundle'"]),
    ("tampered-hash", _bundle(_tamper), ["vae_decoder.onnx", "sha256"]),
    ("missing-graph", _bundle(lambda b: (b / "image_encoder.onnx").unlink()), ["image_encoder.onnx", "missing"]),
    ("format-version", _bundle(_format_version), ["format_version 4"]),
    ("other-settings", _bundle(_other_settings), ["shape", "settings"]),
    ("swapped-graph", _bundle(_swap_graph), ["step.onnx", "other settings"]),
    ("nan-weights", _bundle(_nan_weights), ["NaN", "step graph"]),
]


@pytest.mark.parametrize("make, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, toy, samples, capsys, make, words):
    work = tmp_path / "work"
    work.mkdir()
    files, bundle, extra = make(work, samples, toy)
    out = tmp_path / "out"
    code = main(_args(bundle, files, out, *extra))
    error = capsys.readouterr().err
    assert code == 2, error
    assert "error:" in error and "Traceback" not in error
    for word in words:
        assert word in error, f"{word!r} missing from: {error}"
    assert not out.exists(), f"{out} was written despite the error"


def test_the_unbroken_request_succeeds(tmp_path, toy, samples, capsys):
    """The baseline every case above breaks in one way: it must work, or the cases prove nothing."""
    out = tmp_path / "out"
    assert main(_args(toy, samples, out)) == 0, capsys.readouterr().err
    assert (out / "metadata.json").is_file() and (out / "abnormal" / "000000.png").is_file()


def test_out_folder_with_a_result_is_refused(tmp_path, toy, samples, capsys):
    out = tmp_path / "out"
    assert main(_args(toy, samples, out)) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(_args(toy, samples, out, "--seed", "9")) == 2
    assert "already holds files" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_sixteen_bit_masks_are_read_exactly(tmp_path, toy, samples, capsys):
    """16-bit integer PNGs are not refused: they are mapped to 8 bits exactly (v * 255 / 65535)."""
    mask = _mask_of(samples, "mask")
    path = tmp_path / "mask16.png"
    Image.fromarray(mask.astype(np.uint16) * 65535).save(path)
    assert Image.open(path).mode.startswith("I")
    out_16, out_8 = tmp_path / "out16", tmp_path / "out8"
    assert main(_args(toy, {**samples, "mask": path}, out_16)) == 0, capsys.readouterr().err
    assert main(_args(toy, samples, out_8)) == 0
    assert (out_16 / "abnormal/000000.png").read_bytes() == (out_8 / "abnormal/000000.png").read_bytes()


def test_an_operator_without_a_kernel_asks_for_a_newer_onnxruntime(tmp_path):
    """A graph this onnxruntime has no kernel for (here Erf on float64; in the field, opset-23 operators on an old
    onnxruntime) is not a broken bundle: the message names the version floor and the upgrade, not a re-export."""
    import onnxruntime as ort

    from unidg.runtime.backends.onnxruntime_backend import MIN_ONNXRUNTIME, session_load_error

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Erf", ["x"], ["y"])],
        "no_kernel",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, [2])],
    )
    path = tmp_path / "step.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23)]), str(path))
    with pytest.raises(Exception) as raised:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    message = str(session_load_error(path, raised.value))
    assert f"onnxruntime {ort.__version__} has no kernel" in message and str(path) in message
    assert f"pip install -U 'onnxruntime>={MIN_ONNXRUNTIME}'" in message and "re-export" not in message
    other = str(session_load_error(path, ValueError("protobuf parsing failed")))
    assert "re-export the bundle" in other
