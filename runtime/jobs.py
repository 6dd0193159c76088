"""Resumable batch generation: a JSON-lines jobs file in (``unidg.runtime.jobs_file``), a UDG folder of results out.

Output folder (a UDG folder, runtime.udg): ``normal/`` (the source), ``abnormal/`` (the result), ``mask/`` (the dilated
target mask), ``metadata/<id>.json`` and ``index.jsonl``. The index is the journal: a job is done exactly when its line
is in ``index.jsonl``, and that line is appended (one write) only after the job's images and metadata are in place
(each written to a temporary name and renamed). A run killed at any point leaves at most temporary files and files of
an uncommitted job; the next run with the same arguments removes the former, rewrites the latter and skips every
committed job, so each job ends up done exactly once. A last index line cut short (power loss, full disk), whatever
its bytes (a multi-byte character cut in two included), is dropped on resume and its job redone; a damaged line before
it, a damaged ``batch.json`` or a done job's damaged metadata is refused by name. A full disk stops the run with a
one-line error; the same command resumes it once there is space. ``batch.json`` records the bundle and jobs file so a
resume with another bundle, or with a done job's inputs changed, is refused instead of mixing outputs.

By default the first failing job stops the run (nothing is written when a job's inputs are bad). With ``keep_going``
(``unidg batch --keep-going``) a job that fails, in its checks or while generating, is recorded in ``failed.jsonl``
(id, line, error) and the others go on; ``failed.jsonl`` lists the latest run's failures; a resume retries them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from unidg.core.manifest import atomic_write_text
from unidg.core.udg import INDEX_FILE, UDGWriter, caption_stub
from unidg.runtime.jobs_file import (
    DEFAULT_CATEGORY,
    DEFAULT_OBJECT,
    MASK_TEMPLATE_KEY,
    Job,
    JobsError,
    Libraries,
    read_jobs,
)
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest, SynthesisResult

BATCH_STATE_FILE = "batch.json"
FAILED_FILE = "failed.jsonl"
LOCK_FILE = ".batch.lock"
METADATA_DIR = "metadata"
OUTPUT_DIRS = ("normal", "abnormal", "mask", METADATA_DIR)


def committed_ids(folder: Path) -> set[str]:
    """Ids whose index line is in ``folder/index.jsonl``: the jobs that are done. The index is read as bytes: a last
    line torn anywhere (even inside a multi-byte character) is not done, and is dropped under the folder lock; a
    damaged line before it is refused."""
    index = folder / INDEX_FILE
    if not index.exists():
        return set()
    if not index.is_file():
        raise JobsError(
            f"{index} is not a file; the index of a batch output is the file {INDEX_FILE}: restore it, or use a new "
            "--out folder"
        )
    lines = index.read_bytes().split(b"\n")
    last = max((number for number, raw in enumerate(lines, start=1) if raw.strip()), default=0)
    ids = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        if _is_index_entry(raw):
            ids.add(json.loads(raw)["id"])
        elif number != last:  # only the last line can be torn by a crash
            raise JobsError(
                f"{index} line {number} is damaged (not a UTF-8 JSON entry with an 'id'; shown: {raw[:60]!r}) and "
                "is not the last line, so no crash tore it: remove that line (its job runs again) or use a new "
                "--out folder"
            )
    return ids


def _is_index_entry(text: bytes) -> bool:
    try:
        entry = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(entry, dict) and isinstance(entry.get("id"), str)


def repair_torn_index(folder: Path) -> bytes | None:
    """Drop the last line of ``folder/index.jsonl`` when it is not a whole entry (a write cut short by power loss or a
    full disk); its job is then not done and runs again. Returns the dropped bytes, or None when nothing was torn.
    Only the last line can be torn: the writer appends one line per write. A bad line before it is left for the
    index reader to report."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    data = index.read_bytes()
    body = data[:-1] if data.endswith(b"\n") else data
    start = body.rfind(b"\n") + 1
    last = body[start:]
    if not last.strip(b" \t\r") or _is_index_entry(last):  # nothing after the last whole line, or a whole entry
        return None
    with open(index, "r+b") as handle:
        handle.truncate(start)
        handle.flush()
        os.fsync(handle.fileno())
    return data[start:]


