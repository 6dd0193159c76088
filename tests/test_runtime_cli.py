"""`unidg generate` and `unidg demo` end to end on a toy bundle: UDG outputs, metadata, contact sheet."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fs_fixtures import immutable
from PIL import Image
from runtime_fixtures import write_sample_files

from unidg.cli import main
from unidg.core.geometry import dilate_mask
from unidg.core.udg import read_index


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    """A samples folder as the demo reads it: three cases listed in samples.json."""
    folder = tmp_path_factory.mktemp("samples")
    cases = []
    for i, category in enumerate(["scratch", "hole", None]):
        files = write_sample_files(folder, f"c{i}", seed=i)
        case = {key: path.name for key, path in files.items()} | {"id": f"case-{i}", "seed": i}
        if category:
            case["category"] = category
        cases.append(case)
    (folder / "samples.json").write_text(json.dumps({"cases": cases}, indent=1))
    return folder


def test_generate_writes_a_udg_quadruplet_and_metadata(tmp_path, toy, samples, capsys):
    out = tmp_path / "result"
    case = json.loads((samples / "samples.json").read_text())["cases"][0]
    args = ["generate", "--bundle", str(toy), "--out", str(out), "--seed", "11", "--category", "scratch"]
    for key, flag in (("reference", "--reference"), ("reference_mask", "--reference-mask")):
        args += [flag, str(samples / case[key])]
    args += ["--source", str(samples / case["source"]), "--mask", str(samples / case["mask"])]
    assert main(args) == 0, capsys.readouterr().err
    (quadruplet,) = read_index(out)
    source = np.asarray(Image.open(samples / case["source"]).convert("RGB"))
    target = np.asarray(Image.open(samples / case["mask"])) > 127
    assert np.array_equal(quadruplet.load_normal(), source)
    assert np.array_equal(quadruplet.load_mask(), dilate_mask(target, 7, 2))
    abnormal = quadruplet.load_abnormal()
    assert np.array_equal(abnormal[~quadruplet.load_mask()], source[~quadruplet.load_mask()])
    assert quadruplet.category == "scratch" and quadruplet.caption["defect-level"][0]["type"] == "scratch"
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["seed"] == 11 and metadata["steps"] == 28
    from unidg.runtime.bundle import load_bundle

    assert metadata["bundle"]["fingerprint"] == load_bundle(toy).fingerprint
    assert {"load_inputs", "load_bundle", "denoise", "total"} <= set(metadata["timings_s"])
    assert metadata["inputs"]["source"].endswith(case["source"])
    assert not [p for p in out.rglob("*.tmp")]


def generate_args(toy: Path, samples: Path, out: Path, *extra: str) -> list[str]:
    case = json.loads((samples / "samples.json").read_text())["cases"][0]
    args = ["generate", "--bundle", str(toy), "--out", str(out), "--steps", "2", *extra]
    for key, flag in (("reference", "--reference"), ("reference_mask", "--reference-mask")):
        args += [flag, str(samples / case[key])]
    return args + ["--source", str(samples / case["source"]), "--mask", str(samples / case["mask"])]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--id", "a/b"], "--id 'a/b'"),
        (["--id", " "], "--id ' '"),
        (["--object-name", "  "], "--object-name"),
        (["--threads", "-2"], "--threads -2"),
        (["--category", "smudge"], "unknown defect category 'smudge'"),
    ],
)
def test_generate_refuses_bad_options_before_reading_anything(tmp_path, samples, capsys, extra, named):
    # A missing bundle and missing images would fail later: the option is refused first, and nothing is written.
    out = tmp_path / "new" / "result"
    args = ["generate", "--bundle", str(tmp_path / "no-bundle"), "--out", str(out), *extra]
    args += ["--reference", "r.png", "--reference-mask", "rm.png", "--source", "s.png", "--mask", "m.png"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert named in error and "no-bundle" not in error and "r.png" not in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc: no folder where mkdir fails even for root")
def test_generate_refuses_an_unwritable_out_before_reading_anything(tmp_path, capsys):
    args = ["generate", "--bundle", str(tmp_path / "no-bundle"), "--out", "/proc/unidg-out/result"]
    args += ["--reference", "r.png", "--reference-mask", "rm.png", "--source", "s.png", "--mask", "m.png"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "--out /proc/unidg-out/result: cannot create it" in error and "r.png" not in error


def test_generate_refuses_an_output_folder_holding_other_files(tmp_path, toy, samples, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(generate_args(toy, samples, out)) == 2
    assert "already holds files" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_generate_refuses_an_immutable_empty_out_before_running(tmp_path, toy, samples, capsys):
    """It was refused only after every step, as "filled by someone else meanwhile"."""
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    with immutable(frozen):
        assert main(generate_args(toy, samples, frozen, "--steps", "200000")) == 2  # refused before any step
    error = capsys.readouterr().err
    assert "cannot be replaced by the result: it is immutable (chattr +i)" in error and "meanwhile" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frozen"] and list(frozen.iterdir()) == []


def test_generate_refuses_a_file_as_parent_before_running(tmp_path, toy, samples, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(generate_args(toy, samples, blocker / "out")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_generate_into_an_empty_folder_and_a_failed_run_leaves_nothing(tmp_path, toy, samples, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(generate_args(toy, samples, empty, "--id", "one")) == 0, capsys.readouterr().err
    expected = [".unidg-output", "abnormal", "index.jsonl", "mask", "metadata.json", "normal"]
    assert sorted(p.name for p in empty.iterdir()) == expected
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(empty.stat().st_mode) == 0o777 & ~umask
    assert main(generate_args(toy, samples, empty)) == 2  # a second run does not mix into the first result
    assert "already holds files" in capsys.readouterr().err
    out = tmp_path / "deep" / "er" / "result"
    assert main(generate_args(toy, samples, out, "--guidance", "-1")) == 2  # refused after the bundle is loaded
    assert "guidance" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no result, staging or parent folders left


def test_generate_from_a_subprocess_shows_a_step_progress_bar(tmp_path, toy, samples):
    case = json.loads((samples / "samples.json").read_text())["cases"][1]
    command = [sys.executable, "-m", "unidg.cli", "generate", "--bundle", str(toy), "--out", str(tmp_path / "o")]
    command += [
        "--reference",
        str(samples / case["reference"]),
        "--reference-mask",
        str(samples / case["reference_mask"]),
    ]
    command += ["--source", str(samples / case["source"]), "--mask", str(samples / case["mask"]), "--steps", "7"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "7/7" in done.stderr  # tqdm's per-step bar


def test_demo_writes_outputs_and_a_labelled_contact_sheet(tmp_path, toy, samples, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--bundle", str(toy), "--samples", str(samples), "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    quadruplets = read_index(out)
    assert [q.id for q in quadruplets] == ["case-0", "case-1", "case-2"]
    assert [q.category for q in quadruplets] == ["scratch", "hole", "unknown"]
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    assert sheet.shape[1] == 3 * 256 + 4 * 6 and sheet.shape[0] > 3 * 256  # three columns, three rows
    row = sheet[24 + 20 : 24 + 20 + 256]
    output_cell = row[:, 6 + 2 * (256 + 6) : 6 + 2 * (256 + 6) + 256]
    assert output_cell.std() > 5  # a picture, not an empty cell
    # Running again replaces the previous demo output.
    first = (out / "abnormal" / "case-0.png").read_bytes()
    assert main(args) == 0
    assert (out / "abnormal" / "case-0.png").read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, toy, samples, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["demo", "--bundle", str(toy), "--samples", str(samples), "--out", str(out)]) == 2
    assert "not written by `unidg demo`" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_demo_with_a_bad_sample_writes_nothing(tmp_path, toy, samples, capsys):
    broken = tmp_path / "samples"
    shutil.copytree(samples, broken)
    (broken / "c2_mask.png").unlink()
    out = tmp_path / "demo"
    assert main(["demo", "--bundle", str(toy), "--samples", str(broken), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "case-2" in error and "target mask" in error
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_demo_without_shipped_assets_says_what_to_pass(tmp_path, capsys):
    from unidg.runtime.demo import DEFAULT_BUNDLE

    if DEFAULT_BUNDLE.exists():
        pytest.skip("the UniDG-nano bundle is shipped in this build")
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    assert "--bundle" in capsys.readouterr().err


def test_runtime_modules_import_no_torch_train_or_export():
    """Layering: the lean runtime (and the CLI registration) loads without torch, onnx or the training code."""
    modules = [
        "unidg.cli",
        "unidg.runtime.bundle",
        "unidg.runtime.backends.onnxruntime_backend",
        "unidg.runtime.backends.tensorrt_backend",
        "unidg.runtime.backends.tensorrt_engines",
        "unidg.runtime.backends.torch_backend",
        "unidg.runtime.backends.torch_step_options",
        "unidg.runtime.sampler",
        "unidg.runtime.synthesizer",
        "unidg.runtime.jobs",
        "unidg.runtime.demo",
        "unidg.runtime.commands",
    ]
    code = f"""
import sys
heavy = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "tensorrt")
def loaded(packages):
    return sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in packages))
for name in {modules!r}:
    __import__(name)
print(loaded(heavy + ("unidg.train", "unidg.export", "unidg.calib")))
from unidg.cli import build_parser
build_parser()  # registers every command module: argparse only
print(loaded(heavy))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "[]"]
