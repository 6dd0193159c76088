"""UniDG-Text's encoders as ONNX graphs: CLIP-L (ids -> pooled) and T5 (ids -> hidden states), plus their tokenizers.

``export_text_encoders`` writes ``clip_text.onnx`` and ``t5_text.onnx`` (opset 23, dynamo exporter, float32 outputs;
T5-XXL's ~19 GB of float32 weights go to external data, as every graph over the threshold does) and the
``tokenizer/`` and ``tokenizer_2/`` folders the lean runtime reads (``tokenizer.json`` + ``tokenizer_config.json``,
written by transformers from whichever files the FLUX download had: CLIP-L ships vocab.json + merges.txt only).
Batch is dynamic; T5's sequence length is dynamic up to 512 (the runtime pads to the model's K).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from unidg.core.text import (
    CLIP_GRAPH,
    CLIP_MAX_LENGTH,
    CLIP_TOKENIZER_FOLDER,
    T5_GRAPH,
    T5_MAX_LENGTH,
    T5_TOKENIZER_FOLDER,
    TEXT_GRAPH_IO,
)
from unidg.export.onnx_export import BATCH_AXIS, OPSET, ExportError, GraphRecord, Progress, export_module
from unidg.train.text_encoders import TextEncoders, save_tokenizer

T5_LENGTH_AXIS = "text_tokens"


class ClipTextGraph(nn.Module):
    """CLIP ids (B, 77) -> pooled output (B, width), float32: FLUX's ``pooled_projections``."""

    def __init__(self, encoders: TextEncoders) -> None:
        super().__init__()
        self.clip = encoders.clip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip(input_ids=input_ids).pooler_output.float()


class T5TextGraph(nn.Module):
    """T5 ids (B, L) -> last hidden state (B, L, width), float32: FLUX's text tokens."""

    def __init__(self, encoders: TextEncoders) -> None:
        super().__init__()
        self.t5 = encoders.t5

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.t5(input_ids=input_ids).last_hidden_state.float()


def _example_ids(vocab: int, batch: int, length: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, vocab, (batch, length), dtype=np.int64)
    return {"input_ids": ids}


def export_text_encoders(
    encoders: TextEncoders,
    folder: str | Path,
    *,
    max_batch: int = 8,
    opset: int = OPSET,
    external_data: bool | None = None,
    progress: Progress | None = None,
) -> dict[str, GraphRecord]:
    """Write the two encoder graphs and the two tokenizer folders into ``folder``; returns the graphs' records."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=max_batch)
    length = torch.export.Dim(T5_LENGTH_AXIS, min=2, max=T5_MAX_LENGTH)
    example_batch = min(2, max_batch)
    graphs = {
        CLIP_GRAPH: (
            ClipTextGraph(encoders),
            _example_ids(encoders.clip.config.vocab_size, example_batch, CLIP_MAX_LENGTH),
            {"input_ids": {0: batch}},
        ),
        T5_GRAPH: (
            T5TextGraph(encoders),
            _example_ids(encoders.t5.config.vocab_size, example_batch, 16),
            {"input_ids": {0: batch, 1: length}},
        ),
    }
    records = {}
    for name, (module, inputs, dynamic) in graphs.items():
        record = export_module(
            module.eval(),
            inputs,
            folder / f"{name}.onnx",
            TEXT_GRAPH_IO[name][1],
            dynamic_shapes=dynamic,
            opset=opset,
            external_data=external_data,
            progress=progress,
        )
        if (tuple(record.inputs), tuple(record.outputs)) != TEXT_GRAPH_IO[name]:
            raise ExportError(
                f"{name}.onnx has inputs {list(record.inputs)} / outputs {list(record.outputs)}; a text graph needs "
                f"{list(TEXT_GRAPH_IO[name][0])} / {list(TEXT_GRAPH_IO[name][1])}"
            )
        records[name] = record
    save_tokenizer(encoders.clip_tokenizer, folder / CLIP_TOKENIZER_FOLDER)
    save_tokenizer(encoders.t5_tokenizer, folder / T5_TOKENIZER_FOLDER)
    return records
