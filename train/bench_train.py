"""``unidg bench train``: the Diversity-SFT training step on a GPU, in two rows.

- **Full-width slice**: the full preset's transformer cut to one double and one single block (width 3072, 24 heads),
  with ``configs/full-sft.toml``'s LoRA (r = 256 on attention and MLP projections), optimizer (Prodigy), loss (Eq. 9
  on) and precision (frozen weights bf16, LoRA and optimizer state fp32, bf16 autocast, gradient checkpointing), at
  the token count of a 768 x 1536 diptych (4608 image tokens + the folded context: 5338), micro-batch 1: median
  time of one optimizer step and peak GPU memory. A full 57-block step costs roughly 57/2 times the blocks' share of
  it (not measured: the whole model needs the paper's 8 GPUs with ZeRO-2).
- **Nano SFT**: the step of ``configs/nano-sft.toml`` (nano preset, S = 128, batch 16, LoRA r = 32, Prodigy, fp32)
  on the GPU and on the CPU: steps per second of each and their ratio.

Inputs are random tensors of the cached-batch shapes (latents, masked-image latents + mask channels, Redux tokens,
key bias, Eq. 9 counterparts): step time does not depend on their values, and no weight file or dataset is read.
``--dry-run`` runs both rows on the CPU at the nano width (a check of the harness, not figures).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from unidg.core.attention_bias import build_key_bias
from unidg.core.errors import OptionError
from unidg.core.manifest import atomic_write_text
from unidg.core.markdown import table_head
from unidg.train.config import load_sft_config, settings_of
from unidg.train.flow import FlowObjective, StepInputs, combine_terms, draw_noise_and_t, token_weights
from unidg.train.lora import add_lora
from unidg.train.model import UniDGModel, image_ids
from unidg.train.presets import get_preset
from unidg.train.trainer import DeviceError, build_optimizer, place_model, resolve_device

# The recipes it times: the source checkout's configs/ (an installed wheel ships none: pass --configs).
SOURCE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = ("full-sft.toml", "nano-sft.toml")


def recipe_folder(folder: str | Path | None = None) -> Path:
    """The folder holding the two SFT recipes: ``folder``, else the source checkout's configs/, else ./configs."""
    candidates = [Path(folder)] if folder else [SOURCE_CONFIGS, Path("configs")]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in RECIPES):
            return candidate
    where = "--configs " + str(folder) if folder else f"{SOURCE_CONFIGS} and ./configs"
    raise OptionError(
        f"`unidg bench train` times the recipes {' and '.join(RECIPES)}; {where} hold(s) no such pair: pass "
        "--configs DIR, the configs/ folder of a unidg source checkout"
    )


DRY_RUN_FULL = ["settings.resolution=64", "lora.rank=4", "lora.alpha=4.0"]
DRY_RUN_NANO = ["settings.resolution=64", "train.batch_size=2"]
DRY_RUN_NOTE = "CPU dry run at the nano width: a check of the harness, not figures"


@dataclass
class TrainRow:
    name: str
    device: str
    tokens: int
    batch: int
    median_ms: float
    steps_per_second: float
    peak_memory_gib: float | None
    trainable_parameters: int
    frozen_parameters: int
    note: str = ""


@dataclass
class TrainBenchResult:
    device_name: str
    date: str
    dry_run: bool
    steps: int
    versions: dict
    rows: list[TrainRow] = field(default_factory=list)
    note: str = ""
    command: str = ""


def slice_preset(blocks: tuple[int, int] = (1, 1), width_of: str = "full"):
    """``width_of``'s preset with its transformer cut to (double, single) blocks."""
    preset = get_preset(width_of)
    transformer = replace(preset.transformer, num_layers=blocks[0], num_single_layers=blocks[1])
    return replace(preset, name=f"{preset.name}-slice-{blocks[0]}+{blocks[1]}", transformer=transformer)


