/*
 * A C host program for libunidg (tests/test_capi.py compiles it with the system C compiler and runs it).
 *
 *   capi_host BUNDLE_DIR full        end-to-end run + error paths; exit 0 when every check passes
 *   capi_host BUNDLE_DIR text        a UniDG-Text bundle: request.prompt with and without a reference, its errors
 *   capi_host BUNDLE_DIR no-python   the library's Python side cannot start: every call must say so, no crash
 *
 * Every check prints one line ("ok ..." or "FAIL ..."); the exit status is the number of failed checks (capped).
 */
#include <math.h>
#include <stddef.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "unidg.h"

static int failures = 0;

#define CHECK(cond, ...)                      \
    do {                                      \
        if (cond) {                           \
            printf("ok   ");                  \
        } else {                              \
            printf("FAIL ");                  \
            failures++;                       \
        }                                     \
        printf(__VA_ARGS__);                  \
        printf("\n");                         \
        fflush(stdout);                       \
    } while (0)

typedef struct {
    unidg_image image;
    uint8_t* storage;
} owned_image;

/* A buffer with `pad` spare bytes at the end of each row, to exercise stride_bytes. */
static owned_image make_image(int width, int height, int channels, int pad) {
    owned_image out;
    out.image.width = width;
    out.image.height = height;
    out.image.channels = channels;
    out.image.stride_bytes = (int64_t)width * channels + pad;
    out.storage = (uint8_t*)calloc((size_t)(out.image.stride_bytes * height), 1);
    out.image.data = out.storage;
    return out;
}

static uint8_t* pixel(const unidg_image* image, int x, int y) {
    int64_t stride = image->stride_bytes ? image->stride_bytes : (int64_t)image->width * image->channels;
    return image->data + y * stride + (int64_t)x * image->channels;
}

/* Deterministic test pictures: a textured reference with a dark elliptic defect, a smooth source, a target box. */
static void fill_inputs(owned_image* ref, owned_image* ref_mask, owned_image* src, owned_image* target) {
    int x, y, c;
    for (y = 0; y < ref->image.height; y++) {
        for (x = 0; x < ref->image.width; x++) {
            double dy = (y - ref->image.height * 0.45) / (ref->image.height * 0.15);
            double dx = (x - ref->image.width * 0.55) / (ref->image.width * 0.2);
            int inside = dx * dx + dy * dy <= 1.0;
            for (c = 0; c < 3; c++) {
                pixel(&ref->image, x, y)[c] = inside ? (uint8_t)(40 + 5 * c) : (uint8_t)(140 + (x * 7 + y * 3 + c * 11) % 60);
            }
            pixel(&ref_mask->image, x, y)[0] = inside ? 255 : 0;
        }
    }
    for (y = 0; y < src->image.height; y++) {
        for (x = 0; x < src->image.width; x++) {
            for (c = 0; c < 3; c++) {
                pixel(&src->image, x, y)[c] = (uint8_t)(170 + (x + 2 * y + 5 * c) % 50);
            }
            int in_box = x >= src->image.width / 3 && x < src->image.width / 3 + 24 && y >= src->image.height / 4 &&
                         y < src->image.height / 4 + 20;
            pixel(&target->image, x, y)[0] = in_box ? 200 : 0;
        }
    }
}

typedef struct {
    int calls;
    int last_total;
    int cancel_at;
} progress_state;

static int count_progress(int step, int total, void* user) {
    progress_state* state = (progress_state*)user;
    state->calls++;
    state->last_total = total;
    return state->cancel_at > 0 && step >= state->cancel_at;
}

/* ---- re-entrancy: a second call on a busy handle must be refused with UNIDG_BUSY ---- */
typedef struct {
    unidg_synth* synth;
    const unidg_request* request;
    unidg_image out;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int go;
    int done;
    int code;
} busy_probe;

