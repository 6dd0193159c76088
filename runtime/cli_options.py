"""Command-line pieces every ``unidg`` command module shares: command groups, ``--bundle`` and the backend options.

Only argparse at import time, so building the whole CLI stays light (``unidg --help`` imports no numpy or torch).
"""

from __future__ import annotations

import argparse
import json
import weakref
from collections.abc import Callable

from unidg.core.errors import OptionError
from unidg.runtime.cpu_cores import available_cores

BACKEND_CHOICES = ("onnxruntime", "tensorrt", "torch")
CACHE_CHOICES = ("off", "static", "dynamic")  # unidg.runtime.step_cache.CACHE_MODES (argparse-only import here)
TORCH_SPEED_OPTIONS = ("compile", "fp8", "fused_attention")

# The group sub-commands (``unidg bench``, ``unidg export``, ``unidg eval``) created on each sub-command set, so several
# modules can add to one group in any registration order.
_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help unless the default is unset (None/False) or the help names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and "default" not in text
            and "%(default)" not in text
        ):
            text += " (default: %(default)s)"
        return text


class CommandSet(argparse._SubParsersAction):
    """Sub-commands whose one-line help is also their description, so ``unidg X --help`` always says what X does."""

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if kwargs.get("help") and not kwargs.get("description"):
            kwargs["description"] = kwargs["help"][0].upper() + kwargs["help"][1:] + "."
        return super().add_parser(name, **kwargs)


class ArgumentParser(argparse.ArgumentParser):
    """The parser class of every ``unidg`` command: defaults shown in help by ``HelpFormatter``, a description on
    every sub-command (``CommandSet``). The shared vocabulary is in docs/cli.md."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", CommandSet)


def command_group(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    *,
    metavar: str | None = None,
    description: str | None = None,
) -> argparse._SubParsersAction:
    """The sub-commands of group ``name`` (e.g. ``unidg bench``): created on first use, shared afterwards. The group
    alone prints its help; ``metavar`` names its sub-commands in that help (default: NAME)."""
    groups = _GROUPS.setdefault(subparsers, {})
    if name not in groups:
        parser = subparsers.add_parser(name, help=help, description=description)
        parser.set_defaults(handler=lambda args: parser.print_help() or 2)
        groups[name] = parser.add_subparsers(dest=f"{name}_command", metavar=metavar or name.upper())
    return groups[name]


def add_command(
    commands: argparse._SubParsersAction, handler: Callable[[argparse.Namespace], int], name: str, **kwargs
) -> argparse.ArgumentParser:
    """Sub-command ``name`` of ``commands``, run by ``handler(args)``; ``kwargs`` (help, description) go to
    ``add_parser``."""
    parser = commands.add_parser(name, **kwargs)
    parser.set_defaults(handler=handler)
    return parser


def add_bundle_option(parser: argparse.ArgumentParser, *, required: bool = True, help: str | None = None) -> None:
    """``--bundle``: a bundle folder written by ``unidg export onnx``."""
    parser.add_argument(
        "--bundle", required=required, default=None, help=help or "bundle folder written by `unidg export onnx`"
    )


def add_config_options(parser: argparse.ArgumentParser, *, config: str, example: str, out: str) -> None:
    """``--config FILE``, the repeatable ``--set SECTION.KEY=VALUE`` overrides and ``--out`` (the config's
    'output'); ``config`` describes the file, ``example`` is one override, ``out`` describes the output folder."""
    parser.add_argument("--config", required=True, help=config)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override one config value (TOML syntax), e.g. --set {example}; repeatable",
    )
    parser.add_argument("--out", help=f"{out} (overrides the config's 'output')")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides of ``add_config_options``, ``--out`` last as the config's 'output'."""
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"output={json.dumps(args.out)}")
    return overrides


def add_out_option(parser: argparse.ArgumentParser, help: str, *, default: str | None = None) -> None:
    """``--out``: what the command writes (docs/cli.md); required unless it has a ``default``."""
    parser.add_argument("--out", required=default is None, default=default, help=help)


def add_weights_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--weights``: a weights folder (``unidg train merge``, ``unidg weights import``); ``help`` says which."""
    parser.add_argument("--weights", required=True, help=help)


def add_data_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--data``: a UDG folder (``unidg data synth``); ``help`` says which."""
    parser.add_argument("--data", required=True, help=help)


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace an existing ``--out`` (docs/cli.md)."""
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def add_quiet_option(parser: argparse.ArgumentParser, *, help: str = "no progress bar") -> None:
    """``--quiet``: a switch that turns the progress bar off."""
    parser.add_argument("--quiet", action="store_true", help=help)


def add_seed_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--seed N`` (default 0, the one seed default of docs/cli.md); ``help`` says what it seeds."""
    parser.add_argument("--seed", type=int, default=0, help=help)


def add_json_option(parser: argparse.ArgumentParser, help: str, **kwargs) -> None:
    """``--json FILE``: also write the figures or report as JSON to FILE."""
    parser.add_argument("--json", help=help, **kwargs)


