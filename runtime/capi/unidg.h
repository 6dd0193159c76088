/*
 * unidg.h -- C ABI of the UniDG runtime (libunidg.so).
 *
 * Paints a defect taken from a reference image (its mask marks the defect) into a target region of a source image;
 * with a UniDG-Text bundle, a defect an instruction describes (request.prompt), with or without a reference.
 * The library embeds the Python interpreter of the environment that built it and runs unidg.runtime's
 * DefectSynthesizer; build it with `unidg capi build --out DIR` (see docs/capi.md).
 *
 * Conventions
 *   - Every call that can fail returns `unidg_status*`: NULL means success. A non-NULL status carries a code
 *     (unidg_status_code) and a message (unidg_status_message) and must be released with unidg_status_free.
 *   - Create/destroy pairs: unidg_synth_create / unidg_synth_destroy.
 *   - Images are caller-owned buffers (unidg_image): the library never keeps or frees them. Inputs are copied
 *     before the call returns; the output is written into the caller's buffer.
 *   - Strings (bundle_dir, category, prompt, backend, device) are NUL-terminated UTF-8; other bytes are refused with
 *     UNIDG_INVALID_ARGUMENT and a message naming the argument.
 *   - Structs that may grow carry `struct_size`: set it with the matching *_init() function, which also writes
 *     the defaults. A library accepts any struct_size >= the size of the first version of the struct.
 *
 * Thread safety
 *   - A unidg_synth handle is NOT re-entrant: one call at a time per handle. A second concurrent call on the same
 *     handle is refused with UNIDG_BUSY (it does not block and does not corrupt the handle).
 *   - Distinct handles may be used concurrently from different threads; graph execution runs without Python's GIL,
 *     so handles on different threads overlap.
 *   - unidg_status_* and unidg_version may be called from any thread. A status is owned by the thread that got it.
 *   - The progress callback runs on the thread that called unidg_synth_run, between denoising steps.
 *   - unidg_synth_destroy must not race with a call on the same handle.
 *
 * Memory
 *   - Each handle holds its own copy of the model (onnxruntime sessions); create one handle per concurrent stream.
 *   - The embedded interpreter is started on the first call and lives until the process exits.
 */
#ifndef UNIDG_H
#define UNIDG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Version of this header's ABI; unidg_abi_version() returns the library's. */
#define UNIDG_ABI_VERSION 1

/* ---- BEGIN CDEF (the part below, up to END CDEF, is also read by cffi: plain declarations only) ---- */

/* Status codes (unidg_status_code). */
enum {
    UNIDG_OK = 0,                 /* only for a NULL status */
    UNIDG_INVALID_ARGUMENT = 1,   /* a NULL pointer, bad struct_size, bad image layout, bad seed/steps/guidance */
    UNIDG_INVALID_INPUT = 2,      /* images/masks unusable: sizes disagree, empty or full mask (message names it) */
    UNIDG_BUNDLE_ERROR = 3,       /* the bundle folder is missing, not a bundle, changed since export, unsupported */
    UNIDG_BUFFER_TOO_SMALL = 4,   /* the output image/mask buffer is smaller than the source image */
    UNIDG_CANCELLED = 5,          /* the progress callback returned nonzero; nothing was written */
    UNIDG_BUSY = 6,               /* the handle is running another call (handles are not re-entrant) */
    UNIDG_BACKEND_UNAVAILABLE = 7,/* the requested backend / device / execution provider is not installed here */
    UNIDG_RUNTIME_ERROR = 8,      /* the model failed (e.g. NaN output); message says why */
    UNIDG_INTERNAL = 9            /* the embedded Python runtime could not start, or an unexpected error */
};

/* An error: code + message. NULL means success. */
typedef struct unidg_status unidg_status;

/* A loaded bundle with its backend. Opaque. */
typedef struct unidg_synth unidg_synth;

/* A caller-owned 8-bit image: row-major, channels interleaved (RGB for images; 1 channel for masks, nonzero = set).
 * stride_bytes: bytes from one row start to the next; 0 means width * channels (tightly packed). */
typedef struct unidg_image {
    uint8_t* data;
    int32_t width;
    int32_t height;
    int32_t channels;
    int64_t stride_bytes;
} unidg_image;

/* Returns nonzero to cancel the run (unidg_synth_run then returns UNIDG_CANCELLED). step counts 1..total. */
typedef int (*unidg_progress_fn)(int step, int total, void* user);