static void* probe_thread(void* arg) {
    busy_probe* probe = (busy_probe*)arg;
    pthread_mutex_lock(&probe->lock);
    while (!probe->go) {
        pthread_cond_wait(&probe->changed, &probe->lock);
    }
    pthread_mutex_unlock(&probe->lock);
    unidg_status* status = unidg_synth_run(probe->synth, probe->request, &probe->out, NULL);
    pthread_mutex_lock(&probe->lock);
    probe->code = unidg_status_code(status);
    probe->done = 1;
    pthread_cond_broadcast(&probe->changed);
    pthread_mutex_unlock(&probe->lock);
    unidg_status_free(status);
    return NULL;
}

static int busy_progress(int step, int total, void* user) {
    busy_probe* probe = (busy_probe*)user;
    (void)total;
    if (step != 1) {
        return 0;
    }
    /* The first call is inside the handle now: let the probe try the same handle and wait for its answer. */
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 60;
    pthread_mutex_lock(&probe->lock);
    probe->go = 1;
    pthread_cond_broadcast(&probe->changed);
    while (!probe->done) {
        if (pthread_cond_timedwait(&probe->changed, &probe->lock, &deadline) != 0) {
            break;
        }
    }
    pthread_mutex_unlock(&probe->lock);
    return 0;
}

/* ---- distinct handles on distinct threads ---- */
typedef struct {
    unidg_synth* synth;
    const unidg_request* request;
    owned_image out;
    int code;
} parallel_run;

static void* parallel_thread(void* arg) {
    parallel_run* run = (parallel_run*)arg;
    unidg_status* status = unidg_synth_run(run->synth, run->request, &run->out.image, NULL);
    run->code = unidg_status_code(status);
    if (status != NULL) {
        printf("     parallel run: %s\n", unidg_status_message(status));
    }
    unidg_status_free(status);
    return NULL;
}

static int no_python(const char* bundle_dir) {
    unidg_synth* synth = (unidg_synth*)0x1;
    unidg_status* status = unidg_synth_create(bundle_dir, NULL, &synth);
    CHECK(status != NULL, "create without a working Python returns a status");
    CHECK(unidg_status_code(status) == UNIDG_INTERNAL, "... with code UNIDG_INTERNAL (got %d)", unidg_status_code(status));
    CHECK(strstr(unidg_status_message(status), "PYTHONPATH") != NULL, "... and a message that says how to fix it: %s",
          unidg_status_message(status));
    CHECK(synth == NULL, "... and *out is NULL");
    unidg_status_free(status);
    CHECK(strcmp(unidg_version(), "") != 0, "unidg_version works without Python: %s", unidg_version());
    return failures;
}

/* Pixels of a and b differing inside `mask` (nonzero), and whether a equals `source` everywhere outside it. */
static long differ_inside(const unidg_image* a, const unidg_image* b, const unidg_image* mask, const unidg_image* source,
                          int* outside_is_source) {
    long changed = 0;
    *outside_is_source = 1;
    for (int y = 0; y < a->height; y++) {
        for (int x = 0; x < a->width; x++) {
            if (pixel(mask, x, y)[0]) {
                changed += memcmp(pixel(a, x, y), pixel(b, x, y), 3) != 0;
            } else if (memcmp(pixel(a, x, y), pixel(source, x, y), 3) != 0) {
                *outside_is_source = 0;
            }
        }
    }
    return changed;
}

