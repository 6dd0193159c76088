"""``unidg data synth|validate`` (registered by unidg.cli)."""

from __future__ import annotations

import argparse
import io
import sys

from unidg.runtime.cli_options import (
    add_backend_options,
    add_bundle_option,
    add_command,
    add_out_option,
    add_overwrite_option,
    add_quiet_option,
    add_seed_option,
    backend_options,
    command_group,
)


def _synth(args: argparse.Namespace) -> int:
    import time

    # The data tools (torch, scipy, the runtime) load when the command runs: `unidg --help` stays light.
    from unidg.train.procedural import synthesize

    start = time.perf_counter()
    summary = synthesize(
        args.out,
        args.count,
        seed=args.seed,
        size=args.size,
        progress=not args.quiet,
        overwrite=args.overwrite,
        non_square_fraction=args.non_square,
    )
    seconds = time.perf_counter() - start
    print(
        f"{args.out}: {args.count} quadruplets, {len(summary['categories'])} categories on "
        f"{len(summary['objects'])} objects, sizes {', '.join(summary['image_sizes'])} "
        f"({seconds:.1f} s, {1000 * seconds / args.count:.0f} ms per quadruplet)"
    )
    return 0


def _table(title: str, rows: list[tuple[str, int, str]]) -> None:
    print(title)
    width = max(len(name) for name, _, _ in rows)
    for name, count, detail in rows:
        print(f"  {name:<{width}}  {count:>6}  {detail}".rstrip())


