"""The static step-caching schedule ``unidg bench gpu --all`` measures: from ``--cache-full-steps`` or a bundle."""

from __future__ import annotations

import json
from pathlib import Path

from unidg.core.errors import OptionError


def spread_schedule(full_steps: int, steps: int) -> tuple[bool, ...]:
    """``full_steps`` of ``steps`` in full, spread evenly from step 0 (floor(i * steps / full_steps))."""
    chosen = {i * steps // full_steps for i in range(full_steps)}
    return tuple(step in chosen for step in range(steps))


def read_static_schedule(
    cache_full_steps: int | None, cache_manifest: str | None, steps: int
) -> tuple[tuple[bool, ...], str]:
    """A static step-caching schedule of ``steps`` steps (True: the transformer runs in full) and where it came
    from: ``--cache-full-steps N`` (N of ``steps`` spread evenly from step 0), or the gated static schedule of a bundle
    manifest (``unidg export cache-calibrate``: metadata.step_cache.gate.static.schedule, 1 for a full step)."""
    if cache_full_steps is not None:
        if not 1 <= cache_full_steps <= steps:
            raise OptionError(
                f"--cache-full-steps must be in 1..{steps} (the steps per sample), got {cache_full_steps}"
            )
        return spread_schedule(cache_full_steps, steps), f"--cache-full-steps {cache_full_steps} of {steps}"
    if cache_manifest is None:
        raise OptionError("no step-caching schedule given: pass --cache-full-steps N or --cache-manifest BUNDLE")
    path = Path(cache_manifest)
    path = path / "manifest.json" if path.is_dir() else path
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise OptionError(f"--cache-manifest {path}: cannot read it as JSON ({error})") from error
    entry = (manifest.get("metadata") or {}).get("step_cache") or {}
    schedule = ((entry.get("gate") or {}).get("static") or {}).get("schedule")
    if not isinstance(schedule, list) or not schedule or not all(flag in (0, 1) for flag in schedule):
        raise OptionError(
            f"--cache-manifest {path}: no gated static schedule (step_cache.gate.static.schedule); run "
            "`unidg export cache-calibrate` on the bundle, or pass --cache-full-steps N"
        )
    if len(schedule) != steps:
        raise OptionError(
            f"--cache-manifest {path}: its schedule has {len(schedule)} steps, the bench runs {steps}; pass --steps "
            f"{len(schedule)}, or --cache-full-steps N"
        )
    return tuple(bool(flag) for flag in schedule), f"bundle manifest {path}: {sum(schedule)} of {steps} steps in full"
