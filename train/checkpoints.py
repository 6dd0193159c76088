"""What a training run leaves in its folder and reads back on resume: ``log.jsonl`` and ``checkpoints/step-NNNNNN``.

A checkpoint holds the trainable weights, the optimizer state (safetensors tensors + JSON scalars, no pickle), any
further tensor files of the recipe (RFT's EMA weights) and the step; it is written to a temporary folder and renamed,
and only the newest ``keep`` stay. Every trainer (``unidg train base``, ``sft``, ``rft``) writes and resumes through
``CheckpointFolder``; a step that made a loss or a weight non-finite stops the run before anything of it is saved.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TextIO

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unidg.core.errors import UniDGError
from unidg.core.manifest import atomic_write_text
from unidg.core.staging import give_usual_mode
from unidg.train.config import ConfigError

CHECKPOINTS = "checkpoints"
LOG_FILE = "log.jsonl"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
STATE_FILE = "state.json"


# ============================================================================ non-finite steps
class TrainingDivergedError(UniDGError):
    """A training step produced a non-finite loss or weight; the run stops and its last checkpoint stays finite."""


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None."""
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_step_finite(
    step: int, losses: dict[str, float], tensors: dict[str, torch.Tensor], checkpoint: Path | None, advice: str
) -> None:
    """Stop a run whose step ``step`` made a loss or a trainable weight non-finite, before anything of it is saved."""
    bad_loss = next((f"{key} became {value}" for key, value in losses.items() if not math.isfinite(value)), None)
    bad_weight = first_non_finite(tensors)
    if bad_loss is None and bad_weight is None:
        return
    kept = f"the last finite checkpoint {checkpoint} is kept" if checkpoint else "no checkpoint was saved yet"
    raise TrainingDivergedError(
        f"training diverged at step {step}: {bad_loss or f'weight {bad_weight} became non-finite'}; nothing of "
        f"this step was saved and {kept}; {advice}"
    )


# ============================================================================ the log
def append_record(log: TextIO | None, records: list[dict], record: dict) -> None:
    """Keep one step's ``record`` and, on the process that writes the log (``log`` open), append it to the log as
    one JSON line, flushed so that a run killed afterwards keeps it."""
    if log is not None:
        log.write(json.dumps(record) + "\n")
        log.flush()
    records.append(record)


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def trim_log(run_dir: str | Path, upto: int) -> None:
    """Drop the log records past step ``upto`` (the checkpoint a run resumes from)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= upto]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# ============================================================================ optimizer state without pickle
def optimizer_state_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able scalars, without pickle."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for param_id, entries in state["state"].items():
        kept = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                kept[name] = value
        scalars[str(param_id)] = kept
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} for group in state["param_groups"]
    ]
    return tensors, {"state": scalars, "param_groups": groups, "class": type(optimizer).__name__}


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], document: dict) -> dict:
    state: dict[int, dict] = {int(k): dict(v) for k, v in document["state"].items()}
    for key, tensor in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = tensor
    groups = []
    for group in document["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ============================================================================ checkpoints
class CheckpointFolder:
    """``RUN/checkpoints/step-NNNNNN``: written by rank 0 (temporary folder, then rename), the newest ``keep``
    kept; read back only into a run with the same seed, fingerprint and trainable weights."""

    def __init__(self, run_dir: str | Path, keep: int) -> None:
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def latest(self) -> Path | None:
        found = sorted(self.root.glob("step-*"))
        return found[-1] if found else None

    def write(
        self,
        step: int,
        trainable: dict[str, nn.Parameter],
        optimizer: torch.optim.Optimizer,
        state: dict,
        extra: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> Path:
        """The checkpoint of ``step``: trainable weights, optimizer state, ``state`` (state.json; it holds the step,
        seed and fingerprint) and ``extra`` (file name -> tensors)."""
        final = self.path(step)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: p.detach().cpu().contiguous() for k, p in trainable.items()}, str(tmp / TRAINABLE_FILE))
        for name, tensors in (extra or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name))
        tensors, document = optimizer_state_to_files(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
        (tmp / OPTIMIZER_JSON).write_text(json.dumps(document, indent=1) + "\n")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        for file in tmp.iterdir():
            give_usual_mode(file)
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(
        self,
        folder: str | Path,
        seed: int,
        fingerprint: dict,
        steps: int,
        trainable: dict[str, nn.Parameter],
        optimizer: torch.optim.Optimizer,
    ) -> int:
        """Load ``folder``'s weights into ``trainable`` and its state into ``optimizer``; returns its step. A
        checkpoint of another run (seed, fingerprint, weights) or past ``steps`` is refused before anything loads."""
        folder = Path(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        if state.get("seed") != seed or state.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"checkpoint {folder} was made by a different run (seed, data or settings differ); "
                "resume with the same config, or start a new output folder"
            )
        if state["step"] > steps:
            raise ConfigError(
                f"checkpoint {folder} is at step {state['step']}, past this run's {steps} steps; "
                "raise the steps to continue it, or start a new output folder"
            )
        weights = load_file(str(folder / TRAINABLE_FILE))
        if set(weights) != set(trainable):
            raise ConfigError(f"checkpoint {folder} holds other trainable weights than this run; use the same config")
        with torch.no_grad():
            for name, parameter in trainable.items():
                parameter.copy_(weights[name])
        document = json.loads((folder / OPTIMIZER_JSON).read_text())
        optimizer.load_state_dict(optimizer_state_from_files(load_file(str(folder / OPTIMIZER_TENSORS)), document))
        return int(state["step"])
