"""``unidg generate``, ``unidg batch`` and ``unidg demo`` (registered by unidg.cli); ``unidg bench`` group.

Only argparse at import time: numpy, onnxruntime and (for the torch paths) torch load inside the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unidg.core.errors import OptionError
from unidg.core.staging import check_output_folder, staged_folder
from unidg.runtime.cli_options import (
    add_backend_options,
    add_bundle_option,
    add_command,
    add_out_option,
    add_quiet_option,
    add_seed_option,
    backend_options,
    command_group,
)


def _load_synthesizer(args: argparse.Namespace, **extra: object):
    # The runtime (numpy, Pillow, onnxruntime) loads when a command runs: `unidg --help` stays light.
    from unidg.runtime.synthesizer import DefectSynthesizer

    return DefectSynthesizer.from_bundle(
        args.bundle, backend=args.backend, verify=not args.no_verify, **extra, **backend_options(args)
    )


def step_progress_bar(total: int, description: str, *, quiet: bool = False):
    """A tqdm bar and a progress callback ``(step, total) -> True`` that advances it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit="step", disable=quiet)

    def advance(step: int, steps: int) -> bool:
        bar.total = steps
        bar.update(step - bar.n)
        return True

    return bar, advance


# ------------------------------------------------------------------------------------------------------------ generate
def _check_generate_options(args: argparse.Namespace) -> None:
    """Everything about the command line that can be refused without reading a file or loading the model."""
    from unidg.core.udg import SAMPLE_ID_PATTERN, check_category

    if not SAMPLE_ID_PATTERN.match(args.id):
        raise OptionError(
            f"--id {args.id!r}: a sample id is letters, digits, '.', '_' and '-', starting with a letter or digit "
            "(it names the output files)"
        )
    if not args.object_name.strip():
        raise OptionError("--object-name must not be empty (it goes into the caption stub); e.g. --object-name bottle")
    if args.category is not None:
        check_category(args.category)
    if args.zero_shot:
        if args.reference or args.reference_mask:
            raise OptionError("--zero-shot retrieves the reference: leave out --reference and --reference-mask")
        if args.category is None:
            raise OptionError("--zero-shot needs --category: the reference is retrieved among that category's")
    elif bool(args.reference) != bool(args.reference_mask) or not (args.reference or args.prompt is not None):
        raise OptionError(
            "--reference and --reference-mask are required (or --zero-shot REPOSITORY with --category to retrieve one; "
            "with a UniDG-Text bundle, --prompt alone)"
        )
    backend_options(args)
    check_output_folder(args.out)  # new or empty, in a writable folder


def _zero_shot_request(args: argparse.Namespace, synth, library, options: dict):
    """The request with the reference of ``--category`` that looks most like the source around its target region."""
    import numpy as np

    from unidg.core.images import load_image, load_mask
    from unidg.runtime.reference_library import embed_defect
    from unidg.runtime.synthesizer import SynthesisRequest

    library.check_bundle(synth.bundle.fingerprint)
    source = load_image(args.source, "source image")
    target_mask = load_mask(args.mask, "target mask")
    entry = library.retrieve(args.category, embed_defect(synth, source, target_mask), np.random.default_rng(args.seed))
    reference, reference_mask = library.load_reference(entry)
    request = SynthesisRequest(reference, reference_mask, source, target_mask, **options, name="request")
    return request, entry


