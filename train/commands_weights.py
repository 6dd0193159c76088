"""``unidg weights import|lora|info`` (registered by unidg.cli): the weights folder every later stage reads, made from
downloaded FLUX.1-Fill-dev / FLUX.1-Redux-dev / SigLIP checkpoints and published LoRA files."""

from __future__ import annotations

import argparse
import json

from unidg.runtime.cli_options import (
    add_command,
    add_json_option,
    add_out_option,
    add_overwrite_option,
    add_quiet_option,
    command_group,
    option_values,
    write_json_option,
)

DTYPES = ("keep", "bfloat16", "float16", "float32")


def _megabytes(text: str) -> int:
    """A positive size in MiB (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def _format_count(value: int) -> str:
    return f"{value:,}"


def _print_components(components: dict, sources: dict | None = None) -> None:
    for name, entry in components.items():
        dtype = entry["dtype"] if isinstance(entry["dtype"], str) else "/".join(entry["dtype"])
        origin = f"  from {sources[name]['option']} {sources[name]['path']}" if sources and name in sources else ""
        files = f"{entry['files']} file{'s' if entry['files'] != 1 else ''}"
        print(f"  {name:<14} {_format_count(entry['parameters']):>15} parameters  {dtype:<8} {files}{origin}")


def _print_licenses(licenses: dict | None, folder: str) -> None:
    if not licenses:
        return
    for label, entry in licenses.items():
        named = entry.get("license_name") or entry.get("license")
        files = ", ".join(entry.get("files", []))
        if named or files:
            print(f"license (--{label}): {named or 'see file'}{f' ({files})' if files else ''}")
        else:
            print(f"license (--{label}): no license file beside {entry.get('root')}; the download's terms still apply")
    print(f"The weights in {folder} stay under their licenses; so do the bundles made from them.")


def _import(args: argparse.Namespace) -> int:
    # torch-heavy modules load when the command runs: `unidg --help` and the lean install stay light.
    import torch

    from unidg.train.weights_import import ImportSources, import_weights

    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    sources = ImportSources(
        **option_values(args, "fill", "redux", "transformer", "vae", "image_encoder", "image_embedder", "hf_cache")
    )
    report = import_weights(
        args.out,
        sources,
        preset=args.preset,
        dtype=dtype,
        shard_bytes=args.shard_mb << 20,
        overwrite=args.overwrite,
        hash_sources=not args.no_source_hashes,
        progress=not args.quiet,
    )
    total = _format_count(report["parameters"]["total"])
    print(
        f"weights folder: {report['folder']} (preset {report['preset']}, {total} parameters, {report['dtype']}, "
        f"{report['seconds']:.1f} s)"
    )
    _print_components(report["components"], report["sources"])
    _print_licenses(report["licenses"], report["folder"])
    return 0


def _lora(args: argparse.Namespace) -> int:
    from unidg.train.lora_files import merge_lora_file

    report = merge_lora_file(
        args.base,
        args.lora,
        args.out,
        overwrite=args.overwrite,
        shard_bytes=args.shard_mb << 20,
        progress=not args.quiet,
    )
    print(json.dumps(report, indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    from unidg.train.weights_files import describe_weights

    info = describe_weights(args.folder, verify=args.verify)
    if args.json == "-":
        print(json.dumps(info, indent=2))
        return 0
    write_json_option(args.json, json.dumps(info, indent=2), say=False)
    settings = info["settings"]
    preset = f", preset {info['preset']}" if info["preset"] else ""
    print(f"{info['folder']}: weights, stage {info['stage']}{preset}")
    print(f"fingerprint {info['fingerprint'][:16]}… ({'files checked' if info['verified'] else 'files not checked'})")
    print(
        "settings: "
        + ", ".join(f"{key} {settings[key]}" for key in ("resolution", "steps", "guidance", "alpha", "text_tokens"))
    )
    _print_components(info["components"])
    lora = info["lora"]
    if lora:
        print(
            f"LoRA merged: {lora.get('file') or lora.get('lora')} "
            + ", ".join(f"{key} {lora[key]}" for key in ("layout", "modules", "ranks", "lora_rank") if key in lora)
        )
    _print_licenses(info["licenses"], info["folder"])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = command_group(
        subparsers,
        "weights",
        "weights folders: import FLUX.1-Fill/Redux downloads, merge a LoRA file, describe",
        metavar="ACTION",
        description="The weights folder every later stage reads (docs/weights.md): made from downloaded checkpoints "
        "(import), with a published LoRA folded in (lora), described (info).",
    )

    imp = add_command(
        commands,
        _import,
        "import",
        help="FLUX.1-Fill-dev + FLUX.1-Redux-dev (+ SigLIP) downloads -> a UniDG weights folder",
        description="Checks every source against the preset (keys, shapes, dtypes) before writing, converts BFL "
        "single files with diffusers' converters, streams one block at a time and writes the folder whole or not at "
        "all. Sources mix freely; a component option wins over --fill / --redux. With only --hf-cache, the two "
        "FLUX repos are looked up in that cache.",
    )
    add_out_option(imp, "weights folder to write (e.g. weights/flux-fill-redux)")
    imp.add_argument(
        "--fill",
        metavar="SRC",
        help="FLUX.1-Fill-dev: a diffusers FluxFillPipeline folder (transformer/, vae/), BFL's flux1-fill-dev."
        "safetensors (ae.safetensors beside it), a Hugging Face cache folder (models--…) or a repo id in --hf-cache",
    )
    imp.add_argument(
        "--redux",
        metavar="SRC",
        help="FLUX.1-Redux-dev: a diffusers FluxPriorReduxPipeline folder (image_embedder/, image_encoder/), BFL's "
        "flux1-redux-dev.safetensors (then --image-encoder too), a cache folder or a repo id",
    )
    imp.add_argument(
        "--transformer", metavar="SRC", help="the FLUX.1-Fill transformer alone: component folder or BFL single file"
    )
    imp.add_argument("--vae", metavar="SRC", help="the FLUX VAE alone: component folder or BFL's ae.safetensors")
    imp.add_argument(
        "--image-encoder",
        metavar="SRC",
        help="SigLIP so400m: a folder with config.json (e.g. google/siglip-so400m-patch14-384)",
    )
    imp.add_argument(
        "--image-embedder", metavar="SRC", help="the Redux image embedder alone: component folder or BFL single file"
    )
    imp.add_argument("--hf-cache", metavar="DIR", help="Hugging Face hub cache to look repo ids up in (offline)")
    imp.add_argument("--preset", default="full", choices=("full", "nano"), help="the shapes the sources must have")
    imp.add_argument("--dtype", default="keep", choices=DTYPES, help="store the tensors in this dtype")
    imp.add_argument(
        "--shard-mb", metavar="MIB", type=_megabytes, default=2048, help="largest shard (MiB): bounds the memory"
    )
    imp.add_argument("--no-source-hashes", action="store_true", help="do not sha256 the source files (faster)")
    add_overwrite_option(imp)
    add_quiet_option(imp)

    lora = add_command(
        commands,
        _lora,
        "lora",
        help="fold a published LoRA file (diffusers/peft, kohya, BFL keys) into a weights folder",
        description="W + alpha/rank * B @ A in float64, as `unidg train merge` does, one transformer block at a time; "
        "the other components are copied. A LoRA for other shapes is refused naming the first key that does not fit.",
    )
    lora.add_argument("--base", required=True, help="weights folder (unidg weights import / train merge output)")
    lora.add_argument(
        "--lora",
        required=True,
        help="LoRA .safetensors file, or a folder with adapter_model.safetensors (peft) or lora.safetensors (unidg)",
    )
    add_out_option(lora, "merged weights folder to write")
    lora.add_argument(
        "--shard-mb", metavar="MIB", type=_megabytes, default=2048, help="largest safetensors shard written"
    )
    add_overwrite_option(lora)
    add_quiet_option(lora)

    info = add_command(
        commands,
        _info,
        "info",
        help="what a weights folder holds: components, dtypes, sources, license, LoRA",
        description="Reads the manifest and the safetensors headers (nothing is loaded): stage, preset, settings, per "
        "component the parameters, dtype and files, the sources an import recorded, a merged LoRA and the licenses.",
    )
    info.add_argument("folder", help="weights folder")
    info.add_argument("--verify", action="store_true", help="also check every file's sha256 against the manifest")
    add_json_option(info, "also write it as JSON to FILE ('-': standard output instead)", metavar="FILE")
