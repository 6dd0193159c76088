"""`unidg batch`: jobs file checks, outputs, and resuming after a kill with every job done exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runtime_fixtures import make_toy_bundle, write_sample_files
from surface_fixtures import LONG_PROMPT, OTHER_PROMPT, PROMPT, sample_path, text_bundle

from unidg.cli import main
from unidg.core.udg import read_index
from unidg.runtime.jobs import repair_torn_index, run_batch
from unidg.runtime.jobs_file import JobsError, read_jobs
from unidg.runtime.synthesizer import DefectSynthesizer

JOBS = 12


@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory) -> Path:
    """12 jobs over 3 input sets, relative paths; 400 steps each so a run lasts long enough to be killed midway."""
    folder = tmp_path_factory.mktemp("jobs")
    cases = [write_sample_files(folder / "inputs", f"case{i}", seed=i) for i in range(3)]
    lines = []
    for i in range(JOBS):
        case = cases[i % 3]
        job = {key: str(path.relative_to(folder)) for key, path in case.items()}
        job.update(seed=100 + i, id=f"job-{i:02d}", steps=400)
        if i % 2:
            job["category"] = "scratch"
        lines.append(json.dumps(job))
    path = folder / "jobs.jsonl"
    path.write_text("# a comment line\n" + "\n".join(lines) + "\n\n")
    return path


def _committed(out: Path) -> list[str]:
    index = out / "index.jsonl"
    if not index.is_file():
        return []
    return [json.loads(line)["id"] for line in index.read_text().splitlines() if line.strip()]


def _batch_command(bundle: Path, jobs: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "unidg.cli", "batch", "--bundle", str(bundle), "--jobs", str(jobs), "--out", str(out)]


def _check_complete(out: Path) -> None:
    ids = _committed(out)
    assert Counter(ids) == Counter({f"job-{i:02d}": 1 for i in range(JOBS)})  # every job exactly once
    quadruplets = read_index(out)  # the UDG reader checks files, sizes and masks
    assert len(quadruplets) == JOBS
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".") and p.is_file()]
    assert [p.name for p in leftovers] in ([], [".batch.lock"])
    for kind in ("normal", "abnormal", "mask", "metadata"):
        names = sorted(p.stem for p in (out / kind).iterdir())
        assert names == sorted(ids), kind  # no file of an uncommitted or duplicated job
    for quadruplet in quadruplets:
        metadata = json.loads((out / quadruplet.extra["metadata"]).read_text())
        assert metadata["job"]["id"] == quadruplet.id and metadata["seed"] == metadata["job"]["seed"]
        normal, abnormal, mask = quadruplet.load_normal(), quadruplet.load_abnormal(), quadruplet.load_mask()
        assert np.array_equal(normal[~mask], abnormal[~mask])


def test_killed_batch_resumes_with_every_job_done_once(tmp_path, toy, jobs_file):
    out = tmp_path / "out"
    process = subprocess.Popen(_batch_command(toy, jobs_file, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_committed(out)) < 3:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the batch never committed 3 jobs"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = _committed(out)
    print(f"killed after {len(done_before)} of {JOBS} jobs")
    assert 3 <= len(done_before) < JOBS, f"kill came too late to test resuming ({len(done_before)} done)"

    resumed = subprocess.run(_batch_command(toy, jobs_file, out), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{JOBS - len(done_before)} job(s) generated, {len(done_before)} already done" in resumed.stdout
    _check_complete(out)
    assert _committed(out)[: len(done_before)] == done_before  # finished jobs were kept, not redone

    # The interrupted-and-resumed output is the output of one clean run, byte for byte (per-seed determinism).
    clean = tmp_path / "clean"
    with DefectSynthesizer.from_bundle(toy) as synth:
        run_batch(synth, jobs_file, clean, progress=False)
    for job_id in _committed(clean):
        assert (out / "abnormal" / f"{job_id}.png").read_bytes() == (clean / "abnormal" / f"{job_id}.png").read_bytes()


def test_leftovers_of_a_crash_are_cleaned_and_redone(tmp_path, toy, jobs_file):
    """A crash between writing a job's files and committing its index line, and one in the middle of a write."""
    out = tmp_path / "out"
    with DefectSynthesizer.from_bundle(toy) as synth:
        jobs = read_jobs(jobs_file)
        partial = jobs_file.parent / "partial.jsonl"
        partial.write_text("\n".join(json.dumps(_job_line(job, jobs_file.parent)) for job in jobs[:4]) + "\n")
        run_batch(synth, partial, out, progress=False)
        # Uncommitted job-05: stale images and metadata from another seed; a temp file cut off mid-write.
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "abnormal" / "job-05.png")
        (out / "metadata" / "job-05.json").write_text('{"stale": true}')
        (out / "abnormal" / ".job-06.png.x1y2z3.tmp").write_bytes(b"\x89PNG half")
        report = run_batch(synth, jobs_file, out, progress=False)
    assert (report.already_done, report.generated) == (4, JOBS - 4)
    _check_complete(out)
    assert json.loads((out / "metadata" / "job-05.json").read_text())["job"]["seed"] == 105


