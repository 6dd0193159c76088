"""``unidg data synth|validate`` (registered by unidg.cli)."""

from __future__ import annotations

import argparse
import sys


def _synth(args: argparse.Namespace) -> int:
    import time

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


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="UDG datasets: procedural quadruplets, validation")
    commands = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    synth = commands.add_parser(
        "synth",
        help="write procedural UDG quadruplets: textures + rule-based defects in shape-prior masks",
        description="Write COUNT normal/abnormal/mask/caption quadruplets (index.jsonl + PNGs + dataset.json) to "
        "OUT. Deterministic for (count, seed, size): sample i depends only on the seed, i and the size.",
    )
    synth.add_argument("--out", required=True, help="UDG folder to create")
    synth.add_argument("--count", type=int, required=True, help="number of quadruplets")
    synth.add_argument("--seed", type=int, default=0, help="seed (default 0); use another seed for held-out data")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels; some images are 4:5 or 5:4")
    synth.add_argument(
        "--non-square",
        type=float,
        default=0.2,
        metavar="FRACTION",
        help="share of 4:5 / 5:4 images, to exercise pad-to-square",
    )
    synth.add_argument("--overwrite", action="store_true", help="replace the quadruplets of an existing UDG folder")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(handler=_synth)

    check = commands.add_parser(
        "validate",
        help="check a UDG folder; print counts per category and object; exit 1 listing every bad line",
    )
    check.add_argument("folder", help="UDG folder (index.jsonl + images)")
    check.add_argument(
        "--index-only", action="store_true", help="check index lines and captions only, not the image files"
    )
    check.set_defaults(handler=_validate)