def _generate(args: argparse.Namespace) -> int:
    import json
    import time

    from unidg.core.udg import UDGWriter
    from unidg.runtime.jobs import write_result
    from unidg.runtime.reference_library import ReferenceLibrary
    from unidg.runtime.synthesizer import SynthesisRequest

    _check_generate_options(args)
    out = Path(args.out)
    # The output folder is made first, under a hidden name: an unwritable place fails before any work, and a failure
    # at any later point leaves nothing behind.
    with staged_folder(out) as staging:
        started = time.perf_counter()
        options = {"seed": args.seed, "steps": args.steps, "guidance": args.guidance, "category": args.category}
        if args.prompt is not None:
            options["prompt"] = args.prompt
        if args.zero_shot:
            library = ReferenceLibrary.load(args.zero_shot)
        else:
            request = SynthesisRequest.from_files(
                args.reference, args.reference_mask, args.source, args.mask, **options, name="request"
            )
        loaded_inputs = time.perf_counter()
        synth = _load_synthesizer(args)
        with synth:
            if args.zero_shot:
                request, retrieved = _zero_shot_request(args, synth, library, options)
            request = synth.check(request)  # every input and option is checked before the model runs
            loaded_bundle = time.perf_counter()
            bar, advance = step_progress_bar(request.steps, "generate", quiet=args.quiet)
            with bar:
                result = synth.generate(request, progress=advance)
        metadata = dict(result.metadata)
        metadata["timings_s"] = {
            **metadata["timings_s"],
            "load_inputs": round(loaded_inputs - started, 6),
            "load_bundle": round(loaded_bundle - loaded_inputs, 6),
        }
        metadata["inputs"] = {
            "reference": None if args.reference is None else str(args.reference),
            "reference_mask": None if args.reference_mask is None else str(args.reference_mask),
            "source": str(args.source),
            "mask": str(args.mask),
        }
        if args.zero_shot:
            metadata["inputs"].update(zero_shot=str(args.zero_shot), reference_id=retrieved.id)
            metadata["inputs"].update(reference=retrieved.image, reference_mask=retrieved.mask)
        with UDGWriter(staging) as writer:
            write_result(writer, staging, args.id, request, result, metadata, "metadata.json", args.object_name)
    print(f"wrote {out} (abnormal/{args.id}.png, mask/{args.id}.png, metadata.json)")
    print(json.dumps({"seed": request.seed, "steps": request.steps, "seconds": metadata["timings_s"]["total"]}))
    return 0


# --------------------------------------------------------------------------------------------------------------- batch
def _batch(args: argparse.Namespace) -> int:
    from unidg.runtime.jobs import FAILED_FILE, run_batch

    if args.batch_size is not None and args.batch_size < 1:  # before the bundle is loaded for that batch size
        raise OptionError(f"--batch-size must be >= 1 (got {args.batch_size})")
    synth = _load_synthesizer(args, max_batch=args.batch_size)
    with synth:
        report = run_batch(
            synth,
            args.jobs,
            args.out,
            batch_size=args.batch_size,
            progress=not args.quiet,
            keep_going=args.keep_going,
        )
    failed = f", {len(report.failed)} failed (see {report.folder / FAILED_FILE})" if report.failed else ""
    print(
        f"{report.folder}: {report.generated} job(s) generated, {report.already_done} already done{failed}, "
        f"{report.total} in all ({report.seconds:.1f} s)"
    )
    return 1 if report.failed else 0