def time_sft_step(config, label: str, preset, device: str, steps: int, warmup: int, seed: int = 0) -> TrainRow:
    """Median time of one SFT optimizer step (forward, backward, clip, optimizer) of an SFT ``config``'s recipe on
    ``preset`` with random inputs of the cached-batch shapes; micro-batch ``train.micro_batch`` (or the batch)."""
    preset = get_preset(preset)
    target = resolve_device(device)
    precision = config.train.precision if target.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    settings = replace(settings_of(config), fold_text_tokens=True)
    model = UniDGModel.from_preset(preset, device=target, dtype=dtype, seed=seed)
    model.settings = settings
    model.requires_grad_(False)
    add_lora(model.transformer, config.lora, seed=seed)
    if config.train.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    place_model(model, target, precision)
    model.transformer.train()
    trainable = [p for p in model.transformer.parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    optimizer = build_optimizer(trainable, config.optim)

    batch = config.train.micro_batch or config.train.batch_size
    image_tokens = settings.layout.image_tokens
    generator = torch.Generator().manual_seed(seed)
    defect = torch.rand(batch, image_tokens, generator=generator) < 0.1
    target_tokens = torch.rand(batch, image_tokens, generator=generator) < 0.2
    key_bias = build_key_bias(
        defect.numpy(), model.reference_tokens, settings.text_tokens, settings.alpha, settings.fold_text_tokens
    )
    inputs = StepInputs(
        x0=torch.randn(batch, image_tokens, 64, generator=generator),
        cond=torch.randn(batch, image_tokens, 320, generator=generator),
        reference=None,
        key_bias=torch.from_numpy(key_bias),
        defect_tokens=defect,
        target_tokens=target_tokens,
        normal=torch.randn(batch, image_tokens, 64, generator=generator),
        reference_tokens=torch.randn(batch, model.reference_tokens, model.joint_dim, generator=generator),
    ).to(target)
    objective = FlowObjective(model, config.loss, settings.guidance, image_ids(*settings.layout.token_hw), precision)
    objective = objective.to(target)
    weight_total = float(token_weights(inputs.target_tokens, config.loss.mask_weight).sum())
    cuda = target.type == "cuda"

    def step(index: int) -> None:
        noise, t = draw_noise_and_t(torch.Generator().manual_seed(seed + index), tuple(inputs.x0.shape), config.loss)
        terms = objective(inputs, noise.to(target), t.to(target))
        loss = combine_terms(terms.velocity, terms.hinge, weight_total, batch, config.loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for index in range(warmup):
        step(index)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(warmup, warmup + steps):
        started = time.perf_counter()
        step(index)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    median = statistics.median(times)
    context = model.reference_tokens + model.text_token_count(True)
    return TrainRow(
        name=preset.name,
        device=str(target),
        tokens=image_tokens + context,
        batch=batch,
        median_ms=median,
        steps_per_second=1e3 / median,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        trainable_parameters=sum(p.numel() for p in trainable),
        frozen_parameters=frozen,
        note=f"{label}: LoRA r={config.lora.rank}, {config.optim.name}, {precision}"
        + (", gradient checkpointing" if config.train.gradient_checkpointing else ""),
    )


def run_train_bench(
    dry_run: bool = False, steps: int = 5, warmup: int = 2, configs: str | Path | None = None
) -> TrainBenchResult:
    """Both rows (module docstring); the dry run uses the nano width for the slice and the CPU for everything."""
    recipes = recipe_folder(configs)  # refused before anything is timed
    cuda = not dry_run
    if cuda and not torch.cuda.is_available():
        raise DeviceError(
            f"`unidg bench train` needs a CUDA GPU: torch {torch.__version__} sees none; run it on a GPU machine, or "
            "add --dry-run to check the harness on the CPU"
        )
    if steps < 1 or warmup < 0:
        raise OptionError(f"--steps {steps} --warmup {warmup}: give --steps >= 1 and --warmup >= 0")
    result = TrainBenchResult(
        device_name=torch.cuda.get_device_name() if cuda else "cpu",
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        dry_run=dry_run,
        steps=steps,
        versions={"torch": torch.__version__, "python": sys.version.split()[0]},
        note=DRY_RUN_NOTE if dry_run else "",
    )

    device = "cuda" if cuda else "cpu"
    # The dry run keeps every option of the recipes and shrinks what sets the size.
    full = load_sft_config(recipes / "full-sft.toml", DRY_RUN_FULL if dry_run else [])
    slice_ = slice_preset(width_of="nano" if dry_run else "full")
    result.rows.append(time_sft_step(full, "full-sft.toml", slice_, device, steps, warmup))
    nano = load_sft_config(recipes / "nano-sft.toml", DRY_RUN_NANO if dry_run else [])
    for where in (device, "cpu") if cuda else ("cpu",):
        result.rows.append(time_sft_step(nano, "nano-sft.toml", "nano", where, steps, warmup))
    return result


def format_markdown(result: TrainBenchResult) -> str:
    lines = [
        f"### {result.device_name}, {result.date}" + (" (dry run)" if result.dry_run else ""),
        "",
        f"Command: `{result.command or 'unidg bench train'}`. Median of {result.steps} optimizer steps after warm-up. "
        + ", ".join(f"{k} {v}" for k, v in result.versions.items())
        + ".",
    ]
    if result.note:
        lines += ["", result.note]
    lines += [
        "",
        *table_head(
            "model",
            "device",
            "tokens",
            "batch",
            "median ms per step",
            "steps/s",
            "peak GiB",
            "trainable",
            "frozen",
            "recipe",
        ),
    ]
    for row in result.rows:
        peak = "—" if row.peak_memory_gib is None else f"{row.peak_memory_gib:.1f}"
        lines.append(
            f"| {row.name} | {row.device} | {row.tokens} | {row.batch} | {row.median_ms:.1f} | "
            f"{row.steps_per_second:.2f} | {peak} | {row.trainable_parameters / 1e6:.2f} M | "
            f"{row.frozen_parameters / 1e6:.1f} M | {row.note} |"
        )
    nano = [row for row in result.rows if row.name == "nano"]
    if len(nano) == 2:
        lines += ["", f"Nano SFT step, GPU vs CPU: {nano[0].steps_per_second / nano[1].steps_per_second:.1f}x."]
    return "\n".join(lines) + "\n"


def write_report(result: TrainBenchResult, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench_train.json", out / "bench_train.md"
    atomic_write_text(json_path, json.dumps(asdict(result), indent=2) + "\n")
    atomic_write_text(md_path, format_markdown(result))
    return json_path, md_path


def bench_train(args) -> int:
    result = run_train_bench(dry_run=args.dry_run, steps=args.steps, warmup=args.warmup, configs=args.configs)
    result.command = "unidg " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "unidg bench train"
    paths = write_report(result, Path(args.out))
    print(format_markdown(result))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0
