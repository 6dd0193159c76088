"""The Python side of ``libunidg.so``: the ``_unidg_py_*`` functions behind the C wrappers of ``unidg.h``.

Runs inside the interpreter the library embeds (see ``build.py``). Every function catches everything and answers with a
status (``lib._unidg_status_new``): an exception must never cross into C, where cffi would turn it into a NULL status,
i.e. "success". Handles are small integers in a registry, cast to ``unidg_synth*``: a stale or foreign pointer is
refused with a status instead of being dereferenced.

Images cross as caller-owned buffers: inputs are copied out (the caller may reuse its buffers when the call returns),
the output is written into the caller's buffer only after the whole run succeeded.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unidg.core.errors import UniDGError
from unidg.core.images import (
    REFERENCE_IMAGE,
    REFERENCE_MASK,
    SOURCE_IMAGE,
    TARGET_MASK,
    InputError,
)
from unidg.core.manifest import ManifestError
from unidg.runtime.backends import BACKENDS
from unidg.runtime.backends.base import BackendError, BackendUnavailable, NonFiniteOutputError, device_options
from unidg.runtime.sampler import GenerationCancelled
from unidg.runtime.serve import jsonable
from unidg.runtime.step_cache import cache_options
from unidg.runtime.synthesizer import DefectSynthesizer, RequestError, SynthesisRequest

# Status codes, as in unidg.h.
UNIDG_INVALID_ARGUMENT = 1
UNIDG_INVALID_INPUT = 2
UNIDG_BUNDLE_ERROR = 3
UNIDG_BUFFER_TOO_SMALL = 4
UNIDG_CANCELLED = 5
UNIDG_BUSY = 6
UNIDG_BACKEND_UNAVAILABLE = 7
UNIDG_RUNTIME_ERROR = 8
UNIDG_INTERNAL = 9

REQUEST_NAME = "unidg_synth_run"  # names a request in the runtime's messages


class AbiError(Exception):
    """A refused call: ``code`` is the unidg.h status code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Handle:
    synthesizer: DefectSynthesizer
    lock: threading.Lock = field(default_factory=threading.Lock)
    metadata: Any = None  # char[] of the last run's JSON metadata, kept alive for unidg_synth_last_metadata


_handles: dict[int, Handle] = {}
_registry_lock = threading.Lock()
_next_id = 1


def status_code_of(error: BaseException) -> int:
    """The unidg.h status code for an exception from the runtime."""
    if isinstance(error, AbiError):
        return error.code
    if isinstance(error, GenerationCancelled):
        return UNIDG_CANCELLED
    if isinstance(error, BackendUnavailable):
        return UNIDG_BACKEND_UNAVAILABLE
    if isinstance(error, ManifestError | BackendError | FileNotFoundError):  # BundleError is a ManifestError
        return UNIDG_BUNDLE_ERROR
    if isinstance(error, InputError):
        return UNIDG_INVALID_INPUT
    if isinstance(error, NonFiniteOutputError):
        return UNIDG_RUNTIME_ERROR
    if isinstance(error, RequestError | ValueError):
        return UNIDG_INVALID_ARGUMENT
    return UNIDG_INTERNAL


def _message(error: BaseException) -> str:
    if isinstance(error, RequestError) and error.option == "prompt":  # named as the struct's field
        return f"request.prompt: {str(error).removeprefix(REQUEST_NAME + ': ')}"
    if isinstance(error, AbiError | ValueError | FileNotFoundError | GenerationCancelled):
        return str(error)
    return f"{type(error).__name__}: {error}"


def read_image(ffi: Any, image: Any, name: str, channels: int) -> np.ndarray:
    """Copy a caller's ``unidg_image`` into a (H, W, channels) uint8 array, checking its layout."""
    if image.data == ffi.NULL:
        raise AbiError(UNIDG_INVALID_ARGUMENT, f"{name}: data is NULL")
    width, height, stride = _layout(image, name, channels)
    size = stride * (height - 1) + width * channels
    flat = np.frombuffer(ffi.buffer(image.data, size), dtype=np.uint8)
    view = np.lib.stride_tricks.as_strided(flat, (height, width, channels), (stride, channels, 1), writeable=False)
    return np.array(view)


def _layout(image: Any, name: str, channels: int) -> tuple[int, int, int]:
    width, height = int(image.width), int(image.height)
    if width < 1 or height < 1:
        raise AbiError(UNIDG_INVALID_ARGUMENT, f"{name}: width and height must be >= 1 (got {width}x{height})")
    if int(image.channels) != channels:
        what = "an RGB image" if channels == 3 else "a mask"
        raise AbiError(
            UNIDG_INVALID_ARGUMENT, f"{name}: channels must be {channels} for {what} (got {int(image.channels)})"
        )
    stride = int(image.stride_bytes) or width * channels
    if stride < width * channels:
        raise AbiError(
            UNIDG_INVALID_ARGUMENT,
            f"{name}: stride_bytes {stride} is smaller than a row (width {width} x {channels} channels); "
            "use 0 for tightly packed rows",
        )
    return width, height, stride


