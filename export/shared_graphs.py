"""``unidg export onnx --share-graphs BUNDLE``: take the VAE and image-encoder graphs from another bundle when they are
the same network, byte for byte.

Models fine-tuned from one base (a UniDG-Text LoRA on the merged SFT weights, a Consistency-RFT run) change only the
transformer: their VAE and SigLIP/Redux graphs equal the base bundle's in every weight, but an export made by another
release of the exporter may serialize them differently. Copying the other bundle's file lets a repository, a package
or a station's disk store those graphs once (git and deduplicating filesystems keep one copy of identical files).

A graph is taken only when it is provably the same computation for this bundle: the same input and output tables, the
same weights (every initializer equal by name, dtype, shape and bytes) and bit-identical outputs in onnxruntime on the
export's example inputs. Otherwise the freshly exported graph stays, and the reason is reported.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from unidg.export.onnx_export import GraphRecord, ModelFacts, graph_example_inputs, io_table
from unidg.runtime.bundle import BundleError, load_bundle

SHAREABLE_GRAPHS = ("vae_encoder", "vae_decoder", "image_encoder")  # the step is what a fine-tune changes


def _weights(model: onnx.ModelProto) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return {name: (str(a.dtype), a.shape, a.tobytes()) for name, a in arrays.items()}


def _outputs(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, inputs)


def same_graph(ours: Path, theirs: Path, inputs: dict[str, np.ndarray]) -> str | None:
    """None when ``theirs`` computes exactly what ``ours`` does (IO tables, weights, outputs); else why not."""
    a, b = onnx.load(str(ours)), onnx.load(str(theirs))
    for direction in ("input", "output"):
        if io_table(getattr(a.graph, direction)) != io_table(getattr(b.graph, direction)):
            return f"its {direction}s differ"
    if _weights(a) != _weights(b):
        return "its weights differ"
    for mine, other in zip(_outputs(ours, inputs), _outputs(theirs, inputs)):
        if mine.shape != other.shape or not np.array_equal(mine, other):
            return "its outputs differ on the example inputs"
    return None


def share_graphs(
    staging: Path,
    records: dict[str, GraphRecord],
    other: str | Path,
    facts: ModelFacts,
    batch: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, GraphRecord], dict]:
    """Replace each shareable graph in ``staging`` by ``other``'s file where it is the same computation; returns the
    records (a shared graph's record takes the other file's node counts) and the manifest's ``shared_graphs`` entry."""
    try:
        bundle = load_bundle(other)
    except BundleError as error:
        raise BundleError(f"--share-graphs: {error}") from error
    records = dict(records)
    shared = []
    for name in SHAREABLE_GRAPHS:
        theirs = bundle.graph_path(name)
        record = records[name]
        if record.data_files or bundle.metadata["graphs"][name].get("external_data"):
            reason = "it keeps external data"
        else:
            reason = same_graph(staging / record.file, theirs, graph_example_inputs(name, facts, batch))
        if reason:
            if progress:
                progress(f"{name}: kept the exported graph ({bundle.path.name}'s {reason})")
            continue
        shutil.copyfile(theirs, staging / record.file)
        counts = {}
        for node in onnx.load(str(theirs), load_external_data=False).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        records[name] = GraphRecord(
            name=record.name,
            file=record.file,
            inputs=record.inputs,
            outputs=record.outputs,
            data_files=(),
            seconds=record.seconds,
            op_counts=dict(sorted(counts.items())),
        )
        shared.append(name)
        if progress:
            progress(f"{name}: the same graph as {theirs} (IO, weights, outputs): copied byte for byte")
    return records, {"bundle": bundle.path.name, "fingerprint": bundle.fingerprint, "graphs": shared}