def _job_line(job, folder: Path) -> dict:
    line = {k: str(getattr(job, k).relative_to(folder)) for k in ("reference", "reference_mask", "source", "mask")}
    line.update(seed=job.seed, id=job.id, steps=job.steps)
    if job.category:
        line["category"] = job.category
    return line


def test_resume_with_another_bundle_or_changed_job_is_refused(tmp_path, toy, jobs_file):
    out = tmp_path / "out"
    jobs = read_jobs(jobs_file)
    first = jobs_file.parent / "first.jsonl"  # beside the inputs: its paths are relative to them
    first.write_text(json.dumps(_job_line(jobs[0], jobs_file.parent)) + "\n")
    with DefectSynthesizer.from_bundle(toy) as synth:
        run_batch(synth, first, out, progress=False)
    before = sorted(str(p) for p in out.rglob("*"))

    other = make_toy_bundle(tmp_path / "other", resolution=64, seed=1)
    with DefectSynthesizer.from_bundle(other) as synth, pytest.raises(JobsError, match="another bundle"):
        run_batch(synth, first, out, progress=False)

    changed = dict(_job_line(jobs[0], jobs_file.parent), seed=999)
    first.write_text(json.dumps(changed) + "\n")
    with DefectSynthesizer.from_bundle(toy) as synth, pytest.raises(JobsError, match="already done .* other inputs"):
        run_batch(synth, first, out, progress=False)
    assert sorted(str(p) for p in out.rglob("*")) == before


def _with(**changes):
    return lambda base: json.dumps({**base, **changes})


