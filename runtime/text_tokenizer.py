"""UniDG-Text's tokenizers in the lean runtime: no torch, no transformers — ``tokenizers`` reading ``tokenizer.json``.

A text bundle carries ``tokenizer/`` (CLIP-L) and ``tokenizer_2/`` (T5) as ``unidg export`` writes them
(``tokenizer.json`` + transformers' ``tokenizer_config.json``). ``FluxTokenizers`` gives the ids FluxPipeline gives:
CLIP's padded and truncated to 77, T5's to the model's K (512 for FLUX), the end token kept on truncation, padded with
the config's pad token on the config's side; the attention masks come along (the encoders are not given them).
The ids equal transformers' fast tokenizers' on the same folders (tested on tiny tokenizers); the ``tokenizer.json``
must be the one transformers writes, since transformers rebuilds a CLIP or T5 pipeline from its vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from unidg.core.errors import UniDGError
from unidg.core.text import (
    CLIP_MAX_LENGTH,
    CLIP_TOKENIZER_FOLDER,
    T5_MAX_LENGTH,
    T5_TOKENIZER_FOLDER,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
)


class TokenizerError(UniDGError):
    """A tokenizer folder or an instruction the runtime cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class TokenIds:
    """Token ids and attention masks, (B, max_length) int64 each."""

    ids: np.ndarray
    mask: np.ndarray


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with its content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """One ``tokenizer.json`` with fixed-length padding and truncation, as transformers applies them."""

    def __init__(self, folder: str | Path, max_length: int) -> None:
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(
                f"{folder}: no {TOKENIZER_FILE}; a text bundle's tokenizer folders are written by `unidg export` "
                "(transformers' save_pretrained writes it from a FLUX download's vocab files)"
            )
        if max_length < 2:
            raise TokenizerError(f"{folder}: max_length {max_length} leaves no room for a token and the end token")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
            config = json.loads((folder / TOKENIZER_CONFIG_FILE).read_text())
        except (OSError, ValueError, Exception) as error:  # tokenizers raises a bare Exception on a broken file
            raise TokenizerError(f"{folder}: unreadable tokenizer files ({error}); export the bundle again") from error
        pad_token = _token_text(config.get("pad_token"))
        pad_id = self.tokenizer.token_to_id(pad_token) if pad_token else None
        if pad_id is None:
            raise TokenizerError(
                f"{folder / TOKENIZER_CONFIG_FILE}: its pad_token {pad_token!r} is not in {TOKENIZER_FILE}; "
                "export the bundle again"
            )
        self.folder = folder
        self.max_length = max_length
        self.pad_id = pad_id
        # The file may carry the padding of whatever call preceded its saving: set both explicitly.
        self.tokenizer.enable_truncation(max_length, direction=config.get("truncation_side", "right"))
        self.tokenizer.enable_padding(
            direction=config.get("padding_side", "right"), pad_id=pad_id, pad_token=pad_token, length=max_length
        )
        self._unbounded = Tokenizer.from_str(self.tokenizer.to_str())
        self._unbounded.no_truncation()
        self._unbounded.no_padding()

    def token_count(self, text: str) -> int:
        """Tokens of ``text`` before padding and truncation (the end token included)."""
        return len(self._unbounded.encode(text).ids)

    def __call__(self, texts: list[str]) -> TokenIds:
        if isinstance(texts, str) or not texts or not all(isinstance(text, str) for text in texts):
            raise TokenizerError("instructions: pass a non-empty list of strings")
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
        return TokenIds(ids, mask)


class FluxTokenizers:
    """FLUX's two tokenizers from a text bundle (or any folder with ``tokenizer/`` and ``tokenizer_2/``)."""

    def __init__(self, folder: str | Path, t5_max_length: int = T5_MAX_LENGTH) -> None:
        folder = Path(folder)
        self.clip = TextTokenizer(folder / CLIP_TOKENIZER_FOLDER, CLIP_MAX_LENGTH)
        self.t5 = TextTokenizer(folder / T5_TOKENIZER_FOLDER, t5_max_length)

    def __call__(self, texts: list[str]) -> tuple[TokenIds, TokenIds]:
        """(CLIP ids, T5 ids) of the instructions."""
        return self.clip(texts), self.t5(texts)
