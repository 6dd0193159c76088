"""``unidg export triton`` (registered by unidg.cli): a Triton Inference Server model repository for a bundle."""

from __future__ import annotations

import argparse

from unidg.core.errors import OptionError
from unidg.runtime.cli_options import add_bundle_option, add_command, command_group, option_values
from unidg.runtime.commands import bench_subparsers


def export_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-commands of ``unidg export`` (this module and unidg.export.commands add to it)."""
    return command_group(subparsers, "export", "export weights to bundles, engines and serving repositories")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        export_subparsers(subparsers),
        run_export_triton,
        "triton",
        help="Triton Inference Server model repository for a bundle (docs/triton.md)",
        description="Write a model repository: a Python-backend model wrapping DefectSynthesizer, the bundle, and "
        "for a bundle with TensorRT engines one tensorrt_plan model per graph, called through BLS.",
    )
    add_bundle_option(parser)
    parser.add_argument(
        "--out", required=True, help="model repository folder to write (tritonserver --model-repository)"
    )
    parser.add_argument("--model-name", default="unidg", help="name of the Python-backend model (default unidg)")
    parser.add_argument("--kind", choices=("gpu", "cpu"), default="gpu", help="instance kind of the model")
    parser.add_argument("--instances", type=int, default=1, help="model instances per GPU (or in all, on CPU)")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids for the instance groups (default: all)")
    parser.add_argument("--engine-instances", type=int, default=1, help="instances of each TensorRT model per GPU")
    parser.add_argument("--no-engines", action="store_true", help="ignore the bundle's TensorRT engines (onnxruntime)")
    parser.add_argument(
        "--reference-bundle",
        metavar="PATH",
        help="do not copy the bundle; the model reads it at PATH as the server sees it (e.g. a mounted volume)",
    )
    parser.add_argument("--providers", help="onnxruntime providers in the model (default: cuda on --kind gpu)")
    parser.add_argument("--execution-env", help="EXECUTION_ENV_PATH for the Python backend (conda-pack archive)")
    parser.add_argument(
        "--cache",
        choices=("off", "static", "dynamic"),
        default=None,
        help="step caching in the model (default: the setting the bundle's gate recorded; docs/step-cache.md)",
    )
    parser.add_argument("--cache-threshold", type=float, default=None, help="dynamic step caching threshold (> 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    register_bench(subparsers)


def run_export_triton(args: argparse.Namespace) -> int:
    # numpy- and TensorRT-side modules load when the command runs: `unidg --help` stays light
    from unidg.export.triton_repo import TritonRepoOptions, write_triton_repo

    try:
        gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip())
    except ValueError as error:
        raise OptionError(f"--gpus must be comma-separated integers (got {args.gpus!r})") from error
    options = TritonRepoOptions(
        **option_values(args, "model_name", "instances", "engine_instances", "providers", "execution_env"),
        **option_values(args, "cache", "cache_threshold", "overwrite"),
        instance_kind=args.kind,
        gpus=gpus,
        use_engines=not args.no_engines,
        bundle_reference=args.reference_bundle,
    )
    repo = write_triton_repo(args.bundle, args.out, options)
    print(f"wrote {repo.path}: models {sorted(repo.configs)}")
    if repo.engine_models:
        print(f"TensorRT models called through BLS: {repo.engine_models}")
    print(f"run: tritonserver --model-repository {repo.path.resolve()}")
    return 0


# --------------------------------------------------------------------------------------------------------------- bench
def register_bench(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        bench_subparsers(subparsers),
        run_bench_triton,
        "triton",
        help="latency of a running Triton server (gRPC) against the runtime in-process, side by side",
        description="Sends one demo sample to the unidg model of a running Triton server over gRPC and runs the "
        "same request in-process with the same bundle, alternately, and reports the median (p50) of each; checks "
        "that both images are byte-identical. Start the server as docs/triton.md says.",
    )
    parser.add_argument("--url", required=True, help="the server's gRPC address, host:port (e.g. 127.0.0.1:8001)")
    parser.add_argument("--model-name", default="unidg", help="name of the Python-backend model (default unidg)")
    add_bundle_option(parser, required=False, help="the bundle the server serves (default: the shipped one)")
    parser.add_argument("--samples", default=None, help="samples folder (default: the shipped demo samples)")
    parser.add_argument("--sample", default=None, help="id of the sample to send (default: the first)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's)")
    parser.add_argument("--requests", type=int, default=20, help="timed requests per side")


def bench_triton(
    url: str,
    model_name: str = "unidg",
    bundle: str | None = None,
    samples: str | None = None,
    sample: str | None = None,
    steps: int | None = None,
    requests: int = 20,
) -> dict:
    """Median latencies (s) of ``requests`` Triton gRPC calls and as many in-process runs, alternated."""
    import statistics
    import time

    import numpy as np
    from PIL import Image

    try:
        import tritonclient.grpc as grpcclient
    except ModuleNotFoundError as error:
        raise OptionError("unidg bench triton needs tritonclient[grpc]: pip install 'tritonclient[grpc]'") from error
    from unidg.runtime.backends import create_backend
    from unidg.runtime.bundle import load_bundle
    from unidg.runtime.demo import DEFAULT_BUNDLE, DEFAULT_SAMPLES, read_samples
    from unidg.runtime.synthesizer import DefectSynthesizer

    if requests < 1:
        raise OptionError(f"--requests must be >= 1 (got {requests})")
    cases = read_samples(samples or DEFAULT_SAMPLES)
    case = next((c for c in cases if sample in (None, c.id)), None)
    if case is None:
        raise OptionError(f"--sample {sample!r} is not one of {[c.id for c in cases]}")
    loaded = load_bundle(bundle or DEFAULT_BUNDLE)
    request = case.request(steps=steps)

    def pixels(path: object, mode: str) -> np.ndarray:
        with Image.open(path) as image:
            return np.ascontiguousarray(np.asarray(image.convert(mode)), dtype=np.uint8)

    client = grpcclient.InferenceServerClient(url)
    tensors = {
        "REFERENCE": pixels(case.reference, "RGB"),
        "REFERENCE_MASK": pixels(case.reference_mask, "L"),
        "SOURCE": pixels(case.source, "RGB"),
        "TARGET_MASK": pixels(case.mask, "L"),
    }
    inputs = []
    for name, array in tensors.items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), "UINT8"))
        inputs[-1].set_data_from_numpy(array)
    options = [("SEED", "INT64", np.array([case.seed], np.int64))]
    if steps is not None:
        options.append(("STEPS", "INT32", np.array([steps], np.int32)))
    for name, datatype, value in options:
        inputs.append(grpcclient.InferInput(name, [1], datatype))
        inputs[-1].set_data_from_numpy(value)
    triton, local = [], []
    with DefectSynthesizer(loaded, create_backend("onnxruntime", loaded)) as synth:
        client.infer(model_name, inputs)  # warm-up, both sides
        synth.generate(request)
        for _ in range(requests):  # alternated, so both see the same load on the machine
            started = time.perf_counter()
            image = client.infer(model_name, inputs).as_numpy("IMAGE")
            triton.append(time.perf_counter() - started)
            started = time.perf_counter()
            result = synth.generate(request)
            local.append(time.perf_counter() - started)
            if not np.array_equal(image, result.image):
                raise RuntimeError(f"the server's image for {case.id!r} differs from the runtime's")
    return {
        "server_version": client.get_server_metadata().version,
        "sample": case.id,
        "steps": request.steps if request.steps is not None else loaded.settings.steps,
        "requests": requests,
        "triton_grpc_p50_s": round(statistics.median(triton), 4),
        "in_process_p50_s": round(statistics.median(local), 4),
        "triton_grpc_range_s": [round(min(triton), 4), round(max(triton), 4)],
        "in_process_range_s": [round(min(local), 4), round(max(local), 4)],
        "ratio_p50": round(statistics.median(triton) / statistics.median(local), 3),
    }


def run_bench_triton(args: argparse.Namespace) -> int:
    import json

    result = bench_triton(args.url, args.model_name, args.bundle, args.samples, args.sample, args.steps, args.requests)
    print(json.dumps(result, indent=2))
    return 0
