"""UniDG-Text instructions -> the step graph's text inputs, in the lean runtime (onnxruntime + ``tokenizers``).

A text bundle (format 3) carries CLIP-L (``clip_text.onnx``: ids (B, 77) -> pooled) and T5 (``t5_text.onnx``: ids
(B, L) -> hidden states) with their tokenizer folders. ``PromptEncoder.encode`` gives what ``train text`` trained
with: CLIP's pooled output at 77 tokens and T5's hidden states at the model's K tokens (FluxPipeline's conventions,
``unidg.runtime.text_tokenizer``). Where FluxPipeline silently truncates T5 at its limit, an instruction longer than K
tokens is refused here: the model never saw its end, and a station should know. CLIP keeps FLUX's silent truncation
at 77 (its pooled output is a summary; T5 carries the text).

Encoded instructions are kept (a bounded cache keyed by the text): a station repeats a handful of instructions, and T5
at full scale is billions of parameters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from unidg.core.errors import UniDGError
from unidg.core.text import CLIP_GRAPH, T5_GRAPH
from unidg.runtime.bundle import Bundle

CACHE_SIZE = 256  # distinct instructions kept encoded


class PromptError(UniDGError):
    """An instruction the model cannot take (empty, too long, not text); the message names it and the fix."""


def _import_tokenizers():
    try:
        from unidg.runtime.text_tokenizer import FluxTokenizers
    except ImportError as error:  # `tokenizers` is the text extra, not part of the station's lean install
        raise UniDGError(
            "a UniDG-Text bundle needs the `tokenizers` package for its instructions: pip install 'unidg[text]'"
        ) from error
    return FluxTokenizers


class PromptEncoder:
    """Tokenizes and encodes instructions with a text bundle's encoder graphs (onnxruntime, the given providers)."""

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        provider_options: Sequence[dict] | None = None,
        session_options: object | None = None,
    ) -> None:
        """``session_options``: the backend's onnxruntime.SessionOptions (threads, spinning); None: the CPU backend's
        defaults (the cores this process may use, idle threads not spinning)."""
        # onnxruntime loads with the first text bundle, as with the onnxruntime backend (whose creation checks the
        # install first): a reference-mode station on another backend never imports it.
        import onnxruntime as ort

        from unidg.runtime.backends.onnxruntime_backend import cpu_session_options

        if not bundle.text:
            raise UniDGError(f"bundle {bundle.path} is a reference-mode bundle: it has no text encoders")
        self.bundle = bundle
        self.max_tokens = bundle.text_tokens
        self.tokenizers = _import_tokenizers()(bundle.path, t5_max_length=self.max_tokens)
        options = session_options or cpu_session_options()
        self.sessions = {}
        for name in (CLIP_GRAPH, T5_GRAPH):
            path = bundle.graph_path(name)
            try:
                self.sessions[name] = ort.InferenceSession(
                    str(path), options, providers=list(providers), provider_options=provider_options
                )
            except Exception as error:  # onnxruntime raises its own types for unreadable graphs
                raise UniDGError(f"onnxruntime cannot load {path} ({error}); re-export the bundle") from error
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def check(self, prompt: object, name: str = "request") -> str:
        """The instruction, refused when it is not a non-empty string of at most K T5 tokens. The bundle's reference
        instruction is taken at any length: the model was trained with it cut to K tokens, as it is encoded here."""
        if not isinstance(prompt, str):
            raise PromptError(f"{name}: prompt must be text (got {type(prompt).__name__})")
        if not prompt.strip():
            raise PromptError(
                f"{name}: the prompt is empty; describe the defect to add, e.g. 'Add the long thin scratch defect "
                "to the image.'"
            )
        if prompt not in self._cache and prompt != self.bundle.text.get("reference_instruction"):
            count = self.tokenizers.t5.token_count(prompt)
            if count > self.max_tokens:
                raise PromptError(
                    f"{name}: the prompt is {count} T5 tokens; this model reads at most {self.max_tokens} (its "
                    "text_tokens K): shorten the instruction"
                )
        return prompt

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(pooled (B, P), hidden (B, K, J)) float32 of checked instructions; each distinct one is encoded once and
        kept for later calls."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh = dict(zip(missing, zip(*self._run(missing)))) if missing else {}
        rows = [fresh[p] if p in fresh else self._cache[p] for p in prompts]
        for prompt in prompts:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
        for prompt, row in fresh.items():
            self._cache[prompt] = row
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def _run(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        clip_ids, t5_ids = self.tokenizers(prompts)
        (pooled,) = self.sessions[CLIP_GRAPH].run(None, {"input_ids": clip_ids.ids})
        (hidden,) = self.sessions[T5_GRAPH].run(None, {"input_ids": t5_ids.ids})
        return pooled.astype(np.float32), hidden.astype(np.float32)