@pytest.mark.parametrize(
    "make_text, words",
    [
        (lambda base: "{not json", "line 1 is not valid JSON"),
        (lambda base: '["a list"]', "must be a JSON object"),
        (lambda base: '{"reference": "a.png"}', "lacks ['reference_mask', 'source', 'mask', 'seed']"),
        (_with(seed=-1), "'seed' must be a non-negative integer"),
        (_with(seed=1.5), "'seed' must be a non-negative integer"),
        (_with(id="a/b"), "'id' must be letters"),
        (_with(category="glitter"), "unknown defect category 'glitter'"),
        (_with(colour="red"), "unknown keys ['colour']"),
        (_with(steps=0), "steps must be an integer"),
        (_with(guidance=-2), "guidance must be a finite number >= 0"),
        (_with(source="missing.png"), "source image"),
        (_with(mask="inputs/case0_ref_mask.png"), "target mask"),
        (lambda base: _with(id="x")(base) + "\n" + _with(id="x")(base), "repeats id 'x'"),
        (lambda base: "", "lists no jobs"),
    ],
)
def test_bad_jobs_are_refused_before_anything_is_written(tmp_path, toy, capsys, make_text, words):
    inputs = write_sample_files(tmp_path / "inputs", "case0")
    base = {key: f"inputs/{path.name}" for key, path in inputs.items()} | {"seed": 1}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(make_text(base) + "\n")
    out = tmp_path / "out"
    assert main(["batch", "--bundle", str(toy), "--jobs", str(jobs), "--out", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert words in error, error
    assert not out.exists()


def test_out_folder_that_is_not_a_batch_is_refused(tmp_path, toy, jobs_file, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"mine")
    assert main(["batch", "--bundle", str(toy), "--jobs", str(jobs_file), "--out", str(out), "--quiet"]) == 2
    assert "not a `unidg batch` output folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


def test_batches_of_several_requests(tmp_path, toy, jobs_file):
    """Jobs run several per model pass; results match one-at-a-time runs closely and keep per-job seeds."""
    jobs = read_jobs(jobs_file)[:5]
    short = jobs_file.parent / "short.jsonl"
    short.write_text("\n".join(json.dumps(_job_line(j, jobs_file.parent) | {"steps": 6}) for j in jobs) + "\n")
    batched, single = tmp_path / "batched", tmp_path / "single"
    with DefectSynthesizer.from_bundle(toy, max_batch=4) as synth:
        run_batch(synth, short, batched, progress=False)
        run_batch(synth, short, single, batch_size=1, progress=False)
    sizes = [json.loads((batched / "metadata" / f"{j.id}.json").read_text())["batch_size"] for j in jobs]
    assert sizes == [4, 4, 4, 4, 1]
    for job in jobs:
        a = np.asarray(Image.open(batched / "abnormal" / f"{job.id}.png"), dtype=int)
        b = np.asarray(Image.open(single / "abnormal" / f"{job.id}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1


def _short_jobs(jobs_file: Path, name: str, count: int = 5, **changes) -> Path:
    """The first ``count`` jobs at 3 steps: quick runs."""
    path = jobs_file.parent / name
    jobs = read_jobs(jobs_file)[:count]
    lines = [_job_line(job, jobs_file.parent) | {"steps": 3} | changes.get(job.id, {}) for job in jobs]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("tail", "dropped"),
    [
        (b'{"id": "job-09", "normal": "normal/jo', True),  # cut off mid-line
        (b"\x00" * 37, True),  # a zero-filled block after power loss
        (b'{"id": "job-09"}\x00\x00\n', True),
        (b'{"id": "job-09", "normal": "normal/job-09.png"}', False),  # whole, only the newline missing
        (b"", False),
    ],
)
def test_repair_torn_index_drops_only_a_broken_last_line(tmp_path, tail, dropped):
    whole = b'{"id": "job-00"}\n{"id": "job-01"}\n'
    (tmp_path / "index.jsonl").write_bytes(whole + tail)
    assert (repair_torn_index(tmp_path) == tail) is dropped
    assert (tmp_path / "index.jsonl").read_bytes() == (whole if dropped else whole + tail)


def test_a_torn_last_index_line_is_dropped_on_resume_and_its_job_redone(tmp_path, toy, jobs_file):
    short = _short_jobs(jobs_file, "torn.jsonl")
    partial = _short_jobs(jobs_file, "torn-partial.jsonl", count=3)
    out, clean = tmp_path / "out", tmp_path / "clean"
    with DefectSynthesizer.from_bundle(toy) as synth:
        run_batch(synth, short, clean, progress=False)
        run_batch(synth, partial, out, progress=False)
        # Power loss while committing job-03: its files are there, its index line is cut short.
        line = (clean / "index.jsonl").read_text().splitlines()[3]
        for kind in ("normal", "abnormal", "mask"):
            (out / kind / "job-03.png").write_bytes((clean / kind / "job-03.png").read_bytes())
        with open(out / "index.jsonl", "a") as handle:
            handle.write(line[: len(line) // 2])
        report = run_batch(synth, short, out, progress=False)
    assert (report.already_done, report.generated) == (3, 2)
    assert _committed(out) == [f"job-{i:02d}" for i in range(5)]  # every job once, job-03 redone
    assert len(read_index(out)) == 5
    for job_id in _committed(clean):
        assert (out / "abnormal" / f"{job_id}.png").read_bytes() == (clean / "abnormal" / f"{job_id}.png").read_bytes()


def test_keep_going_records_a_failing_job_and_runs_the_rest(tmp_path, toy, jobs_file, capsys):
    jobs = _short_jobs(jobs_file, "keep.jsonl", count=4, **{"job-02": {"source": "inputs/missing.png"}})
    out = tmp_path / "out"
    command = ["batch", "--bundle", str(toy), "--jobs", str(jobs), "--out", str(out), "--quiet"]
    assert main(command) == 2  # default: a bad job stops the run before anything is written
    assert "job 'job-02'" in capsys.readouterr().err and not out.exists()

    assert main([*command, "--keep-going"]) == 1
    assert "1 failed" in capsys.readouterr().out
    assert _committed(out) == ["job-00", "job-01", "job-03"]
    (failure,) = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failure["id"] == "job-02" and failure["line"] == 3 and "missing.png" in failure["error"]

    fixed = jobs.read_text().replace("inputs/missing.png", json.loads(jobs.read_text().splitlines()[0])["source"])
    jobs.write_text(fixed)
    assert main([*command, "--keep-going"]) == 0  # the resume retries the failed job only
    assert "1 job(s) generated, 3 already done" in capsys.readouterr().out
    assert sorted(_committed(out)) == [f"job-{i:02d}" for i in range(4)] and not (out / "failed.jsonl").exists()


def test_keep_going_isolates_a_job_that_fails_while_generating(tmp_path, toy, jobs_file, monkeypatch):
    jobs = _short_jobs(jobs_file, "generate-fails.jsonl", count=5)
    with DefectSynthesizer.from_bundle(toy, max_batch=4) as synth:
        generate_batch = synth.generate_batch

        def failing_for_seed_102(requests, progress=None):
            if any(request.seed == 102 for request in requests):
                raise RuntimeError("backend failed on this request")
            return generate_batch(requests, progress)

        monkeypatch.setattr(synth, "generate_batch", failing_for_seed_102)
        with pytest.raises(RuntimeError, match="backend failed"):
            run_batch(synth, jobs, tmp_path / "stop", progress=False)
        assert _committed(tmp_path / "stop") == []  # the first pass held job-02: nothing committed
        report = run_batch(synth, jobs, tmp_path / "go", progress=False, keep_going=True)
    assert report.generated == 4 and [f["id"] for f in report.failed] == ["job-02"]
    assert "RuntimeError: backend failed" in report.failed[0]["error"]
    assert sorted(_committed(tmp_path / "go")) == ["job-00", "job-01", "job-03", "job-04"]


# ------------------------------------------------------------------------------------ batch files as bytes, full disk
def _run_cli(toy: Path, jobs: Path, out: Path, *extra: str) -> int:
    return main(["batch", "--bundle", str(toy), "--jobs", str(jobs), "--out", str(out), "--quiet", *extra])


def _non_ascii_jobs(jobs_file: Path, name: str, count: int = 3) -> Path:
    """Short jobs whose object names are not ASCII, so their index lines hold multi-byte characters."""
    path = _short_jobs(jobs_file, name, count=count)
    lines = [json.loads(line) | {"object_name": "flasche-ü-瓶"} for line in path.read_text().splitlines()]
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n", encoding="utf-8")
    return path


def test_an_index_torn_inside_a_multibyte_character_is_repaired_on_resume(tmp_path, toy, jobs_file):
    jobs = _non_ascii_jobs(jobs_file, "utf8.jsonl")
    out = tmp_path / "out"
    with DefectSynthesizer.from_bundle(toy) as synth:
        run_batch(synth, jobs, out, progress=False)
        index = out / "index.jsonl"
        data = index.read_bytes()
        last = data[:-1].rfind(b"\n") + 1
        cut = data.index("瓶".encode(), last) + 1  # inside the three bytes of one character
        index.write_bytes(data[:cut])
        report = run_batch(synth, jobs, out, progress=False)
    assert (report.already_done, report.generated) == (2, 1)
    assert _committed(out) == ["job-00", "job-01", "job-02"]
    assert "瓶" in read_index(out)[2].object_name


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("index-middle-line", "index.jsonl line 1 is damaged"),
        ("index-folder", "index.jsonl is not a file"),
        ("state-not-utf8", "batch.json is not UTF-8 JSON"),
        ("state-list", "batch.json is not a batch record"),
        ("metadata-not-utf8", "metadata/job-00.json of a done job is damaged"),
        ("metadata-list", "metadata/job-00.json of a done job is damaged"),
    ],
)
def test_damaged_batch_files_are_refused_by_name(tmp_path, toy, jobs_file, capsys, damage, words):
    jobs = _short_jobs(jobs_file, f"{damage}.jsonl", count=2)
    out = tmp_path / "out"
    assert _run_cli(toy, jobs, out) == 0
    index = out / "index.jsonl"
    if damage == "index-middle-line":
        index.write_bytes(b'{"id": "job-\xff\xfe"}\n' + index.read_bytes().split(b"\n", 1)[1])
    elif damage == "index-folder":
        index.unlink()
        index.mkdir()
    elif damage == "state-not-utf8":
        (out / "batch.json").write_bytes(b'{"format": "unidg-batch\xff"}')
    elif damage == "state-list":
        (out / "batch.json").write_text("[1, 2]")
    elif damage == "metadata-not-utf8":
        (out / "metadata" / "job-00.json").write_bytes(b'{"job": "\xc3"}')
    else:
        (out / "metadata" / "job-00.json").write_text("[1, 2]")
    assert _run_cli(toy, jobs, out) == 2
    error = capsys.readouterr().err
    assert words in error and "Traceback" not in error, error


@pytest.mark.parametrize(
    ("encode", "words"),
    [
        (lambda text: text.encode("utf-16"), "is UTF-16"),
        (lambda text: text.encode("utf-16-le"), "NUL bytes"),
        (lambda text: text.encode("utf-32"), "is UTF-32"),
        (lambda text: text.encode("latin-1"), "line 1 is not UTF-8"),
        (lambda text: bytes(range(256)) * 4, "NUL bytes"),
    ],
)
def test_jobs_files_in_other_encodings_are_named(tmp_path, toy, jobs_file, capsys, encode, words):
    text = _short_jobs(jobs_file, "enc.jsonl", count=1).read_text().replace('"seed"', '"object_name": "café", "seed"')
    jobs = jobs_file.parent / "encoded.jsonl"
    jobs.write_bytes(encode(text))
    assert _run_cli(toy, jobs, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert words in error and "UTF-8" in error and "Traceback" not in error, error
    assert not (tmp_path / "out").exists()


def test_a_jobs_file_with_a_utf8_byte_order_mark_is_read(tmp_path):
    text = '{"reference": "a.png", "reference_mask": "b.png", "source": "c.png", "mask": "d.png", "seed": 1}\n'
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_jobs(path)[0].seed == 1


@pytest.mark.parametrize("size", ["0", "-3"])
def test_a_batch_size_below_one_is_refused(tmp_path, toy, jobs_file, capsys, size):
    assert _run_cli(toy, _short_jobs(jobs_file, "size.jsonl", count=1), tmp_path / "out", "--batch-size", size) == 2
    error = capsys.readouterr().err
    assert f"--batch-size must be >= 1 (got {size})" in error, error
    assert not (tmp_path / "out").exists()


def test_a_full_disk_stops_with_a_clear_error_and_the_resume_completes(tmp_path, toy, jobs_file, capsys, monkeypatch):
    import errno

    from unidg.core.udg import UDGWriter

    jobs = _short_jobs(jobs_file, "full.jsonl", count=3)
    out = tmp_path / "out"
    real_add = UDGWriter.add
    calls = [0]

    def add_until_full(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "abnormal" / "job-01.png"))
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(UDGWriter, "add", add_until_full)
    assert _run_cli(toy, jobs, out) == 2
    error = capsys.readouterr().err
    assert "no space left" in error and "run the same command again" in error and "Traceback" not in error, error
    monkeypatch.setattr(UDGWriter, "add", real_add)
    assert _run_cli(toy, jobs, out) == 0
    assert _committed(out) == ["job-00", "job-01", "job-02"]


# --------------------------------------------------------------------------------------------- mask_template jobs
SAMPLES = Path(__file__).resolve().parents[1] / "runtime" / "assets" / "samples"
NANO_BUNDLE = Path(__file__).resolve().parents[1] / "runtime" / "assets" / "unidg-nano-bundle"


@pytest.fixture(scope="module")
def template_jobs(tmp_path_factory) -> tuple[Path, str]:
    """A tiny mask-template library (2 clusters) beside a jobs folder; returns the folder and a category it holds."""
    from unidg.runtime.mask_templates import TemplateLibrary
    from unidg.train.mask_library import build_template_library
    from unidg.train.procedural import synthesize

    folder = tmp_path_factory.mktemp("template-jobs")
    synthesize(folder / "udg", 12, seed=1, size=64, progress=False)
    build_template_library(folder / "udg", folder / "templates", clusters=2, progress=False)
    return folder, TemplateLibrary.load(folder / "templates").categories[0]


def _template_line(job_id: str, seed: int, **extra: object) -> str:
    case = "black-spot-tile-to-fruit"
    line = {
        "reference": str(SAMPLES / f"{case}_reference.png"),
        "reference_mask": str(SAMPLES / f"{case}_reference_mask.png"),
        "source": str(SAMPLES / f"{case}_source.png"),
        "seed": seed,
        "id": job_id,
        "steps": 2,
        **extra,
    }
    return json.dumps(line)


def test_mask_template_jobs_place_a_seeded_mask_on_the_foreground(tmp_path, template_jobs):
    from unidg.runtime.mask_templates import otsu_foreground

    folder, category = template_jobs
    jobs = folder / "template-jobs.jsonl"
    jobs.write_text(
        _template_line("a", 3, category=category, mask_template={"library": "templates"})  # category: the job's
        + "\n"
        + _template_line("b", 4, mask_template={"library": "templates", "category": category})
        + "\n"
    )
    source = np.asarray(Image.open(SAMPLES / "black-spot-tile-to-fruit_source.png").convert("RGB"))
    foreground = otsu_foreground(source)
    for job in read_jobs(jobs):  # the placed (undilated) target mask lies on the source's Otsu foreground
        request, placement = job.prepare()
        assert request.target_mask.any() and not (request.target_mask & ~foreground).any()
        again, placement_again = job.prepare()
        assert np.array_equal(request.target_mask, again.target_mask) and placement == placement_again
    for run in ("first", "again"):
        with DefectSynthesizer.from_bundle(NANO_BUNDLE) as synth:
            report = run_batch(synth, jobs, tmp_path / run, progress=False)
        assert report.generated == 2
    for job_id in ("a", "b"):  # a rerun places the same template at the same place: the same outputs
        first = json.loads((tmp_path / "first" / "metadata" / f"{job_id}.json").read_text())
        again = json.loads((tmp_path / "again" / "metadata" / f"{job_id}.json").read_text())
        placed = first["mask_template"]
        assert placed["category"] == category and isinstance(placed["cluster"], int) and placed["template"]
        assert placed == again["mask_template"]
        assert first["job"]["mask_template"] == {"library": str(folder / "templates"), "category": category}
        for kind in ("mask", "abnormal"):
            name = f"{kind}/{job_id}.png"
            assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    with DefectSynthesizer.from_bundle(NANO_BUNDLE) as synth:  # a resume recognises the done jobs
        assert run_batch(synth, jobs, tmp_path / "first", progress=False).already_done == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"mask": "m.png", "mask_template": {"library": "templates"}}, "has both 'mask' and 'mask_template'"),
        ({}, "lacks ['mask']"),
        ({"mask_template": {"library": "templates"}}, "needs a 'category'"),
        ({"mask_template": "templates"}, "'mask_template' must be an object"),
    ],
)
def test_bad_mask_template_lines_are_refused(tmp_path, extra, message):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("# header\n" + _template_line("a", 1, **extra) + "\n")
    with pytest.raises(JobsError) as caught:
        read_jobs(jobs)
    assert message in str(caught.value) and "line 2" in str(caught.value)


