"""Step caching: which denoising steps evaluate the whole transformer, and which reuse the last full step's work.

One definition for every sampler (the runtime's, over a bundle's graphs, and the torch reference in
``unidg.train.sampler``). The transformer is cut after its first block (First-Block Cache):

- every step runs the *head* (embedders + first block); its output minus its input, the *first-block residual*, is
  the signal that says how much this step differs from the last fully computed one;
- a *full* step runs the *tail* (all other blocks) and keeps what the tail added to the image stream, the tail
  residual;
- a *cached* step adds the kept tail residual to the head's output instead, then both take the output norm,
  projection and Euler update.

Modes:
- ``off``: the plain step graph, bit for bit the uncached sampler.
- ``static``: a schedule of which steps are full (step 0 always), calibrated offline and recorded in the bundle
  manifest; no per-step decision, so captured CUDA graphs and TensorRT engines stay static.
- ``dynamic``: a step is full when the relative L1 change of its first-block residual against the last full step's,
  ``mean|r - r_full| / mean|r_full|``, reaches the threshold. A batch decides together (its largest change), so a
  dynamic result can depend on what it is batched with; static results depend only on the seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from unidg.core.errors import UniDGError
from unidg.runtime.bundle import Bundle

CACHE_MODES = ("off", "static", "dynamic")
SIGNAL = "first_block_residual"


class StepCacheError(UniDGError):
    """A step-cache setting or a bundle's cache data is unusable; the message names it and the fix."""


