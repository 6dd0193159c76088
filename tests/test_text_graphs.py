"""UniDG-Text's encoders exported to ONNX: onnxruntime's outputs equal the torch encoders' on tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from text_fixtures import tiny_text_folder, tokenizer_texts

from unidg.core.text import CLIP_GRAPH, CLIP_TOKENIZER_FOLDER, T5_GRAPH, T5_TOKENIZER_FOLDER, TOKENIZER_FILE
from unidg.export.text_graphs import export_text_encoders
from unidg.train.text_encoders import TextEncoders, load_text_encoders

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[TextEncoders, Path, dict]:
    encoders = load_text_encoders(tiny_text_folder(tmp_path_factory, seed=4))
    out = tmp_path_factory.mktemp("text_bundle")
    # External data on: the path T5-XXL takes (~19 GB in float32), exercised at tiny size.
    records = export_text_encoders(encoders, out, max_batch=16, external_data=True)
    return encoders, out, records


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnxruntime_equals_torch_on_the_tiny_encoders(exported) -> None:
    encoders, out, records = exported
    assert records[T5_GRAPH].data_files == ("t5_text.onnx.data",) and (out / "t5_text.onnx.data").is_file()
    texts = tokenizer_texts(8)  # 22 texts: more than the export example's batch of 2
    ids = encoders.tokenize(texts)
    with torch.no_grad():
        pooled, hidden = encoders.encode_ids(ids["clip_ids"], ids["t5_ids"])
    (onnx_pooled,) = _session(out / f"{CLIP_GRAPH}.onnx").run(None, {"input_ids": ids["clip_ids"].numpy()})
    t5 = _session(out / f"{T5_GRAPH}.onnx")
    (onnx_hidden,) = t5.run(None, {"input_ids": ids["t5_ids"].numpy()})
    assert onnx_pooled.shape == tuple(pooled.shape) and onnx_hidden.shape == tuple(hidden.shape)
    assert np.abs(onnx_pooled - pooled.numpy()).max() < 1e-5
    assert np.abs(onnx_hidden - hidden.numpy()).max() < 1e-4
    # T5's length is dynamic: a shorter K gives the same states as torch at that length.
    short = encoders.tokenize(texts[:3], max_length=24)["t5_ids"]
    with torch.no_grad():
        expected = encoders.t5(input_ids=short).last_hidden_state.numpy()
    (onnx_short,) = t5.run(None, {"input_ids": short.numpy()})
    assert onnx_short.shape == (3, 24, encoders.hidden_dim) and np.abs(onnx_short - expected).max() < 1e-4


def test_the_tokenizers_travel_with_the_graphs(exported) -> None:
    _, out, _ = exported
    for name in (CLIP_TOKENIZER_FOLDER, T5_TOKENIZER_FOLDER):
        assert (out / name / TOKENIZER_FILE).is_file() and (out / name / "tokenizer_config.json").is_file()
