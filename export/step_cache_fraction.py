"""The step-caching estimate of ``unidg bench gpu --all``: the full-step fraction of a static schedule."""

from __future__ import annotations

import json
from pathlib import Path

from unidg.core.errors import OptionError


def read_full_step_fraction(cache_full_steps: int | None, cache_manifest: str | None, steps: int) -> tuple[float, str]:
    """The fraction of a sample's steps that run the transformer in full under a static step-caching schedule, and
    where it came from: ``--cache-full-steps N`` (N of ``steps``), or the gated static schedule of a bundle manifest
    (``unidg export cache-calibrate``: metadata.step_cache.gate.static.schedule, 1 for a full step)."""
    if cache_full_steps is not None:
        if not 1 <= cache_full_steps <= steps:
            raise OptionError(
                f"--cache-full-steps must be in 1..{steps} (the steps per sample), got {cache_full_steps}"
            )
        return cache_full_steps / steps, f"--cache-full-steps {cache_full_steps} of {steps}"
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
    count, total = sum(schedule), len(schedule)
    return count / total, f"bundle manifest {path}: {count} of {total} steps in full"
