"""C ABI: `unidg capi build` makes libunidg.so; tests/capi_host.c, compiled with the system C compiler, drives it.

The host checks an end-to-end run (every pixel outside the returned mask equals the source, same seed -> same bytes),
cancelling from the progress callback, the error statuses (missing bundle named in the message, small output buffer,
bad inputs, negative steps, NaN guidance, non-UTF-8 strings, re-entrant call -> UNIDG_BUSY, destroyed handle), two
handles on two threads, and a library whose Python side cannot start; on the shipped UniDG-nano-text bundle,
``request.prompt`` with and without a reference and its refusals. It exits with the number of failed checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from surface_fixtures import nano_bundle, text_bundle, toy_bundle

from unidg.runtime.capi.build import HEADER, header_cdef

HOST_SOURCE = Path(__file__).with_name("capi_host.c")
COMPILER = shutil.which(os.environ.get("CC", "cc"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("cffi", reason="cffi not installed (the [capi] extra)")
    if COMPILER is None:
        pytest.skip("no C compiler (cc) on PATH")
    out = tmp_path_factory.mktemp("capi")
    result = subprocess.run(
        [sys.executable, "-m", "unidg.cli", "capi", "build", "--out", str(out / "lib")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    library = out / "lib" / "libunidg.so"
    assert library.is_file() and (out / "lib" / "unidg.h").read_text() == HEADER.read_text()
    host = out / "capi_host"
    compile_command = [
        COMPILER,
        "-std=c11",
        "-D_POSIX_C_SOURCE=200809L",
        "-Wall",
        "-Wextra",
        "-Werror",
        f"-I{out / 'lib'}",
        str(HOST_SOURCE),
        f"-L{out / 'lib'}",
        "-lunidg",
        f"-Wl,-rpath,{out / 'lib'}",
        "-lpthread",
        "-o",
        str(host),
    ]
    compiled = subprocess.run(compile_command, capture_output=True, text=True, timeout=120)
    assert compiled.returncode == 0, compiled.stderr
    return {"library": library, "host": host, "root": out}


def _run_host(built, bundle: Path, mode: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "UNIDG_PYTHON")}
    environment.update(env or {})
    # Run from an unrelated folder: the library must find unidg by itself, not through the working directory.
    return subprocess.run(
        [str(built["host"]), str(bundle), mode],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=built["root"],
        env=environment,
    )


def _assert_host_passed(result: subprocess.CompletedProcess, *checks: str) -> None:
    """The host exited 0 with no failed check and printed every line of ``checks``."""
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 check(s) failed" in result.stdout and "FAIL" not in result.stdout
    missing = [check for check in checks if check not in result.stdout]
    assert not missing, missing


def test_header_declarations_parse_and_export(built):
    cdef = header_cdef(HEADER.read_text())
    assert "unidg_synth_run" in cdef and "#" not in cdef  # cffi reads this part: plain declarations only
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(built["library"])], capture_output=True, text=True)
    if symbols.returncode == 0:
        for name in ("unidg_synth_create", "unidg_synth_run", "unidg_status_message", "unidg_request_init"):
            assert name in symbols.stdout


def test_c_host_runs_the_nano_bundle_end_to_end_and_the_error_paths(built, pytestconfig):
    _assert_host_passed(
        _run_host(built, nano_bundle(pytestconfig), "full"),
        "ok   every pixel outside the dilated mask equals the source",
        "ok   a nonzero progress return cancels",
        "message names the path: bundle /nonexistent/unidg-bundle-for-capi-test",
        # Out-of-range values are refused instead of silently running with the bundle's defaults.
        "ok   negative steps are refused, not run with the default: request.steps is -5",
        "ok   a NaN guidance is refused, not run with the default: request.guidance is nan",
        "ok   a non-UTF-8 bundle_dir is refused naming it: bundle_dir is not valid UTF-8",
        "ok   a non-UTF-8 category is refused naming it: request.category is not valid UTF-8",
        # options.spin: onnxruntime only, and a host built before it existed (shorter struct) still works.
        "ok   spin with the tensorrt backend is refused naming it: options.spin applies to the onnxruntime",
        "ok   a first-version options struct is accepted and spin past its end is not read",
        "ok   an options struct shorter than the first version is refused: options.struct_size is 28",
        # request.prompt: refused by a reference-mode bundle; a host built before it (shorter struct) still runs.
        "ok   a prompt for a reference-mode bundle is refused naming it: request.prompt",
        "ok   a first-version request struct runs and its prompt past the end is not read",
    )


def test_c_host_runs_the_text_bundle_with_a_prompt_and_refuses_bad_prompts(built):
    _assert_host_passed(
        _run_host(built, text_bundle(), "text"),
        "ok   two prompts differ only inside the mask",
        "ok   a bad prompt is refused naming request.prompt (UTF-8): request.prompt",
        "not valid UTF-8",
        "ok   a bad prompt is refused naming request.prompt (empty)",
        "ok   a bad prompt is refused naming request.prompt (T5 tokens)",
        "ok   a reference without its mask is refused naming it",
    )


def test_a_library_whose_python_cannot_start_reports_a_status(built, tmp_path):
    bundle = toy_bundle(tmp_path / "bundle")
    broken = tmp_path / "broken" / "unidg"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("this unidg is deliberately broken")\n')
    result = _run_host(built, bundle, "no-python", env={"PYTHONPATH": str(broken.parent)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and "UNIDG_INTERNAL" in result.stdout
    assert "deliberately broken" in result.stderr  # the interpreter's own reason, on stderr