def test_mask_template_library_and_category_errors_name_the_job(tmp_path, template_jobs):
    folder, _ = template_jobs
    from unidg.core.udg import CATEGORIES
    from unidg.runtime.mask_templates import TemplateLibrary

    missing = next(name for name in CATEGORIES if name not in TemplateLibrary.load(folder / "templates").clusters)
    cases = [
        ({"library": str(folder / "udg"), "category": missing}, "is not a usable mask-template library"),
        ({"library": str(tmp_path / "nowhere"), "category": missing}, "is not a folder"),
        ({"library": str(folder / "templates"), "category": missing}, f"category {missing!r} has no templates"),
    ]
    with DefectSynthesizer.from_bundle(NANO_BUNDLE) as synth:
        for number, (spec, message) in enumerate(cases):
            jobs = tmp_path / f"jobs{number}.jsonl"
            jobs.write_text(_template_line("a", 1, mask_template=spec) + "\n")
            with pytest.raises(JobsError) as caught:
                run_batch(synth, jobs, tmp_path / f"out{number}", progress=False)
            assert message in str(caught.value) and "job 'a' (line 1)" in str(caught.value), caught.value
            assert not (tmp_path / f"out{number}").exists()  # refused before anything is written


# ----------------------------------------------------------------------------------- UniDG-Text jobs (the "prompt" key)
def _text_line(job_id: str, prompt: object = None, with_reference: bool = False, **extra: object) -> str:
    line: dict = {"source": str(sample_path("source")), "mask": str(sample_path("mask")), "seed": 3, "id": job_id}
    if with_reference:
        line |= {"reference": str(sample_path("reference")), "reference_mask": str(sample_path("reference_mask"))}
    if prompt is not None:
        line["prompt"] = prompt
    return json.dumps(line | {"steps": 3} | extra)


