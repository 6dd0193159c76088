"""Build ``libunidg.so`` (the C ABI of ``unidg.h``) with cffi in embedding mode: ``unidg capi build --out DIR``.

The public functions are small C wrappers written here; they start the embedded interpreter, call the Python side
(``unidg.runtime.capi._embedding``, exported as ``_unidg_py_*``) and turn anything unexpected into a status, so a C
host gets a status with a message even when Python cannot start (no silent NULL = "success"). Status objects live in C
so they stay valid and freeable whatever happens in Python.

The library embeds the interpreter that runs the build: it links its libpython (with an rpath to it) and starts
Python with ``executable`` set to the build environment's python (``UNIDG_PYTHON`` overrides it), so Python's own path
logic finds that environment (``pyvenv.cfg``) and its site-packages exactly as when the python runs; a regular or
editable install of unidg there is found with no set-up in the host program. ``PYTHONPATH`` is honoured as usual.
A host that already embeds Python keeps its interpreter. See docs/capi.md.

cffi and a C compiler are needed only to build, not to run the library (the ``[capi]`` extra).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from unidg import __version__
from unidg.core.errors import UniDGError

HEADER = Path(__file__).with_name("unidg.h")
MODULE_NAME = "_unidg_capi"
LIBRARY_NAME = "libunidg.so"
CDEF_BEGIN = "/* ---- BEGIN CDEF"
CDEF_END = "/* ---- END CDEF ---- */"

# Implemented in Python (unidg.runtime.capi._embedding); called only by the C wrappers below.
PYTHON_API = """
unidg_status* _unidg_py_create(const char* bundle_dir, const unidg_options* options, unidg_synth** out);
void _unidg_py_destroy(unidg_synth* synth);
unidg_status* _unidg_py_run(unidg_synth* synth, const unidg_request* request, unidg_image* out_image,
                            unidg_image* out_mask, int* completed);
const char* _unidg_py_last_metadata(unidg_synth* synth);
int32_t _unidg_py_resolution(const unidg_synth* synth);
"""

# Implemented in C; Python calls it through ``lib`` to make a status.
C_HELPERS = """
unidg_status* _unidg_status_new(int code, const char* message);
"""

C_SOURCE = (
    r"""
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include "unidg.h"

struct unidg_status {
    int code;
    char* message;
};

static const char unidg__version_string[] = UNIDG_VERSION_STRING;
static const char unidg__no_python[] =
    "the embedded Python runtime of libunidg could not start (the reason is printed on stderr): the unidg package "
    "and its dependencies must be importable by the python it starts as (UNIDG_PYTHON, default: the python that "
    "built the library) -- check that environment, add folders with PYTHONPATH, or rebuild the library from the "
    "environment where unidg is installed (`unidg capi build`)";

unidg_status* _unidg_status_new(int code, const char* message) {
    unidg_status* status = (unidg_status*)malloc(sizeof(unidg_status));
    if (status == NULL) {
        return NULL; /* out of memory: nothing better to report */
    }
    status->code = code;
    status->message = strdup(message != NULL ? message : "");
    return status;
}

/* Defined by cffi further down (extern "Python", unidg.runtime.capi._embedding). */"""
    + PYTHON_API
    + r"""
/* Start the interpreter as the build environment's own python (UNIDG_PYTHON overrides it), so Python's path logic
 * finds the environment (pyvenv.cfg) and its site-packages -- cffi's _cffi_backend included -- exactly as when that
 * python runs. A host that already embeds Python keeps its interpreter. */
static pthread_once_t unidg__python_once = PTHREAD_ONCE_INIT;

static void unidg__initialize_python(void) {
    PyConfig config;
    PyStatus status;
    const char* executable = getenv("UNIDG_PYTHON");
    if (Py_IsInitialized()) {
        return;
    }
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0; /* the host owns its signals */
    status = PyConfig_SetBytesString(&config, &config.executable,
                                     executable != NULL && executable[0] ? executable : UNIDG_PYTHON_EXECUTABLE);
    if (!PyStatus_Exception(status)) {
        status = Py_InitializeFromConfig(&config);
    }
    PyConfig_Clear(&config);
    if (!PyStatus_Exception(status)) {
        PyEval_SaveThread(); /* cffi takes the GIL per call */
    }
    /* On failure Python stays uninitialised and cffi's own start-up reports the error. */
}

static int unidg__start(void) {
    pthread_once(&unidg__python_once, unidg__initialize_python);
    return cffi_start_python();
}

const char* unidg_version(void) { return unidg__version_string; }

int unidg_abi_version(void) { return UNIDG_ABI_VERSION; }

int unidg_status_code(const unidg_status* status) { return status == NULL ? UNIDG_OK : status->code; }

const char* unidg_status_message(const unidg_status* status) {
    if (status == NULL || status->message == NULL) {
        return "";
    }
    return status->message;
}

void unidg_status_free(unidg_status* status) {
    if (status != NULL) {
        free(status->message);
        free(status);
    }
}

/* What every *_init does first: zero the struct and set struct_size, its first member, to the size this library was
   built with. Returns 0 for NULL. */
_Static_assert(offsetof(unidg_options, struct_size) == 0 && offsetof(unidg_request, struct_size) == 0,
               "struct_size is the first member of every sized struct");
static int unidg__init_sized(void* object, size_t size) {
    uint32_t struct_size = (uint32_t)size;
    if (object == NULL) {
        return 0;
    }
    memset(object, 0, size);
    memcpy(object, &struct_size, sizeof(struct_size));
    return 1;
}