typedef struct unidg_options {
    uint32_t struct_size;      /* sizeof(unidg_options), set by unidg_options_init */
    const char* backend;       /* "onnxruntime" (default when NULL), "tensorrt", "torch" */
    const char* device;        /* where the model runs, as the command line's --device: onnxruntime: execution
                                  providers, "cpu" (NULL), "cuda", "tensorrt" or several comma-separated;
                                  tensorrt: a CUDA device index ("0" when NULL); torch: "cpu" (NULL), "cuda[:N]" */
    int32_t threads;           /* onnxruntime only: intra-op threads; 0 = the cores this process may use */
    int32_t verify_bundle;     /* 1 (default): re-hash every bundle file (sha256) at create; 0: skip */
    /* Added after the first version of the struct (a struct_size that ends before them gets the defaults): */
    const char* cache;         /* step caching, as --cache: NULL = the setting the bundle's gate recorded (off
                                  without one), "off", "static" (the bundle's schedule) or "dynamic" */
    float cache_threshold;     /* dynamic caching, as --cache-threshold: > 0; 0 = the bundle's calibrated threshold */
    int32_t spin;              /* onnxruntime only: 1 = idle threads busy-wait for work (a dedicated machine);
                                  0 (default) = they sleep, for cores shared with other programs */
} unidg_options;

typedef struct unidg_request {
    uint32_t struct_size;        /* sizeof(unidg_request), set by unidg_request_init */
    unidg_image reference;       /* RGB, 3 channels: the image the defect is taken from. With a prompt it may be
                                    left out: data NULL (as unidg_request_init leaves it) with reference_mask's too */
    unidg_image reference_mask;  /* 1 channel, size of reference: nonzero marks the defect */
    unidg_image source;          /* RGB, 3 channels: the image the defect is painted into */
    unidg_image target_mask;     /* 1 channel, size of source: nonzero marks where the defect goes */
    int64_t seed;                /* 0 .. 2^63-1; default 0. Same seed + inputs + bundle -> same output */
    int32_t steps;               /* denoising steps; 0 = the bundle's default (28 for UniDG); < 0 is refused */
    float guidance;              /* guidance scale; negative = the bundle's default (30 for UniDG); NaN/inf refused */
    const char* category;        /* optional defect category (one of the 28 UDG categories, UTF-8) or NULL */
    unidg_progress_fn progress;  /* optional, may be NULL */
    void* progress_user;         /* passed to progress as is */
    /* Added after the first version of the struct (a struct_size that ends before it gets NULL): */
    const char* prompt;          /* UniDG-Text bundles: the instruction (UTF-8), e.g. "Add the hole defect to the
                                    image."; NULL (default): none -- a reference-mode bundle needs NULL, a text
                                    bundle then uses its reference instruction. Refused (UNIDG_INVALID_ARGUMENT,
                                    message naming request.prompt) when empty, over the model's T5 tokens, not UTF-8,
                                    or given to a reference-mode bundle */
} unidg_request;

/* Library version string, e.g. "0.1.0" (static storage; never free it). */
const char* unidg_version(void);
/* ABI version of the library (compare with UNIDG_ABI_VERSION). */
int unidg_abi_version(void);

/* Status accessors. A NULL status has code UNIDG_OK and message "". The message is valid until the status is freed. */
int unidg_status_code(const unidg_status* status);
const char* unidg_status_message(const unidg_status* status);
void unidg_status_free(unidg_status* status);

/* Fill defaults and struct_size. */
void unidg_options_init(unidg_options* options);
void unidg_request_init(unidg_request* request);

/* Load and check the bundle folder (manifest, sha256 of every file, shapes) and create the backend.
 * options may be NULL (defaults). On success *out is a new handle; on failure *out is NULL. */
unidg_status* unidg_synth_create(const char* bundle_dir, const unidg_options* options, unidg_synth** out);
/* Release the handle and its model. NULL is ignored. */
void unidg_synth_destroy(unidg_synth* synth);

/* Run one request. out_image: caller-owned RGB buffer (3 channels) of the source's width x height; out_mask:
 * optional (may be NULL) 1-channel buffer of the same size, set to 255 where pixels may differ from the source
 * (the dilated target mask) and 0 elsewhere. Every output pixel outside that mask equals the source pixel.
 * On any error nothing is guaranteed about the output buffers' contents. */
unidg_status* unidg_synth_run(unidg_synth* synth, const unidg_request* request, unidg_image* out_image,
                              unidg_image* out_mask);

/* JSON metadata of the handle's last successful run (seed, steps, guidance, timings, bundle fingerprint...), or
 * "{}" before the first. Valid until the next call on this handle or its destruction. */
const char* unidg_synth_last_metadata(unidg_synth* synth);

/* Resolution S of the bundle (each diptych half is S x S). Returns 0 for NULL. */
int32_t unidg_synth_resolution(const unidg_synth* synth);

/* ---- END CDEF ---- */

#ifdef __cplusplus
}
#endif

#endif /* UNIDG_H */