def output_view(ffi: Any, image: Any, name: str, channels: int, height: int, width: int) -> np.ndarray:
    """A writable (H, W, C) view of a caller's output buffer, refusing one smaller than the source."""
    if image.data == ffi.NULL:
        raise AbiError(UNIDG_INVALID_ARGUMENT, f"{name}: data is NULL")
    if int(image.channels) != channels:
        raise AbiError(UNIDG_INVALID_ARGUMENT, f"{name}: channels must be {channels} (got {int(image.channels)})")
    have_w, have_h = int(image.width), int(image.height)
    if have_w < width or have_h < height:
        raise AbiError(
            UNIDG_BUFFER_TOO_SMALL,
            f"{name} is {have_w}x{have_h} but the source image is {width}x{height} (W x H); allocate the output "
            "at the source size",
        )
    if (have_w, have_h) != (width, height):
        raise AbiError(
            UNIDG_INVALID_ARGUMENT,
            f"{name} is {have_w}x{have_h}; it must be exactly the source size {width}x{height} (W x H)",
        )
    _, _, stride = _layout(image, name, channels)
    size = stride * (height - 1) + width * channels
    flat = np.frombuffer(ffi.buffer(image.data, size), dtype=np.uint8)
    return np.lib.stride_tricks.as_strided(flat, (height, width, channels), (stride, channels, 1), writeable=True)


def _register(synthesizer: DefectSynthesizer) -> int:
    global _next_id
    with _registry_lock:
        handle_id = _next_id
        _next_id += 1
        _handles[handle_id] = Handle(synthesizer)
    return handle_id


def _lookup(ffi: Any, pointer: Any) -> Handle:
    handle_id = int(ffi.cast("uintptr_t", pointer))
    with _registry_lock:
        handle = _handles.get(handle_id)
    if handle is None:
        raise AbiError(UNIDG_INVALID_ARGUMENT, "unknown or destroyed unidg_synth handle")
    return handle


def c_string(ffi: Any, pointer: Any, name: str) -> str:
    """A caller's NUL-terminated UTF-8 string, refused with a message naming the argument when it is not UTF-8."""
    raw = ffi.string(pointer)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AbiError(
            UNIDG_INVALID_ARGUMENT,
            f"{name} is not valid UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start}); pass UTF-8 text",
        ) from None


def _later_fields(ffi: Any, struct: Any, name: str, first_added: str) -> bool:
    """Whether ``struct`` (a ``unidg_<name>``) was built with the fields added after its first version, which ends
    where ``first_added`` begins; a struct_size short of the first version is refused."""
    first_version = ffi.offsetof(f"unidg_{name}", first_added)
    struct_size = int(struct.struct_size)
    if struct_size < first_version:
        raise AbiError(
            UNIDG_INVALID_ARGUMENT,
            f"{name}.struct_size is {struct_size}, expected >= {first_version}: call unidg_{name}_init()",
        )
    return struct_size >= ffi.sizeof(f"unidg_{name}")


def _options(ffi: Any, options: Any) -> dict:
    if options == ffi.NULL:
        return {"backend": "onnxruntime", "verify": True, "backend_options": {}}
    later_fields = _later_fields(ffi, options, "options", "cache")  # a caller built with cache, spin
    backend = c_string(ffi, options.backend, "options.backend") if options.backend != ffi.NULL else "onnxruntime"
    device = c_string(ffi, options.device, "options.device") if options.device != ffi.NULL else None
    if backend not in BACKENDS:
        raise AbiError(UNIDG_INVALID_ARGUMENT, f"options.backend {backend!r}: choose one of {sorted(BACKENDS)}")
    try:
        backend_options = device_options(backend, device, "options.device")
    except UniDGError as error:
        raise AbiError(UNIDG_INVALID_ARGUMENT, str(error)) from error
    if int(options.threads) > 0:
        if backend != "onnxruntime":
            raise AbiError(
                UNIDG_INVALID_ARGUMENT,
                f"options.threads applies to the onnxruntime backend only (backend is {backend!r})",
            )
        backend_options["threads"] = int(options.threads)
    if later_fields:
        backend_options |= _cache_options(ffi, options)
        if int(options.spin):
            if backend != "onnxruntime":
                raise AbiError(
                    UNIDG_INVALID_ARGUMENT,
                    f"options.spin applies to the onnxruntime backend only (backend is {backend!r})",
                )
            backend_options["spin"] = True
    return {"backend": backend, "verify": bool(options.verify_bundle), "backend_options": backend_options}


def _cache_options(ffi: Any, options: Any) -> dict:
    mode = c_string(ffi, options.cache, "options.cache") if options.cache != ffi.NULL else None
    threshold = float(options.cache_threshold)
    try:
        return cache_options(mode, None if threshold == 0 else threshold)
    except UniDGError as error:
        message = str(error).replace("--cache-threshold", "options.cache_threshold").replace("--cache", "options.cache")
        raise AbiError(UNIDG_INVALID_ARGUMENT, message) from error