void unidg_options_init(unidg_options* options) {
    if (unidg__init_sized(options, sizeof(*options))) {
        options->verify_bundle = 1;
    }
}

void unidg_request_init(unidg_request* request) {
    if (unidg__init_sized(request, sizeof(*request))) {
        request->seed = 0;
        request->steps = 0;
        request->guidance = -1.0f;
    }
}

unidg_status* unidg_synth_create(const char* bundle_dir, const unidg_options* options, unidg_synth** out) {
    unidg_status* status;
    if (out == NULL) {
        return _unidg_status_new(UNIDG_INVALID_ARGUMENT, "unidg_synth_create: out is NULL");
    }
    *out = NULL;
    if (bundle_dir == NULL) {
        return _unidg_status_new(UNIDG_INVALID_ARGUMENT, "unidg_synth_create: bundle_dir is NULL");
    }
    if (unidg__start() != 0) {
        return _unidg_status_new(UNIDG_INTERNAL, unidg__no_python);
    }
    status = _unidg_py_create(bundle_dir, options, out);
    if (status == NULL && *out == NULL) {
        return _unidg_status_new(UNIDG_INTERNAL, "unidg_synth_create failed unexpectedly (details on stderr)");
    }
    return status;
}

void unidg_synth_destroy(unidg_synth* synth) {
    if (synth != NULL && unidg__start() == 0) {
        _unidg_py_destroy(synth);
    }
}

unidg_status* unidg_synth_run(unidg_synth* synth, const unidg_request* request, unidg_image* out_image,
                              unidg_image* out_mask) {
    unidg_status* status;
    int completed = 0;
    if (synth == NULL || request == NULL || out_image == NULL) {
        return _unidg_status_new(UNIDG_INVALID_ARGUMENT,
                                 "unidg_synth_run: synth, request and out_image must not be NULL");
    }
    if (unidg__start() != 0) {
        return _unidg_status_new(UNIDG_INTERNAL, unidg__no_python);
    }
    status = _unidg_py_run(synth, request, out_image, out_mask, &completed);
    if (status == NULL && !completed) {
        return _unidg_status_new(UNIDG_INTERNAL, "unidg_synth_run failed unexpectedly (details on stderr)");
    }
    return status;
}

const char* unidg_synth_last_metadata(unidg_synth* synth) {
    const char* text = NULL;
    if (synth != NULL && unidg__start() == 0) {
        text = _unidg_py_last_metadata(synth);
    }
    return text != NULL ? text : "{}";
}

int32_t unidg_synth_resolution(const unidg_synth* synth) {
    if (synth == NULL || unidg__start() != 0) {
        return 0;
    }
    return _unidg_py_resolution(synth);
}
"""
)

INIT_CODE = """
from {module} import ffi, lib
from unidg.runtime.capi import _embedding

_embedding.install(ffi, lib)
"""


@dataclass(frozen=True)
class BuiltLibrary:
    library: Path
    header: Path
    python: str  # the environment's python the library starts as (UNIDG_PYTHON overrides it at run time)
    libpython: str  # the shared libpython it links


def _c_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid C string literal for paths and versions


def header_cdef(header_text: str) -> str:
    """The declarations between the CDEF markers of unidg.h (what cffi parses)."""
    try:
        begin = header_text.index(CDEF_BEGIN)
        begin = header_text.index("\n", begin) + 1
        end = header_text.index(CDEF_END)
    except ValueError as error:
        raise ValueError(f"{HEADER} lacks the CDEF markers ({CDEF_BEGIN!r} ... {CDEF_END!r})") from error
    return header_text[begin:end]


def build_library(out: str | Path, *, verbose: bool = False) -> BuiltLibrary:
    """Compile ``out/libunidg.so`` and copy ``unidg.h`` beside it. Needs cffi, a C compiler and Python headers."""
    try:
        import cffi
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "building libunidg needs cffi: install it with `pip install 'unidg[capi]'`", name="cffi"
        ) from error

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header_text = HEADER.read_text()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise UniDGError(
            f"this Python ({sysconfig.get_config_var('prefix')}) was built without a shared libpython, which an "
            "embedding library needs; build libunidg from a Python configured with --enable-shared (e.g. the "
            "distribution's python3 or pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)"
        )

    ffi = cffi.FFI()
    ffi.cdef(header_cdef(header_text) + C_HELPERS)
    ffi.embedding_api(PYTHON_API)
    init_code = INIT_CODE.format(module=MODULE_NAME)
    ffi.embedding_init_code(init_code)
    ffi.set_source(
        MODULE_NAME,
        C_SOURCE,
        include_dirs=[str(HEADER.parent)],
        define_macros=[
            ("UNIDG_VERSION_STRING", _c_string(__version__)),
            ("UNIDG_PYTHON_EXECUTABLE", _c_string(sys.executable)),
        ],
        extra_link_args=[f"-Wl,-rpath,{libdir}"] if libdir else [],
    )
    with tempfile.TemporaryDirectory(prefix="unidg-capi-") as tmp:
        built = Path(ffi.compile(tmpdir=tmp, target=LIBRARY_NAME, verbose=verbose))
        staged = out / f".{LIBRARY_NAME}.tmp"
        shutil.copy2(built, staged)
        os.replace(staged, out / LIBRARY_NAME)
    header_copy = out / "unidg.h"
    shutil.copy2(HEADER, header_copy)
    libpython = str(Path(libdir) / (sysconfig.get_config_var("LDLIBRARY") or "libpython"))
    return BuiltLibrary(library=out / LIBRARY_NAME, header=header_copy, python=sys.executable, libpython=libpython)