def test_prompt_jobs_run_with_and_without_a_reference_and_resume_by_prompt(tmp_path):
    bundle = text_bundle()
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        _text_line("hole", PROMPT),
        _text_line("crack", OTHER_PROMPT),
        _text_line("with-reference", with_reference=True),  # the bundle's reference instruction
        _text_line("both", PROMPT, with_reference=True),
    ]
    jobs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with DefectSynthesizer.from_bundle(bundle) as synth:
        assert run_batch(synth, jobs, out, progress=False).generated == 4
        meta = {job: json.loads((out / "metadata" / f"{job}.json").read_text()) for job in ("hole", "crack", "both")}
        assert meta["hole"]["prompt"] == PROMPT and meta["hole"]["with_reference"] is False
        assert meta["hole"]["job"]["prompt"] == PROMPT and meta["hole"]["job"]["reference"] is None
        assert meta["both"]["with_reference"] is True and meta["both"]["job"]["prompt"] == PROMPT
        plain = json.loads((out / "metadata" / "with-reference.json").read_text())
        assert "prompt" not in plain["job"]  # a job without a prompt is recorded as before
        # Two instructions on the same source, seed and mask: different pixels, and only inside the mask.
        hole, crack = (np.asarray(Image.open(out / "abnormal" / f"{job}.png")) for job in ("hole", "crack"))
        mask = np.asarray(Image.open(out / "mask" / "hole.png")) > 127
        assert not np.array_equal(hole[mask], crack[mask])
        assert np.array_equal(hole[~mask], crack[~mask])
        source = np.asarray(Image.open(sample_path("source")).convert("RGB"))
        assert np.array_equal(hole[~mask], source[~mask])

        assert run_batch(synth, jobs, out, progress=False).already_done == 4  # same prompts: all done
        jobs.write_text("\n".join([_text_line("hole", OTHER_PROMPT), *lines[1:]]) + "\n")
        with pytest.raises(JobsError, match="job 'hole' \\(line 1\\) is already done .* other inputs"):
            run_batch(synth, jobs, out, progress=False)  # a changed prompt is another job