def check_threshold(threshold: object, what: str = "--cache-threshold") -> float:
    """A dynamic threshold: a finite number > 0 (a relative L1 change, e.g. 0.08)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.floating | np.integer):
        raise StepCacheError(f"{what} {threshold!r} is not a number; give a relative change > 0, e.g. 0.08")
    value = float(threshold)
    if not math.isfinite(value) or value <= 0:
        raise StepCacheError(
            f"{what} {threshold!r} must be a finite number > 0 (the relative L1 change of the first-block "
            "residual that forces a full step), e.g. 0.08"
        )
    return value


def check_schedule(schedule: Sequence[object], steps: int, what: str = "step-cache schedule") -> tuple[bool, ...]:
    """A static schedule: one 0/1 (cached/full) per step, ``steps`` of them, the first full."""
    if isinstance(schedule, str | bytes) or not isinstance(schedule, Sequence):
        raise StepCacheError(f"{what} {schedule!r} is not a list of 0/1 per step")
    if any(isinstance(v, bool) or v not in (0, 1) for v in schedule):
        raise StepCacheError(f"{what} has entries other than 0 (cached) and 1 (full): {list(schedule)}")
    if len(schedule) != steps:
        raise StepCacheError(
            f"{what} has {len(schedule)} entries for {steps} steps; calibrate a schedule for {steps} steps "
            "(`unidg export cache-calibrate`) or run with --cache dynamic / off"
        )
    if schedule[0] != 1:
        raise StepCacheError(f"{what} skips the first step; step 0 has nothing cached to reuse and must be full")
    return tuple(bool(v) for v in schedule)


@dataclass(frozen=True)
class StepCache:
    """A checked cache setting for one run: ``mode`` plus the threshold (dynamic) or the schedule (static)."""

    mode: str = "off"
    threshold: float | None = None
    schedule: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise StepCacheError(f"--cache {self.mode!r}: choose one of {list(CACHE_MODES)}")
        if self.mode == "dynamic":
            object.__setattr__(self, "threshold", check_threshold(self.threshold))
        if self.mode == "static":
            if self.schedule is None:
                raise StepCacheError("--cache static needs a schedule (recorded by `unidg export cache-calibrate`)")
            schedule = [int(v) if isinstance(v, bool) else v for v in self.schedule]  # checked ones are bools
            object.__setattr__(self, "schedule", check_schedule(schedule, len(schedule)))

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def check_steps(self, steps: int) -> None:
        """A static schedule covers exactly its step count; refuse another."""
        if self.mode == "static":
            check_schedule([int(v) for v in self.schedule or ()], steps)

    def describe(self) -> dict:
        if self.mode == "dynamic":
            return {"mode": self.mode, "signal": SIGNAL, "threshold": self.threshold}
        if self.mode == "static":
            return {"mode": self.mode, "schedule": [int(v) for v in self.schedule or ()]}
        return {"mode": self.mode}


OFF = StepCache()


def cache_setting(text: str, steps: int, option: str = "--cache") -> StepCache:
    """``off``, ``dynamic:0.08`` or ``static:1101...`` -> a checked StepCache for a run of ``steps`` steps."""
    return OFF if text == "off" else parse_setting(text, steps, option)


def schedule_name(schedule: Sequence[int]) -> str:
    return "static:" + "".join(str(int(v)) for v in schedule)


def parse_setting(text: str, steps: int, option: str = "--setting") -> StepCache:
    """``dynamic:0.08`` or ``static:1101...`` (one 0/1 per step) -> a checked StepCache; ``option`` names the flag."""
    mode, _, value = text.partition(":")
    if mode == "dynamic":
        try:
            threshold = float(value)
        except ValueError:
            raise StepCacheError(f"{option} {text!r}: dynamic takes a threshold, e.g. dynamic:0.08") from None
        return StepCache("dynamic", threshold=check_threshold(threshold, f"{option} {text!r}"))
    if mode == "static":
        if not value or set(value) - {"0", "1"}:
            raise StepCacheError(f"{option} {text!r}: static takes one 0/1 per step, e.g. static:1101...")
        return StepCache("static", schedule=check_schedule([int(c) for c in value], steps, f"{option} {text!r}"))
    raise StepCacheError(f"{option} {text!r}: write dynamic:THRESHOLD or static:SCHEDULE")


def relative_l1(current: np.ndarray, reference: np.ndarray) -> float:
    """The largest over the batch of ``mean|current - reference| / mean|reference|`` (float64 sums)."""
    current = np.asarray(current, dtype=np.float64).reshape(current.shape[0], -1)
    reference = np.asarray(reference, dtype=np.float64).reshape(reference.shape[0], -1)
    scale = np.abs(reference).mean(axis=1)
    change = np.abs(current - reference).mean(axis=1)
    return float(np.max(change / np.maximum(scale, 1e-12)))


@dataclass
class CacheDecider:
    """The per-run state of the decision: call ``full_step(i, signal)`` once per step, in order."""

    cache: StepCache
    steps: int
    reference_signal: np.ndarray | None = None
    decisions: list[bool] = field(default_factory=list)
    changes: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cache.check_steps(self.steps)

    def full_step(self, step: int, signal: np.ndarray | None) -> bool:
        """Whether step ``step`` runs the tail; ``signal`` is its first-block residual (dynamic needs it)."""
        if step != len(self.decisions):
            raise ValueError(f"steps decided out of order: step {step} after {len(self.decisions)} decisions")
        change = None
        if self.cache.mode == "static":
            full = bool(self.cache.schedule[step])  # type: ignore[index]
        elif self.cache.mode == "dynamic":
            if self.reference_signal is None:
                full = True
            else:
                change = relative_l1(signal, self.reference_signal)
                full = change >= float(self.cache.threshold)  # type: ignore[arg-type]
        else:
            full = True
        if full and self.cache.mode == "dynamic":
            self.reference_signal = np.array(signal, copy=True)
        self.decisions.append(full)
        self.changes.append(change)
        return full

    @property
    def full_steps(self) -> int:
        return sum(self.decisions)

    def report(self) -> dict:
        """What the run did: full (transformer) evaluations, cached steps, and the schedule that resulted."""
        return {
            **self.cache.describe(),
            "steps": len(self.decisions),
            "full_steps": self.full_steps,
            "cached_steps": len(self.decisions) - self.full_steps,
            "ran": [int(d) for d in self.decisions],
        }


def bundle_step_cache(bundle: Bundle, mode: str | None = None, threshold: float | None = None) -> StepCache:
    """The cache setting a run of ``bundle`` uses: ``mode`` None takes the bundle's gated default (off when no setting
    passed ``unidg export cache-calibrate``); ``threshold`` overrides the recorded one for ``dynamic``."""
    if mode is not None and mode not in CACHE_MODES:
        raise StepCacheError(f"--cache {mode!r}: choose one of {list(CACHE_MODES)}")
    if threshold is not None:
        threshold = check_threshold(threshold)
    gate = bundle.step_cache.get("gate") or {}
    if mode is None:
        mode = str(gate.get("default", "off")) if threshold is None else "dynamic"
    if mode == "off":
        if threshold is not None:
            raise StepCacheError("--cache-threshold applies to --cache dynamic; drop it or pass --cache dynamic")
        return OFF
    if not bundle.cache_graphs:
        raise StepCacheError(
            f"bundle {bundle.path} has no step-cache data (format_version {bundle.metadata.get('format_version')}, "
            "no step_cache graphs): add them with `unidg export cache-graphs` and calibrate with "
            "`unidg export cache-calibrate`, or run with --cache off"
        )
    if mode == "static":
        if threshold is not None:
            raise StepCacheError("--cache-threshold applies to --cache dynamic, not to the static schedule")
        schedule = (gate.get("static") or {}).get("schedule")
        if schedule is None:
            raise StepCacheError(
                f"bundle {bundle.path} has no calibrated static schedule; run `unidg export cache-calibrate` "
                "(or use --cache dynamic with --cache-threshold)"
            )
        return StepCache("static", schedule=check_schedule(schedule, len(schedule), "the bundle's schedule"))
    if threshold is None:
        threshold = (gate.get("dynamic") or {}).get("threshold")
        if threshold is None:
            raise StepCacheError(
                f"bundle {bundle.path} has no calibrated dynamic threshold; pass --cache-threshold (e.g. 0.08) or "
                "run `unidg export cache-calibrate`"
            )
        threshold = check_threshold(threshold, "the bundle's step-cache threshold")
    return StepCache("dynamic", threshold=threshold)


def cache_options(mode: str | None, threshold: float | None) -> dict:
    """``DefectSynthesizer.from_bundle``'s step-cache keywords from a command line or request, checked at the door."""
    if mode is not None and mode not in CACHE_MODES:
        raise StepCacheError(f"--cache {mode!r}: choose one of {list(CACHE_MODES)}")
    if threshold is not None:
        threshold = check_threshold(threshold)
        if mode not in (None, "dynamic"):
            raise StepCacheError(f"--cache-threshold applies to --cache dynamic, not to --cache {mode}")
    options: dict = {}
    if mode is not None:
        options["cache"] = mode
    if threshold is not None:
        options["cache_threshold"] = threshold
    return options