static int run_text(const char* bundle_dir) {
    unidg_options options;
    unidg_options_init(&options);
    options.threads = 1;
    unidg_synth* synth = NULL;
    unidg_status* status = unidg_synth_create(bundle_dir, &options, &synth);
    CHECK(status == NULL && synth != NULL, "create the text bundle handle: %s", unidg_status_message(status));
    if (status != NULL) {
        unidg_status_free(status);
        return 1;
    }
    owned_image ref = make_image(72, 80, 3, 0), ref_mask = make_image(72, 80, 1, 0);
    owned_image src = make_image(90, 70, 3, 5), target = make_image(90, 70, 1, 3);
    fill_inputs(&ref, &ref_mask, &src, &target);
    owned_image hole = make_image(90, 70, 3, 0), crack = make_image(90, 70, 3, 0), again = make_image(90, 70, 3, 0);
    owned_image mask = make_image(90, 70, 1, 0);

    unidg_request request;
    unidg_request_init(&request);
    CHECK(request.prompt == NULL && request.reference.data == NULL, "unidg_request_init leaves prompt and reference NULL");
    request.source = src.image;
    request.target_mask = target.image;
    request.seed = 7;
    request.steps = 3;

    /* The instruction alone: no reference (data NULL). */
    request.prompt = "Add the hole defect to the image.";
    status = unidg_synth_run(synth, &request, &hole.image, &mask.image);
    CHECK(status == NULL, "a prompt without a reference runs: %s", unidg_status_message(status));
    unidg_status_free(status);
    const char* metadata = unidg_synth_last_metadata(synth);
    CHECK(strstr(metadata, "\"prompt\": \"Add the hole defect to the image.\"") != NULL &&
              strstr(metadata, "\"with_reference\": false") != NULL,
          "... and its metadata carries the prompt, without a reference");
    request.prompt = "Add the long crack defect to the image.";
    status = unidg_synth_run(synth, &request, &crack.image, NULL);
    CHECK(status == NULL, "another prompt runs: %s", unidg_status_message(status));
    unidg_status_free(status);
    int hole_outside = 0, crack_outside = 0;
    long changed = differ_inside(&hole.image, &crack.image, &mask.image, &src.image, &hole_outside);
    differ_inside(&crack.image, &hole.image, &mask.image, &src.image, &crack_outside);
    CHECK(changed > 0 && hole_outside && crack_outside,
          "two prompts differ only inside the mask (%ld pixels differ inside; outside equal to the source: %d %d)",
          changed, hole_outside, crack_outside);
    request.prompt = "Add the hole defect to the image.";
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(status == NULL && differ_inside(&again.image, &hole.image, &mask.image, &src.image, &hole_outside) == 0,
          "the same prompt and seed give the same pixels: %s", unidg_status_message(status));
    unidg_status_free(status);

    /* With the reference pair: with the prompt, and without it (the bundle's reference instruction). */
    request.reference = ref.image;
    request.reference_mask = ref_mask.image;
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(status == NULL && strstr(unidg_synth_last_metadata(synth), "\"with_reference\": true") != NULL,
          "a prompt with a reference runs: %s", unidg_status_message(status));
    unidg_status_free(status);
    request.prompt = NULL;
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(status == NULL, "a reference without a prompt runs: %s", unidg_status_message(status));
    unidg_status_free(status);

    /* The reference without its mask. */
    request.prompt = "Add the hole defect to the image.";
    memset(&request.reference_mask, 0, sizeof(request.reference_mask));
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_INPUT && strstr(unidg_status_message(status), "reference mask"),
          "a reference without its mask is refused naming it: %s", unidg_status_message(status));
    unidg_status_free(status);
    memset(&request.reference, 0, sizeof(request.reference));

    /* Prompts refused by name. */
    const char* bad[][2] = {
        {"Add the \xff\xfe defect to the image.", "UTF-8"},
        {"", "empty"},
        {"crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack "
         "crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack "
         "crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack crack "
         "crack crack crack crack crack crack",
         "T5 tokens"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        request.prompt = bad[i][0];
        status = unidg_synth_run(synth, &request, &again.image, NULL);
        CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT &&
                  strstr(unidg_status_message(status), "request.prompt") &&
                  strstr(unidg_status_message(status), bad[i][1]),
              "a bad prompt is refused naming request.prompt (%s): %s", bad[i][1], unidg_status_message(status));
        unidg_status_free(status);
    }

    /* No prompt and no reference: the reference is required, as for any request without a prompt. */
    request.prompt = NULL;
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT && strstr(unidg_status_message(status), "request.reference"),
          "no prompt and no reference is refused naming the reference: %s", unidg_status_message(status));
    unidg_status_free(status);
    /* A host built before the prompt field: the prompt past its struct_size is not read. */
    request.prompt = "Add the hole defect to the image.";
    request.struct_size = (uint32_t)offsetof(unidg_request, prompt);
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT && strstr(unidg_status_message(status), "request.reference"),
          "a first-version request does not read the prompt: %s", unidg_status_message(status));
    unidg_status_free(status);

    unidg_synth_destroy(synth);
    free(ref.storage);
    free(ref_mask.storage);
    free(src.storage);
    free(target.storage);
    free(hole.storage);
    free(crack.storage);
    free(again.storage);
    free(mask.storage);
    printf("%d check(s) failed\n", failures);
    return failures > 100 ? 100 : failures;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s BUNDLE_DIR full|text|no-python\n", argv[0]);
        return 2;
    }
    const char* bundle_dir = argv[1];
    if (strcmp(argv[2], "no-python") == 0) {
        return no_python(bundle_dir) ? 1 : 0;
    }
    if (strcmp(argv[2], "text") == 0) {
        return run_text(bundle_dir);
    }

    printf("unidg %s, ABI %d\n", unidg_version(), unidg_abi_version());
    CHECK(unidg_abi_version() == UNIDG_ABI_VERSION, "ABI version matches the header");
    CHECK(unidg_status_code(NULL) == UNIDG_OK && strcmp(unidg_status_message(NULL), "") == 0, "NULL status is OK");

    /* Error path: a bundle folder that does not exist. */
    const char* missing = "/nonexistent/unidg-bundle-for-capi-test";
    unidg_synth* synth = NULL;
    unidg_status* status = unidg_synth_create(missing, NULL, &synth);
    CHECK(status != NULL && synth == NULL, "a missing bundle is refused");
    CHECK(unidg_status_code(status) == UNIDG_BUNDLE_ERROR, "... with UNIDG_BUNDLE_ERROR (got %d)",
          unidg_status_code(status));
    CHECK(strstr(unidg_status_message(status), missing) != NULL, "... and the message names the path: %s",
          unidg_status_message(status));
    unidg_status_free(status);

    status = unidg_synth_create(bundle_dir, NULL, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT, "create with out == NULL is refused");
    unidg_status_free(status);

    /* A bundle_dir that is not UTF-8 is refused naming the argument. */
    status = unidg_synth_create("/tmp/bundle-\xff\xfe", NULL, &synth);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT && strstr(unidg_status_message(status), "bundle_dir") &&
              strstr(unidg_status_message(status), "UTF-8") && synth == NULL,
          "a non-UTF-8 bundle_dir is refused naming it: %s", unidg_status_message(status));
    unidg_status_free(status);

    unidg_options options;
    unidg_options_init(&options);
    CHECK(options.spin == 0, "unidg_options_init leaves spinning off");
    /* spin is an onnxruntime option: refused by name for another backend. */
    options.backend = "tensorrt";
    options.spin = 1;
    status = unidg_synth_create(bundle_dir, &options, &synth);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT && strstr(unidg_status_message(status), "options.spin") &&
              synth == NULL,
          "spin with the tensorrt backend is refused naming it: %s", unidg_status_message(status));
    unidg_status_free(status);
    /* A host built against the first header passes the struct without cache and spin: accepted, spin left unread. */
    options.struct_size = (uint32_t)offsetof(unidg_options, cache);
    status = unidg_synth_create(bundle_dir, &options, &synth);
    CHECK(unidg_status_code(status) != UNIDG_INVALID_ARGUMENT || !strstr(unidg_status_message(status), "spin"),
          "a first-version options struct is accepted and spin past its end is not read: %s",
          unidg_status_message(status));
    unidg_status_free(status);
    if (synth != NULL) {
        unidg_synth_destroy(synth);
        synth = NULL;
    }
    options.struct_size = (uint32_t)offsetof(unidg_options, cache) - 4;
    status = unidg_synth_create(bundle_dir, &options, &synth);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT && strstr(unidg_status_message(status), "struct_size"),
          "an options struct shorter than the first version is refused: %s", unidg_status_message(status));
    unidg_status_free(status);

    unidg_options_init(&options);
    options.threads = 1;

    /* Step-cache options: refused by name when unusable; a caller built before them still gets the defaults. */
    options.cache = "sometimes";
    status = unidg_synth_create(bundle_dir, &options, &synth);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT && strstr(unidg_status_message(status), "options.cache") &&
              synth == NULL,
          "an unknown cache mode is refused naming it: %s", unidg_status_message(status));
    unidg_status_free(status);
    options.cache = NULL;
    options.cache_threshold = NAN;
    status = unidg_synth_create(bundle_dir, &options, &synth);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT &&
              strstr(unidg_status_message(status), "options.cache_threshold") && synth == NULL,
          "a NaN cache threshold is refused naming it: %s", unidg_status_message(status));
    unidg_status_free(status);
    options.cache_threshold = 0.0f;
    options.cache = "static";
    status = unidg_synth_create(bundle_dir, &options, &synth);
    CHECK(status != NULL && strstr(unidg_status_message(status), "no step-cache data") && synth == NULL,
          "a cached run on a bundle without cache data is refused: %s", unidg_status_message(status));
    unidg_status_free(status);
    options.cache = "sometimes"; /* beyond a first-version struct_size: never read */
    options.struct_size = (uint32_t)offsetof(unidg_options, cache);
    status = unidg_synth_create(bundle_dir, &options, &synth);
    CHECK(status == NULL && synth != NULL, "a first-version options struct (no cache fields) is accepted: %s",
          unidg_status_message(status));
    unidg_status_free(status);
    unidg_synth_destroy(synth);
    synth = NULL;
    unidg_options_init(&options);
    options.threads = 1;

    status = unidg_synth_create(bundle_dir, &options, &synth);
    CHECK(status == NULL && synth != NULL, "create the bundle handle: %s", unidg_status_message(status));
    if (status != NULL) {
        unidg_status_free(status);
        return 1;
    }
    printf("     resolution S = %d\n", unidg_synth_resolution(synth));
    CHECK(unidg_synth_resolution(synth) > 0, "resolution is known");
    CHECK(strcmp(unidg_synth_last_metadata(synth), "{}") == 0, "no metadata before the first run");

    /* Inputs: a non-square source with padded rows, so the library must honour stride_bytes. */
    owned_image ref = make_image(72, 80, 3, 0), ref_mask = make_image(72, 80, 1, 0);
    owned_image src = make_image(90, 70, 3, 5), target = make_image(90, 70, 1, 3);
    fill_inputs(&ref, &ref_mask, &src, &target);

    unidg_request request;
    unidg_request_init(&request);
    CHECK(request.struct_size == sizeof(unidg_request) && request.guidance < 0 && request.steps == 0,
          "unidg_request_init sets struct_size and the bundle defaults");
    request.reference = ref.image;
    request.reference_mask = ref_mask.image;
    request.source = src.image;
    request.target_mask = target.image;
    request.seed = 1234;
    request.steps = 3;
    progress_state progress = {0, 0, 0};
    request.progress = count_progress;
    request.progress_user = &progress;

    owned_image out = make_image(90, 70, 3, 7), out_mask = make_image(90, 70, 1, 0);
    status = unidg_synth_run(synth, &request, &out.image, &out_mask.image);
    CHECK(status == NULL, "run one request: %s", unidg_status_message(status));
    unidg_status_free(status);
    CHECK(progress.calls == 3 && progress.last_total == 3, "progress called once per step (%d calls, total %d)",
          progress.calls, progress.last_total);

    long outside = 0, outside_equal = 0, inside = 0, inside_changed = 0, target_uncovered = 0;
    for (int y = 0; y < 70; y++) {
        for (int x = 0; x < 90; x++) {
            int masked = pixel(&out_mask.image, x, y)[0];
            int same = memcmp(pixel(&out.image, x, y), pixel(&src.image, x, y), 3) == 0;
            if (masked != 0 && masked != 255) {
                target_uncovered += 1000000; /* the mask must be 0/255 */
            }
            if (masked) {
                inside++;
                inside_changed += !same;
            } else {
                outside++;
                outside_equal += same;
            }
            if (pixel(&target.image, x, y)[0] && !masked) {
                target_uncovered++;
            }
        }
    }
    printf("     %ld pixels outside the mask (%ld equal to the source), %ld inside (%ld changed)\n", outside,
           outside_equal, inside, inside_changed);
    CHECK(outside > 0 && outside_equal == outside, "every pixel outside the dilated mask equals the source");
    CHECK(target_uncovered == 0, "the returned mask is 0/255 and covers the whole target mask");
    CHECK(inside_changed > 0, "the model changed pixels inside the mask");
    const char* metadata = unidg_synth_last_metadata(synth);
    CHECK(strstr(metadata, "\"seed\": 1234") != NULL, "metadata JSON carries the seed (%.60s...)", metadata);

    /* Same seed, same inputs: same output (no mask buffer this time). */
    owned_image again = make_image(90, 70, 3, 0);
    request.progress = NULL;
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    int identical = status == NULL;
    for (int y = 0; y < 70 && identical; y++) {
        identical = memcmp(pixel(&again.image, 0, y), pixel(&out.image, 0, y), 90 * 3) == 0;
    }
    CHECK(identical, "a second run with the same seed is bit-identical");
    unidg_status_free(status);

    /* Cancel from the progress callback. */
    progress_state cancel = {0, 0, 2};
    request.progress = count_progress;
    request.progress_user = &cancel;
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_CANCELLED, "a nonzero progress return cancels: code %d, %s",
          unidg_status_code(status), unidg_status_message(status));
    CHECK(cancel.calls == 2, "... right after the step that asked (%d calls)", cancel.calls);
    unidg_status_free(status);
    request.progress = NULL;

    /* Output buffer smaller than the source. */
    owned_image small = make_image(89, 70, 3, 0);
    status = unidg_synth_run(synth, &request, &small.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_BUFFER_TOO_SMALL, "a too small output buffer: %s",
          unidg_status_message(status));
    unidg_status_free(status);

    /* Unusable inputs: an empty target mask; a reference mask of another size; a request without struct_size. */
    memset(target.storage, 0, (size_t)(target.image.stride_bytes * 70));
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_INPUT && strstr(unidg_status_message(status), "target mask"),
          "an empty target mask is refused naming it: %s", unidg_status_message(status));
    unidg_status_free(status);
    fill_inputs(&ref, &ref_mask, &src, &target);
    request.reference_mask.width = 71;
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_INPUT && strstr(unidg_status_message(status), "reference mask"),
          "a reference mask of another size is refused: %s", unidg_status_message(status));
    unidg_status_free(status);
    request.reference_mask.width = 72;
    request.reference.channels = 4;
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT, "a 4-channel reference is refused: %s",
          unidg_status_message(status));
    unidg_status_free(status);
    request.reference.channels = 3;
    request.steps = 100000;
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT && strstr(unidg_status_message(status), "steps"),
          "steps out of range is refused: %s", unidg_status_message(status));
    unidg_status_free(status);
    request.steps = -5;
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT && strstr(unidg_status_message(status), "request.steps"),
          "negative steps are refused, not run with the default: %s", unidg_status_message(status));
    unidg_status_free(status);
    request.steps = 3;
    request.guidance = NAN;
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT &&
              strstr(unidg_status_message(status), "request.guidance"),
          "a NaN guidance is refused, not run with the default: %s", unidg_status_message(status));
    unidg_status_free(status);
    request.guidance = -1.0f;
    request.category = "scr\xe4tch";
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT &&
              strstr(unidg_status_message(status), "request.category") &&
              strstr(unidg_status_message(status), "UTF-8"),
          "a non-UTF-8 category is refused naming it: %s", unidg_status_message(status));
    unidg_status_free(status);
    request.category = NULL;
    /* A prompt is for UniDG-Text bundles: a reference-mode bundle refuses it by name. */
    request.prompt = "Add the scratch defect to the image.";
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT && strstr(unidg_status_message(status), "request.prompt") &&
              strstr(unidg_status_message(status), "reference-mode bundle"),
          "a prompt for a reference-mode bundle is refused naming it: %s", unidg_status_message(status));
    unidg_status_free(status);
    /* A host built before the prompt field passes the shorter struct: accepted, the prompt past its end not read. */
    unidg_request first = request;
    first.struct_size = (uint32_t)offsetof(unidg_request, prompt);
    status = unidg_synth_run(synth, &first, &again.image, NULL);
    CHECK(status == NULL, "a first-version request struct runs and its prompt past the end is not read: %s",
          unidg_status_message(status));
    unidg_status_free(status);
    request.prompt = NULL;
    unidg_request bad = request;
    bad.struct_size = 8;
    status = unidg_synth_run(synth, &bad, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT && strstr(unidg_status_message(status), "struct_size"),
          "a request without unidg_request_init is refused: %s", unidg_status_message(status));
    unidg_status_free(status);

    /* A handle is not re-entrant: a concurrent call on it is refused with UNIDG_BUSY. */
    busy_probe probe;
    memset(&probe, 0, sizeof(probe));
    probe.synth = synth;
    probe.request = &request;
    probe.out = again.image;
    probe.code = -1;
    pthread_mutex_init(&probe.lock, NULL);
    pthread_cond_init(&probe.changed, NULL);
    pthread_t prober;
    pthread_create(&prober, NULL, probe_thread, &probe);
    unidg_request busy_request = request;
    busy_request.progress = busy_progress;
    busy_request.progress_user = &probe;
    owned_image busy_out = make_image(90, 70, 3, 0);
    status = unidg_synth_run(synth, &busy_request, &busy_out.image, NULL);
    pthread_join(prober, NULL);
    CHECK(status == NULL, "the first call finishes normally: %s", unidg_status_message(status));
    CHECK(probe.code == UNIDG_BUSY, "the concurrent call on the same handle got UNIDG_BUSY (code %d)", probe.code);
    unidg_status_free(status);

    /* Distinct handles run concurrently and give the same result as the single-threaded run. */
    unidg_synth* second = NULL;
    status = unidg_synth_create(bundle_dir, &options, &second);
    CHECK(status == NULL, "create a second handle: %s", unidg_status_message(status));
    unidg_status_free(status);
    if (second != NULL) {
        parallel_run runs[2] = {{synth, &request, make_image(90, 70, 3, 0), -1},
                                {second, &request, make_image(90, 70, 3, 0), -1}};
        pthread_t threads[2];
        for (int i = 0; i < 2; i++) {
            pthread_create(&threads[i], NULL, parallel_thread, &runs[i]);
        }
        for (int i = 0; i < 2; i++) {
            pthread_join(threads[i], NULL);
        }
        int same = runs[0].code == UNIDG_OK && runs[1].code == UNIDG_OK;
        for (int i = 0; i < 2 && same; i++) {
            for (int y = 0; y < 70 && same; y++) {
                same = memcmp(pixel(&runs[i].out.image, 0, y), pixel(&out.image, 0, y), 90 * 3) == 0;
            }
        }
        CHECK(same, "two handles on two threads both succeed with the single-threaded result");
        free(runs[0].out.storage);
        free(runs[1].out.storage);
        unidg_synth_destroy(second);
    }

    unidg_synth_destroy(synth);
    status = unidg_synth_run(synth, &request, &again.image, NULL);
    CHECK(unidg_status_code(status) == UNIDG_INVALID_ARGUMENT, "a destroyed handle is refused, not dereferenced: %s",
          unidg_status_message(status));
    unidg_status_free(status);
    unidg_synth_destroy(NULL);

    free(ref.storage);
    free(ref_mask.storage);
    free(src.storage);
    free(target.storage);
    free(out.storage);
    free(out_mask.storage);
    free(again.storage);
    free(small.storage);
    free(busy_out.storage);
    printf("%d check(s) failed\n", failures);
    return failures > 100 ? 100 : failures;
}
