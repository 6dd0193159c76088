"""UniDG generation settings (``unidg.json``): one dataclass shared by training, export and the runtime."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from unidg.core.errors import UniDGError
from unidg.core.geometry import Diptych, build_diptych
from unidg.core.layout import HasLayout
from unidg.core.manifest import atomic_write_text

SETTINGS_FILE = "unidg.json"
# Largest diptych half S: the S x 2S diptych stays within the ~2 MP FLUX.1 is made for (1024 x 2048 = 2.1 MP).
MAX_RESOLUTION = 1024


@dataclass(frozen=True)
class UniDGSettings(HasLayout):
    """What a trained UniDG model was made for and how it samples by default."""

    alpha: float = 2.0  # defect-attention amplification (paper Eq. 11): bias log(alpha)
    beta: float = 0.6  # adaptive crop: minimum crop ratio r (paper Eq. 8)
    threshold: float = 0.1  # adaptive crop: area ratio T below which the crop is expanded
    resolution: int = 768  # S: each diptych half is S x S pixels
    text_tokens: int = 512  # K zero text tokens in reference mode
    steps: int = 28
    guidance: float = 30.0
    dilate_kernel: int = 7
    dilate_iterations: int = 2
    fold_text_tokens: bool = True  # K identical zero text tokens -> one key with bias log K (exact)

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise UniDGError(f"{spec.name} must be an integer (got {value!r})")
            if spec.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UniDGError(f"{spec.name} must be a number (got {value!r})")
            if isinstance(value, float) and not math.isfinite(value):
                raise UniDGError(f"{spec.name} must be a finite number (got {value!r})")
        if self.alpha <= 0:
            raise UniDGError(f"alpha must be > 0 (got {self.alpha})")
        if not 0 < self.beta <= 1:
            raise UniDGError(f"beta must be in (0, 1] (got {self.beta})")
        if not 0 < self.threshold <= 1:
            raise UniDGError(f"threshold must be in (0, 1] (got {self.threshold})")
        if not 16 <= self.resolution <= MAX_RESOLUTION or self.resolution % 16:
            raise UniDGError(f"resolution must be a multiple of 16 from 16 to {MAX_RESOLUTION} (got {self.resolution})")
        if self.text_tokens < 1:
            raise UniDGError(f"text_tokens must be >= 1 (got {self.text_tokens})")
        if self.steps < 1:
            raise UniDGError(f"steps must be >= 1 (got {self.steps})")
        if self.guidance < 0:
            raise UniDGError(f"guidance must be >= 0 (got {self.guidance})")
        if self.dilate_kernel < 1 or self.dilate_iterations < 0:
            raise UniDGError(
                f"dilate_kernel must be >= 1 and dilate_iterations >= 0 (got {self.dilate_kernel}, "
                f"{self.dilate_iterations})"
            )

    @property
    def log_alpha(self) -> float:
        return math.log(self.alpha)

    def diptych(
        self,
        reference: np.ndarray,
        reference_mask: np.ndarray,
        source: np.ndarray,
        target_mask: np.ndarray,
        size: int | None = None,
        *,
        validated: bool = False,
    ) -> Diptych:
        """The Alg. 1 diptych of a request with these settings' beta, T and dilation, at ``size`` (default S).
        ``validated``: the arrays were checked where the request came in (DefectSynthesizer.check)."""
        return build_diptych(
            reference,
            reference_mask,
            source,
            target_mask,
            self.resolution if size is None else size,
            beta=self.beta,
            threshold=self.threshold,
            dilate_kernel=self.dilate_kernel,
            dilate_iterations=self.dilate_iterations,
            validated=validated,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> UniDGSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UniDGError(f"unknown UniDG settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / SETTINGS_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> UniDGSettings:
        path = Path(folder) / SETTINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a UniDG weights folder or bundle must contain {SETTINGS_FILE}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise UniDGError(f"{path} is not valid JSON ({error}); re-create it with `unidg train merge`") from error
