"""``unidg export triton`` (registered by unidg.cli): a Triton Inference Server model repository for a bundle."""

from __future__ import annotations

import argparse


def _export_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-commands of ``unidg export``: those of an existing ``export`` parser, or of a new one."""
    existing = subparsers.choices.get("export")
    if existing is None:
        parser = subparsers.add_parser("export", help="export weights to bundles, engines and serving repositories")
        parser.set_defaults(handler=lambda args: parser.print_help() or 2)
        return parser.add_subparsers(dest="export_command", metavar="EXPORT")
    for action in existing._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return existing.add_subparsers(dest="export_command", metavar="EXPORT")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = _export_subparsers(subparsers).add_parser(
        "triton",
        help="Triton Inference Server model repository for a bundle (docs/triton.md)",
        description="Write a model repository: a Python-backend model wrapping DefectSynthesizer, the bundle, and "
        "for a bundle with TensorRT engines one tensorrt_plan model per graph, called through BLS.",
    )
    parser.add_argument("--bundle", required=True, help="bundle folder written by `unidg export onnx`")
    parser.add_argument(
        "--out", required=True, help="model repository folder to write (tritonserver --model-repository)"
    )
    parser.add_argument("--model-name", default="unidg", help="name of the Python-backend model (default unidg)")
    parser.add_argument(
        "--kind", choices=("gpu", "cpu"), default="gpu", help="instance kind of the model (default gpu)"
    )
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
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(handler=run_export_triton)


def run_export_triton(args: argparse.Namespace) -> int:
    from unidg.export.triton_repo import TritonRepoOptions, write_triton_repo

    try:
        gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip())
    except ValueError as error:
        raise ValueError(f"--gpus must be comma-separated integers (got {args.gpus!r})") from error
    options = TritonRepoOptions(
        model_name=args.model_name,
        instance_kind=args.kind,
        instances=args.instances,
        gpus=gpus,
        engine_instances=args.engine_instances,
        use_engines=not args.no_engines,
        bundle_reference=args.reference_bundle,
        providers=args.providers,
        execution_env=args.execution_env,
        overwrite=args.overwrite,
    )
    repo = write_triton_repo(args.bundle, args.out, options)
    print(f"wrote {repo.path}: models {sorted(repo.configs)}")
    if repo.engine_models:
        print(f"TensorRT models called through BLS: {repo.engine_models}")
    print(f"run: tritonserver --model-repository {repo.path.resolve()}")
    return 0