def remove_temporaries(folder: Path) -> int:
    """Delete temporary files (``.name.XXXX.tmp``) a killed run left behind; returns how many."""
    removed = 0
    for directory in (folder, *(folder / name for name in OUTPUT_DIRS)):
        if directory.is_dir():
            for path in directory.glob(".*.tmp"):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the output folder (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, single writer assumed
        yield
        return
    handle = open(folder / LOCK_FILE, "w")  # noqa: SIM115 - held for the duration of the run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobsError(f"{folder} is in use by another `unidg batch` run; wait or pick another --out") from None
        yield
    finally:
        handle.close()


def write_result(
    writer: UDGWriter,
    folder: Path,
    sample_id: str,
    request: SynthesisRequest,
    result: SynthesisResult,
    metadata: dict,
    metadata_path: str,
    object_name: str = DEFAULT_OBJECT,
) -> None:
    """Commit one result: metadata (atomic) first, then the quadruplet, whose index line is the commit record."""
    atomic_write_text(folder / metadata_path, json.dumps(metadata, indent=2) + "\n")
    category = request.category or DEFAULT_CATEGORY
    writer.add(
        normal=request.source,
        abnormal=result.image,
        mask=result.mask,
        caption=caption_stub(category, object_name, result.mask),
        object_name=object_name,
        category=category,
        sample_id=sample_id,
        extra={"metadata": metadata_path, "seed": request.seed},
    )


@dataclass
class BatchReport:
    folder: Path
    total: int
    already_done: int
    generated: int
    seconds: float
    failed: list[dict] = field(default_factory=list)  # with keep_going: {"id", "line", "error"} per failed job


def _failure(job: Job, error: Exception) -> dict:
    return {"id": job.id, "line": job.line, "error": f"{type(error).__name__}: {error}"}


def _jobs_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_record(path: Path) -> object:
    """A small JSON file of the output folder, read as UTF-8; any damage is a JobsError naming the file."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise JobsError(f"{path} is not UTF-8 JSON ({error}); pick a new --out folder") from None


def _check_folder(folder: Path, synth: DefectSynthesizer, jobs: list[Job], done: set[str]) -> dict | None:
    """Refuse an output folder that is not ours, or whose recorded bundle / done jobs disagree with this run."""
    state_path = folder / BATCH_STATE_FILE
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise JobsError(f"--out {folder} exists and is not a folder")
    if not state_path.is_file():
        leftovers = [p.name for p in folder.iterdir() if p.name != LOCK_FILE]
        if leftovers:
            raise JobsError(
                f"--out {folder} already holds files ({', '.join(sorted(leftovers)[:5])}) but no {BATCH_STATE_FILE}; "
                "it is not a `unidg batch` output folder: pick a new or empty folder"
            )
        return None
    state = _json_record(state_path)
    if not isinstance(state, dict):
        raise JobsError(
            f"{state_path} is not a batch record (a JSON object, got {type(state).__name__}); pick a new --out folder"
        )
    recorded = state.get("bundle_fingerprint")
    if recorded != synth.bundle.fingerprint:
        raise JobsError(
            f"--out {folder} was started with another bundle (fingerprint {str(recorded)[:12]}…, this bundle "
            f"{synth.bundle.fingerprint[:12]}…); resuming would mix outputs of two models: use the original bundle "
            "or a new --out folder"
        )
    by_id = {job.id: job for job in jobs}
    for job_id in sorted(done):
        path = folder / METADATA_DIR / f"{job_id}.json"
        if job_id not in by_id or not path.is_file():
            continue
        try:
            recorded = _json_record(path)
        except JobsError:
            recorded = None
        if not isinstance(recorded, dict):
            raise JobsError(
                f"{METADATA_DIR}/{job_id}.json of a done job is damaged (not a UTF-8 JSON object) in {folder}: delete "
                f"it and the job's line in {INDEX_FILE} to run the job again, or use a new --out folder"
            )
        recorded_job = recorded.get("job")
        if recorded_job != by_id[job_id].spec():
            raise JobsError(
                f"{by_id[job_id].where} is already done in {folder} with other inputs or options "
                f"(recorded {recorded_job}); give the changed job a new id or use a new --out folder"
            )
    return state


# Errors of the output's file system a user fixes (the jobs done stay committed; the index makes a rerun resume).
WRITE_FAILURES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


@contextlib.contextmanager
def write_errors_named(folder: Path) -> Iterator[None]:
    """A full disk (or a read-only or forbidden --out) as one line saying how to resume, not a traceback."""
    try:
        yield
    except OSError as error:
        if error.errno not in WRITE_FAILURES:
            raise
        raise JobsError(
            f"writing into --out {folder} failed: {WRITE_FAILURES[error.errno]} ({error.filename or error}); make "
            "room or fix it, then run the same command again: the jobs done are kept, the interrupted one is redone"
        ) from error


def run_batch(
    synth: DefectSynthesizer,
    jobs_path: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    keep_going: bool = False,
    on_job_done: Callable[[Job, SynthesisResult], None] | None = None,
) -> BatchReport:
    """Run every job of ``jobs_path`` not yet done in ``out_dir``; see the module docstring for the guarantees.

    All jobs are read and checked (files, sizes, masks, options) before anything is written. ``keep_going``: a job
    that fails is recorded in ``failed.jsonl`` and skipped instead of stopping the run.
    """
    started = time.perf_counter()
    if batch_size is not None and batch_size < 1:
        raise JobsError(f"--batch-size must be >= 1 (got {batch_size})")
    jobs_path, folder = Path(jobs_path), Path(out_dir)
    jobs = read_jobs(jobs_path)
    done = committed_ids(folder) if folder.is_dir() else set()
    state = _check_folder(folder, synth, jobs, done)
    pending = [job for job in jobs if job.id not in done]
    failed: list[dict] = []
    runnable = []
    libraries: Libraries = {}  # mask-template libraries, loaded once per folder for the whole run
    for job in pending:  # decode and check everything first: a bad job must not stop the run halfway
        try:
            synth.check(job.request(libraries))
        except ValueError as error:
            if not keep_going:
                raise
            failed.append(_failure(job, error))
            continue
        runnable.append(job)
    size = batch_size or synth.batch_size

    with write_errors_named(folder):
        folder.mkdir(parents=True, exist_ok=True)
    with write_errors_named(folder), folder_lock(folder):
        remove_temporaries(folder)
        repair_torn_index(folder)
        if state is None:
            state = {
                "format": "unidg-batch",
                "jobs_file": str(jobs_path.resolve()),
                "jobs_sha256": _jobs_sha256(jobs_path),
                "bundle": str(synth.bundle.path),
                "bundle_fingerprint": synth.bundle.fingerprint,
                "backend": synth.backend.name,
            }
            atomic_write_text(folder / BATCH_STATE_FILE, json.dumps(state, indent=2) + "\n")
        record_failures(folder, failed)
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), unit="job", disable=not progress, desc="batch")
        with UDGWriter(folder) as writer, bar:
            for start in range(0, len(runnable), size):
                chunk = runnable[start : start + size]
                for job, request, result, placement in _generate_chunk(synth, chunk, keep_going, failed, libraries):
                    metadata = {**result.metadata, "job": job.spec()}
                    if placement is not None:
                        metadata[MASK_TEMPLATE_KEY] = placement
                    write_result(
                        writer,
                        folder,
                        job.id,
                        request,
                        result,
                        metadata,
                        f"{METADATA_DIR}/{job.id}.json",
                        job.object_name,
                    )
                    bar.update(1)
                    if on_job_done is not None:
                        on_job_done(job, result)
                record_failures(folder, failed)
    return BatchReport(
        folder=folder,
        total=len(jobs),
        already_done=len(jobs) - len(pending),
        generated=len(pending) - len(failed),
        seconds=time.perf_counter() - started,
        failed=failed,
    )


def _generate_chunk(
    synth: DefectSynthesizer,
    chunk: list[Job],
    keep_going: bool,
    failed: list[dict],
    libraries: Libraries | None = None,
) -> list[tuple[Job, SynthesisRequest, SynthesisResult, dict | None]]:
    """Results of one model pass; with ``keep_going``, a failed pass is rerun one job at a time to find the culprit."""
    prepared = [job.prepare(libraries) for job in chunk]
    requests = [request for request, _ in prepared]
    placements = [placement for _, placement in prepared]
    try:
        return list(zip(chunk, requests, synth.generate_batch(requests), placements))
    except Exception as error:
        if not keep_going:
            raise
        if len(chunk) == 1:
            failed.append(_failure(chunk[0], error))
            return []
    return [item for job in chunk for item in _generate_chunk(synth, [job], keep_going, failed, libraries)]


def record_failures(folder: Path, failed: list[dict]) -> None:
    """Write this run's failures to ``failed.jsonl`` (replacing an earlier run's); none: the file is removed."""
    path = folder / FAILED_FILE
    if failed:
        atomic_write_text(path, "".join(json.dumps(entry) + "\n" for entry in failed))
    else:
        path.unlink(missing_ok=True)