def write_json_option(path: str | None, text: str, *, say: bool = True) -> None:
    """``--json FILE``: write ``text`` (a JSON document) to FILE whole or not at all, and with ``say`` print where;
    nothing without the option."""
    if not path:
        return
    from unidg.core.manifest import atomic_write_text

    atomic_write_text(path, text + "\n")
    if say:
        print(f"wrote {path}")


def option_values(args: argparse.Namespace, *names: str) -> dict:
    """The parsed options ``names`` by name, for a function whose keywords are the options' dests."""
    return {name: getattr(args, name) for name in names}


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and its options, the same for generate, batch, demo and serve."""
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="onnxruntime", help="runtime backend")
    parser.add_argument(
        "--device",
        default=None,
        help="where the model runs. onnxruntime: execution providers cpu (default), cuda, tensorrt, or several "
        "comma-separated in order of preference (cuda and tensorrt need onnxruntime-gpu); tensorrt: CUDA device "
        "index (default 0); torch: cpu (default), cuda or cuda:N",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime CPU threads (default: the cores this process may use: affinity and cgroup CPU quota)",
    )
    parser.add_argument(
        "--spin",
        action="store_true",
        help="onnxruntime: idle threads busy-wait for work (faster on a dedicated machine; off, the default, on cores "
        "shared with other programs)",
    )
    parser.add_argument(
        "--cuda-graph", action="store_true", help="tensorrt, torch: capture the denoising loop as one CUDA graph"
    )
    parser.add_argument("--compile", action="store_true", help="torch: torch.compile the step program")
    parser.add_argument(
        "--fp8", action="store_true", help="torch: FP8 (E4M3) matmuls in the step program (torch._scaled_mm on CUDA)"
    )
    parser.add_argument(
        "--fused-attention",
        action="store_true",
        help="torch: the Triton biased-attention kernel instead of SDPA with a float mask (CPU: TRITON_INTERPRET=1)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip re-hashing the bundle's files (manifest shapes and settings are still checked)",
    )
    parser.add_argument(
        "--cache",
        choices=CACHE_CHOICES,
        default=None,
        help="step caching (docs/step-cache.md): off, static (the bundle's calibrated schedule) or dynamic "
        "(first-block residual change >= --cache-threshold computes a full step). Default: the setting the bundle's "
        "accuracy gate recorded (`unidg export cache-calibrate`), off without one",
    )
    parser.add_argument(
        "--cache-threshold",
        type=float,
        default=None,
        help="dynamic step caching: relative L1 change of the first-block residual that forces a full step "
        "(> 0, e.g. 0.08; default: the bundle's calibrated threshold); implies --cache dynamic",
    )


def backend_options(args: argparse.Namespace, *, workers: int = 1) -> dict:
    """The backend keyword options the command line selects (each backend takes its own), plus the step-cache
    options (``cache``, ``cache_threshold``) that ``DefectSynthesizer.from_bundle`` takes.

    With ``workers`` > 1 (the service's synthesis threads) onnxruntime on the CPU defaults to cores / workers threads
    each (the cores this process may use), so the workers share the cores instead of each starting one thread per
    core.
    """
    device = args.device
    if args.threads is not None and args.threads < 1:
        raise OptionError(f"--threads {args.threads}: give a thread count >= 1, or leave it out to use all cores")
    if args.threads and args.backend != "onnxruntime":
        raise OptionError(f"--threads sets onnxruntime's CPU threads; it does not apply to --backend {args.backend}")
    if args.spin and args.backend != "onnxruntime":
        raise OptionError(f"--spin sets onnxruntime's thread pools; it does not apply to --backend {args.backend}")
    if args.cuda_graph and args.backend not in ("tensorrt", "torch"):
        raise OptionError(f"--cuda-graph is a tensorrt and torch option; it does not apply to --backend {args.backend}")
    torch_only = [flag for flag in TORCH_SPEED_OPTIONS if getattr(args, flag, False)]
    if torch_only and args.backend != "torch":
        flags = ", ".join("--" + flag.replace("_", "-") for flag in torch_only)
        raise OptionError(f"{flags}: torch backend options; add --backend torch or leave them out")
    # numpy and the bundle reader load when a command runs: building the parser (`unidg --help`) stays light.
    from unidg.runtime.backends.base import device_options
    from unidg.runtime.step_cache import cache_options

    options = cache_options(getattr(args, "cache", None), getattr(args, "cache_threshold", None))
    options |= device_options(args.backend, device)
    if args.backend == "onnxruntime":
        options["spin"] = bool(args.spin)
        if args.threads:
            options["threads"] = args.threads
        elif workers > 1 and options["providers"] == ["cpu"]:
            options["threads"] = max(1, available_cores() // workers)
        return options
    options["cuda_graph"] = bool(args.cuda_graph)
    if args.backend == "torch":
        options |= {flag: bool(getattr(args, flag, False)) for flag in TORCH_SPEED_OPTIONS}
    return options