def _request(ffi: Any, request: Any) -> tuple[SynthesisRequest, Any, Any]:
    prompt = None
    if _later_fields(ffi, request, "request", "prompt") and request.prompt != ffi.NULL:  # a caller built with prompt
        prompt = c_string(ffi, request.prompt, "request.prompt")
    reference = reference_mask = None
    # Beside a prompt the reference pair may be left out (data NULL); one without the other is the runtime's error.
    if prompt is None or request.reference.data != ffi.NULL:
        reference = read_image(ffi, request.reference, "request.reference (" + REFERENCE_IMAGE + ")", 3)
    if prompt is None or request.reference_mask.data != ffi.NULL:
        reference_mask = read_image(ffi, request.reference_mask, "request.reference_mask (" + REFERENCE_MASK + ")", 1)
    source = read_image(ffi, request.source, "request.source (" + SOURCE_IMAGE + ")", 3)
    target_mask = read_image(ffi, request.target_mask, "request.target_mask (" + TARGET_MASK + ")", 1)
    category = c_string(ffi, request.category, "request.category") if request.category != ffi.NULL else None
    steps, guidance = int(request.steps), float(request.guidance)
    if steps < 0:
        raise AbiError(
            UNIDG_INVALID_ARGUMENT,
            f"request.steps is {steps}; use 0 for the bundle's default or a positive step count",
        )
    if not math.isfinite(guidance):
        raise AbiError(
            UNIDG_INVALID_ARGUMENT,
            f"request.guidance is {guidance}; use a finite scale >= 0, or a negative value for the bundle's default",
        )
    synthesis = SynthesisRequest(
        reference=reference,
        reference_mask=None if reference_mask is None else reference_mask[..., 0] != 0,
        source=source,
        target_mask=target_mask[..., 0] != 0,
        seed=int(request.seed),
        steps=steps if steps > 0 else None,
        guidance=guidance if guidance >= 0 else None,
        category=category or None,
        prompt=prompt,  # "" stays "": the runtime refuses an empty instruction
        name=REQUEST_NAME,
    )
    return synthesis, request.progress, request.progress_user


def install(ffi: Any, lib: Any) -> None:
    """Define the extern "Python" functions of the library (called once, from its init code)."""

    def fail(error: BaseException) -> Any:
        return lib._unidg_status_new(status_code_of(error), _message(error).encode("utf-8", "replace"))

    def extern(on_error: Callable[[BaseException], Any]) -> Callable[[Callable], Callable]:
        """An extern "Python" function of the library: no exception crosses into C; the C caller gets
        ``on_error(error)`` instead."""

        def define(function: Callable) -> Callable:
            def guarded(*args: Any) -> Any:
                try:
                    return function(*args)
                except BaseException as error:
                    return on_error(error)

            return ffi.def_extern(name=function.__name__)(guarded)

        return define

    @extern(fail)
    def _unidg_py_create(bundle_dir: Any, options: Any, out: Any) -> Any:
        path = c_string(ffi, bundle_dir, "bundle_dir")
        chosen = _options(ffi, options)
        synthesizer = DefectSynthesizer.from_bundle(
            path, backend=chosen["backend"], verify=chosen["verify"], **chosen["backend_options"]
        )
        out[0] = ffi.cast("unidg_synth*", _register(synthesizer))
        return ffi.NULL

    @extern(lambda error: None)  # destroy has no status to report into
    def _unidg_py_destroy(synth: Any) -> None:
        handle_id = int(ffi.cast("uintptr_t", synth))
        with _registry_lock:
            handle = _handles.pop(handle_id, None)
        if handle is not None:
            with handle.lock:  # let a running call finish
                handle.synthesizer.close()

    @extern(fail)
    def _unidg_py_run(synth: Any, request: Any, out_image: Any, out_mask: Any, completed: Any) -> Any:
        handle = _lookup(ffi, synth)
        if not handle.lock.acquire(blocking=False):
            raise AbiError(UNIDG_BUSY, "the unidg_synth handle is running another call; handles are not re-entrant")
        try:
            synthesis, callback, user = _request(ffi, request)
            height, width = synthesis.source.shape[:2]
            image_view = output_view(ffi, out_image, "out_image", 3, height, width)
            mask_view = None
            if out_mask != ffi.NULL:
                mask_view = output_view(ffi, out_mask, "out_mask", 1, height, width)
            progress = None
            if callback != ffi.NULL:

                def progress(step: int, total: int) -> bool:
                    return int(callback(step, total, user)) == 0

            result = handle.synthesizer.generate(synthesis, progress=progress)
            image_view[...] = result.image
            if mask_view is not None:
                mask_view[..., 0] = np.where(result.mask, 255, 0).astype(np.uint8)
            text = json.dumps(jsonable(result.metadata))
            handle.metadata = ffi.new("char[]", text.encode("utf-8"))
        finally:
            handle.lock.release()
        completed[0] = 1
        return ffi.NULL

    @extern(lambda error: ffi.NULL)
    def _unidg_py_last_metadata(synth: Any) -> Any:
        handle = _lookup(ffi, synth)
        return handle.metadata if handle.metadata is not None else ffi.NULL

    @extern(lambda error: 0)
    def _unidg_py_resolution(synth: Any) -> int:
        return int(_lookup(ffi, synth).synthesizer.bundle.resolution)