@pytest.mark.parametrize(
    ("line", "words", "reference_bundle"),
    [
        (_text_line("a", ""), ["job 'a' (line 2)", "prompt is empty"], False),
        (_text_line("a", LONG_PROMPT), ["job 'a' (line 2)", "T5 tokens", "at most 48"], False),
        (_text_line("a"), ["line 2 lacks ['reference', 'reference_mask']", 'optional with a "prompt"'], False),
        (_text_line("a", PROMPT, reference_mask="m.png"), ["line 2 gives 'reference_mask' without 'reference'"], False),
        (_text_line("a", PROMPT, reference="r.png"), ["line 2 gives 'reference' without 'reference_mask'"], False),
        (_text_line("a", 7), ["line 2: 'prompt' must be a string"], False),
        (_text_line("a", PROMPT), ["job 'a' (line 2)", "a prompt was given", "reference-mode bundle"], True),
        (_text_line("a", PROMPT, with_reference=True), ["job 'a' (line 2)", "a prompt was given"], True),
    ],
)
def test_bad_prompt_jobs_are_refused_naming_the_line(tmp_path, capsys, line, words, reference_bundle):
    bundle = NANO_BUNDLE if reference_bundle else text_bundle()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("# prompt jobs\n" + line + "\n")
    out = tmp_path / "out"
    assert main(["batch", "--bundle", str(bundle), "--jobs", str(jobs), "--out", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert all(word in error for word in words), error
    assert not out.exists()