# ---------------------------------------------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    from unidg.runtime.demo import DEFAULT_BUNDLE, DEFAULT_SAMPLES, DEFAULT_TEXT_BUNDLE, run_demo

    bundle = Path(args.bundle) if args.bundle else DEFAULT_TEXT_BUNDLE if args.text else DEFAULT_BUNDLE
    samples = Path(args.samples) if args.samples else DEFAULT_SAMPLES
    for what, path, flag in (("bundle", bundle, "--bundle"), ("samples folder", samples, "--samples")):
        if not path.exists():
            raise OptionError(
                f"the demo {what} {path} is not installed; pass {flag} (a bundle from `unidg export onnx`, "
                "a folder with samples.json)"
            )
    args.bundle = str(bundle)
    if args.text and args.out == "out/demo":  # the default: keep the reference demo's output beside it
        args.out = "out/demo-text"
    synth = _load_synthesizer(args)
    with synth:
        sheet, results = run_demo(synth, samples, args.out, steps=args.steps, progress=not args.quiet, text=args.text)
    seconds = sum(r.metadata["timings_s"]["total"] for r in results)
    print(f"wrote {len(results)} result(s) to {Path(args.out)} and the contact sheet {sheet} ({seconds:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------------------------------- bench
def bench_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-commands of ``unidg bench`` (every benchmark module adds its own)."""
    return command_group(subparsers, "bench", "benchmarks (runtime, attention, serve, gpu, triton)")


# ------------------------------------------------------------------------------------------------------------ register
def register(subparsers: argparse._SubParsersAction) -> None:
    generate = add_command(
        subparsers,
        _generate,
        "generate",
        help="paint a reference defect into a source image region (one request)",
        description="Writes a UDG quadruplet (normal = source, abnormal = result, mask = dilated target mask, "
        "caption stub) and metadata.json (seed, settings, bundle fingerprint, timings) into --out.",
    )
    add_bundle_option(generate)
    generate.add_argument("--reference", help="reference image showing the defect (or --zero-shot)")
    generate.add_argument("--reference-mask", help="mask of the defect in the reference (white)")
    generate.add_argument(
        "--zero-shot",
        metavar="REPOSITORY",
        help="retrieve the reference of --category from this repository (unidg data references) instead",
    )
    generate.add_argument("--source", required=True, help="image to paint the defect into")
    generate.add_argument("--mask", required=True, help="target region in the source (white)")
    add_seed_option(generate, "noise seed; same seed + inputs -> same image")
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's, 28)")
    generate.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the bundle's)")
    generate.add_argument("--category", default=None, help="defect category for the caption (one of the 28)")
    generate.add_argument(
        "--prompt",
        help="UniDG-Text bundles: the instruction, e.g. 'Add the small round hole defect to the image.' (without "
        "--reference); with a reference it defaults to the bundle's reference instruction",
    )
    generate.add_argument("--object-name", default="object", help="object name for the caption stub")
    generate.add_argument("--id", default="000000", help="sample id of the quadruplet (file names)")
    add_out_option(generate, "output folder (new, or empty)")
    add_quiet_option(generate)
    add_backend_options(generate)

    batch = add_command(
        subparsers,
        _batch,
        "batch",
        help="run many generation jobs from a JSON-lines file (resumable)",
        description="Each line: reference, reference_mask, source, mask, seed, optional id, category, steps, "
        "guidance, object_name; instead of mask, mask_template: {library, category} places a template of a "
        "`unidg data templates` library (seeded by seed); relative paths resolve against the jobs file's "
        "folder. Re-run the same command "
        "after an interruption: finished jobs are kept, the rest are generated once.",
    )
    add_bundle_option(batch)
    batch.add_argument("--jobs", required=True, help="jobs file (JSON lines)")
    add_out_option(batch, "output UDG folder (created, or resumed)")
    batch.add_argument("--batch-size", type=int, default=None, help="requests per model pass (default: bundle's)")
    add_quiet_option(batch)
    batch.add_argument(
        "--keep-going",
        action="store_true",
        help="a job that fails (bad inputs, or an error while generating) is recorded in failed.jsonl in --out and "
        "the others go on; the command then exits with status 1 (default: stop at the first failure)",
    )
    add_backend_options(batch)

    demo = add_command(subparsers, _demo, "demo", help="run the shipped UniDG-nano model on the sample images")
    add_out_option(demo, "output folder (out/demo-text with --text)", default="out/demo")
    add_quiet_option(demo)
    add_bundle_option(demo, required=False, help="bundle to run (default: the shipped UniDG-nano bundle)")
    demo.add_argument("--samples", default=None, help="folder with samples.json (default: the shipped samples)")
    demo.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's)")
    demo.add_argument(
        "--text",
        action="store_true",
        help="UniDG-Text: the shipped UniDG-nano-text bundle (or --bundle) on each case with its reference and from "
        "an instruction alone (needs unidg[text])",
    )
    add_backend_options(demo)