def _validate(args: argparse.Namespace) -> int:
    from collections import defaultdict

    from unidg.core.udg import CATEGORIES, INDEX_FILE, validate

    quadruplets, problems = validate(args.folder, check_files=not args.index_only)
    objects_of: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    categories_of: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for q in quadruplets:
        objects_of[q.category][q.object_name] += 1
        categories_of[q.object_name][q.category] += 1

    def detail(counts: dict[str, int]) -> str:
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return ", ".join(f"{name} {count}" for name, count in ranked)

    print(f"{args.folder}/{INDEX_FILE}: {len(quadruplets)} valid quadruplets, {len(problems)} bad lines")
    if quadruplets:
        order = {name: i for i, name in enumerate(CATEGORIES)}
        by_category = sorted(objects_of, key=order.__getitem__)
        _table(
            "per category (objects):",
            [(c, sum(objects_of[c].values()), detail(objects_of[c])) for c in by_category],
        )
        _table(
            "per object (categories):",
            [(o, sum(categories_of[o].values()), detail(categories_of[o])) for o in sorted(categories_of)],
        )
        # What Diversity-SFT can draw (App. C.1): a partner of the same object and category, or of the same category
        # on another object.
        intra = sum(count for objects in objects_of.values() for count in objects.values() if count > 1)
        cross = sum(sum(objects.values()) for objects in objects_of.values() if len(objects) > 1)
        missing = [c for c in CATEGORIES if c not in objects_of]
        print(
            f"Diversity-SFT targets: defect-fill {len(quadruplets)}, intra-object {intra} (have a same-object "
            f"partner), cross-object {cross} (category on another object)"
        )
        if missing:
            print(f"categories without samples ({len(missing)}): {', '.join(missing)}")
    if problems:
        print(f"{len(problems)} problems:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if not quadruplets:
        print("the index lists no quadruplets", file=sys.stderr)
        return 1
    return 0


def _templates(args: argparse.Namespace) -> int:
    from unidg.train.mask_library import build_template_library

    summary = build_template_library(
        args.udg, args.out, clusters=args.clusters, seed=args.seed, overwrite=args.overwrite, progress=not args.quiet
    )
    masks = sum(entry["masks"] for entry in summary.values())
    clusters = sum(entry["clusters"] for entry in summary.values())
    print(f"{args.out}: {masks} templates in {clusters} clusters over {len(summary)} categories")
    for category, entry in summary.items():
        print(f"  {category:<16} {entry['masks']:>6} masks  {entry['clusters']:>4} clusters")
    return 0


def _place(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from unidg.core.images import load_image
    from unidg.core.manifest import atomic_write_bytes
    from unidg.runtime.mask_templates import TemplateLibrary, place_template

    library = TemplateLibrary.load(args.templates)
    image = load_image(args.image, "--image")
    mask, template = place_template(library, args.category, image, np.random.default_rng(args.seed))
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"wrote {args.out}: template {template.id} (cluster {template.cluster}), {int(mask.sum())} pixels")
    return 0


def _references(args: argparse.Namespace) -> int:
    from unidg.runtime.reference_library import build_reference_library
    from unidg.runtime.synthesizer import DefectSynthesizer

    with DefectSynthesizer.from_bundle(args.bundle, backend=args.backend, **backend_options(args)) as synth:
        counts = build_reference_library(args.udg, synth, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"{args.out}: {sum(counts.values())} references over {len(counts)} categories")
    return 0


def _curate(args: argparse.Namespace) -> int:
    import json

    from unidg.train.curation import curate, load_curate_config

    overrides = list(args.overrides)
    for key, value in (("input", args.input), ("output", args.out), ("format", args.format)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    config = load_curate_config(args.config, overrides)
    counts = curate(config, progress=not args.quiet)
    print(f"{config.output}: " + ", ".join(f"{count} {what}" for what, count in sorted(counts.items())))
    print(f"every decision and its reason: {config.output}/curation.jsonl")
    return 1 if any(what.startswith("error") for what in counts) else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = command_group(subparsers, "data", "UDG datasets: procedural quadruplets, validation", metavar="ACTION")

    synth = add_command(
        commands,
        _synth,
        "synth",
        help="write procedural UDG quadruplets: textures + rule-based defects in shape-prior masks",
        description="Write COUNT normal/abnormal/mask/caption quadruplets (index.jsonl + PNGs + dataset.json) to "
        "OUT. Deterministic for (count, seed, size): sample i depends only on the seed, i and the size.",
    )
    add_out_option(synth, "UDG folder to create")
    synth.add_argument("--count", type=int, required=True, help="number of quadruplets")
    add_seed_option(synth, "seed (default 0); use another seed for held-out data")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels; some images are 4:5 or 5:4")
    synth.add_argument(
        "--non-square",
        type=float,
        default=0.2,
        metavar="FRACTION",
        help="share of 4:5 / 5:4 images, to exercise pad-to-square",
    )
    synth.add_argument("--overwrite", action="store_true", help="replace the quadruplets of an existing UDG folder")
    add_quiet_option(synth)

    check = add_command(
        commands,
        _validate,
        "validate",
        help="check a UDG folder; print counts per category and object; exit 1 listing every bad line",
    )
    check.add_argument("folder", help="UDG folder (index.jsonl + images)")
    check.add_argument(
        "--index-only", action="store_true", help="check index lines and captions only, not the image files"
    )

    templates = add_command(
        commands,
        _templates,
        "templates",
        help="mask-template library: the masks of a UDG folder clustered per category (paper App. A.1)",
    )
    templates.add_argument("--udg", required=True, help="UDG folder whose masks become templates")
    add_out_option(templates, "library folder to write")
    templates.add_argument(
        "--clusters", type=int, default=100, help="k-means clusters per category (fewer masks: fewer)"
    )
    add_seed_option(templates, "seed of the k-means++ initialisation")
    add_overwrite_option(templates)
    add_quiet_option(templates)

    place = add_command(
        commands,
        _place,
        "place",
        help="a target mask for an image: a template of a category placed inside its foreground",
    )
    place.add_argument("--templates", required=True, help="library folder (unidg data templates)")
    place.add_argument("--image", required=True, help="normal image to place the mask on")
    place.add_argument("--category", required=True, help="defect category of the template")
    add_out_option(place, "mask PNG to write (0/255, the image's size)")
    add_seed_option(place, "seed of the cluster, template and position choice")

    references = add_command(
        commands,
        _references,
        "references",
        help="zero-shot reference repository: a UDG folder's defects embedded by a bundle (App. B.4)",
    )
    references.add_argument("--udg", required=True, help="UDG folder whose abnormal images become references")
    add_bundle_option(references, help="bundle whose image encoder embeds the references")
    add_out_option(references, "repository folder to write")
    add_overwrite_option(references)
    add_quiet_option(references)
    add_backend_options(references)

    curate = add_command(
        commands,
        _curate,
        "curate",
        help="a factory's defect photos -> UDG quadruplets by the Inpainting, Captioner and Verifier agents (App. A.1)",
    )
    curate.add_argument("--config", required=True, help="curation config (.toml), e.g. configs/curate.toml")
    curate.add_argument("--in", dest="input", help="folder of abnormal images and masks (overrides 'input')")
    curate.add_argument("--out", help="UDG folder to write or resume (overrides 'output')")
    curate.add_argument("--format", choices=("folder", "mvtec", "visa"), help="layout of --in (overrides 'format')")
    curate.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    add_quiet_option(curate)
