"""unidg data curate against a local stand-in of an OpenAI-compatible server (127.0.0.1 only): captions in the Fig. 7
schema, low confidences, garbage, a verifier that rejects some items, a server that is down; resume with nothing
lost or doubled."""

from __future__ import annotations

import hashlib
import json
import shutil
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
from chat_fixtures import chat_server, reply_chat

from unidg.core.udg import caption_stub, read_index
from unidg.train.config import ConfigError
from unidg.train.curation import (
    LOG_FILE,
    AgentConfig,
    CurateConfig,
    CurationError,
    curate,
    inpaint_biharmonic,
    read_items,
    udg_category,
)
from unidg.train.procedural import synthesize


class StandIn(BaseHTTPRequestHandler):
    requests = 0
    down = False

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        StandIn.requests += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if StandIn.down:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        image = next(p["image_url"]["url"] for p in body["messages"][1]["content"] if p["type"] == "image_url")
        odd = int(hashlib.sha256(image.encode()).hexdigest(), 16) % 3 == 0  # about a third of the items
        model = body["model"]
        if model == "cap-good":
            caption = caption_stub("scratch", "plate")
            caption["Confidence"] = 0.92
            content = json.dumps(caption)
        elif model == "cap-low":
            caption = caption_stub("scratch", "plate")
            caption["Confidence"] = 0.4
            content = json.dumps(caption)
        elif model == "cap-garbage":
            content = "Sure! Here is a lovely description."
        else:  # the verifier
            score = 3.0 if odd else 4.6
            content = json.dumps(
                {"Analysis": "ok", **{k: [score] for k in ("Consistency", "Defect Existence", "Normality")}}
            )
        reply_chat(self, content)


@pytest.fixture(scope="module")
def server():
    with chat_server(StandIn) as url:
        yield url


@pytest.fixture(scope="module")
def factory(tmp_path_factory) -> Path:
    """A plain factory folder of abnormal images only: images/, masks/ and defects.csv."""
    root = tmp_path_factory.mktemp("factory")
    synthesize(root / "udg", 12, seed=3, size=64, progress=False)
    (root / "in" / "images").mkdir(parents=True)
    (root / "in" / "masks").mkdir()
    rows = ["name,defect_type,object_name"]
    for i, q in enumerate(read_index(root / "udg")):
        shutil.copyfile(q.path("abnormal"), root / "in" / "images" / f"part{i:02d}.png")
        shutil.copyfile(q.path("mask"), root / "in" / "masks" / f"part{i:02d}.png")
        rows.append(f"part{i:02d},{'crack' if i % 2 else q.category},{q.object_name}")
    (root / "in" / "defects.csv").write_text("\n".join(rows) + "\n")
    return root / "in"


def config(server: str, factory: Path, out: Path, models: list[str], **extra) -> CurateConfig:
    agent = {"url": server, "retries": 1, "backoff_s": 0.01, "timeout_s": 10.0}
    result = CurateConfig(
        input=str(factory),
        output=str(out),
        captioner=AgentConfig(models=models, **agent),
        verifier=AgentConfig(model="verifier", cache_dir=str(out.parent / "cache"), **agent),
        **extra,
    )
    result.validate("test")
    return result


def decisions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def test_every_item_is_decided_with_a_reason_and_kept_ones_are_quadruplets(server, factory, tmp_path) -> None:
    out = tmp_path / "udg"
    counts = curate(config(server, factory, out, ["cap-low", "cap-good", "cap-garbage"]), progress=False)
    log = decisions(out)
    assert len(log) == 12 and len({e["item"] for e in log}) == 12
    kept = [e for e in log if e["decision"] == "kept"]
    rejected = [e for e in log if e["decision"] == "rejected"]
    assert kept and rejected and len(kept) + len(rejected) == 12
    assert {e["reason"] for e in rejected} == {"every caption scored below 4.2"}
    assert all(e["model"] == "cap-good" for e in kept)  # cap-low is under 0.8, cap-garbage never parses
    assert sum(counts.values()) == 12
    quadruplets = read_index(out)
    assert sorted(q.id for q in quadruplets) == sorted(e["item"] for e in kept)
    for q in quadruplets:
        assert q.caption["Confidence"] == 0.92
        assert q.category in ("breakage",) or q.category == next(e for e in log if e["item"] == q.id)["category"]
        normal, abnormal, mask = q.load_normal(), q.load_abnormal(), q.load_mask()
        assert normal.shape == abnormal.shape and mask.any()


def test_low_confidence_only_is_rejected_by_name(server, factory, tmp_path) -> None:
    out = tmp_path / "udg"
    curate(config(server, factory, out, ["cap-low"], limit=3), progress=False)
    assert {e["reason"] for e in decisions(out)} == {"no caption with confidence >= 0.8"}
    assert (out / "index.jsonl").read_text() == ""  # an empty UDG folder: nothing kept


def test_a_server_that_is_down_leaves_errors_that_the_next_run_decides(server, factory, tmp_path) -> None:
    out = tmp_path / "udg"
    StandIn.down = True
    try:
        curate(config(server, factory, out, ["cap-good"], limit=4), progress=False)
    finally:
        StandIn.down = False
    assert {e["decision"] for e in decisions(out)} == {"error"}
    # Resume after a kill: the log's last line torn mid-write, then the whole folder.
    with open(out / LOG_FILE, "ab") as handle:
        handle.write(b'{"item": "part0')
    curate(config(server, factory, out, ["cap-good"]), progress=False)
    final = {}
    for entry in decisions(out)[: -0 or None]:
        final[entry["item"]] = entry
    assert len(final) == 12 and "error" not in {e["decision"] for e in final.values()}
    kept = sorted(i for i, e in final.items() if e["decision"] == "kept")
    assert sorted(q.id for q in read_index(out)) == kept  # nothing doubled
    asked = StandIn.requests
    curate(config(server, factory, out, ["cap-good"]), progress=False)  # a finished folder asks nothing
    assert StandIn.requests == asked
    # Killed after a kept item's quadruplet was written but before its decision: decided again, not written twice.
    lines = (out / LOG_FILE).read_text().splitlines()
    last_kept = max(i for i, line in enumerate(lines) if json.loads(line)["decision"] == "kept")
    (out / LOG_FILE).write_text("\n".join(lines[:last_kept] + lines[last_kept + 1 :]) + "\n")
    curate(config(server, factory, out, ["cap-good"]), progress=False)
    assert sorted(q.id for q in read_index(out)) == kept


def test_inpainting_changes_only_the_dilated_region() -> None:
    rng = np.random.default_rng(0)
    image = np.full((48, 48, 3), 120, np.uint8) + rng.integers(0, 5, (48, 48, 3), dtype=np.uint8)
    mask = np.zeros((48, 48), bool)
    mask[20:26, 10:30] = True
    image[mask] = (250, 10, 10)
    normal = inpaint_biharmonic(image, mask)
    from unidg.core.geometry import dilate_mask

    region = dilate_mask(mask, 7, 2)
    assert np.array_equal(normal[~region], image[~region])
    assert np.abs(normal[mask].astype(int) - 122).max() < 20  # the red defect is gone


def test_inputs_and_config_errors(tmp_path, server, factory) -> None:
    assert udg_category("crack") == "breakage" and udg_category("black_spot") == "black spot"
    assert udg_category("sparkly") == "unknown"
    assert len(read_items(factory, "folder")) == 12
    mvtec = tmp_path / "mvtec" / "bottle"
    (mvtec / "test" / "broken_large").mkdir(parents=True)
    (mvtec / "test" / "good").mkdir()
    (mvtec / "ground_truth" / "broken_large").mkdir(parents=True)
    shutil.copyfile(factory / "images" / "part00.png", mvtec / "test" / "broken_large" / "000.png")
    shutil.copyfile(factory / "images" / "part00.png", mvtec / "test" / "good" / "000.png")
    shutil.copyfile(factory / "masks" / "part00.png", mvtec / "ground_truth" / "broken_large" / "000_mask.png")
    (item,) = read_items(tmp_path / "mvtec", "mvtec")
    assert (item.defect_type, item.object_name, item.id) == ("broken_large", "bottle", "bottle-broken_large-000")
    # VisA: the split CSV as a spreadsheet exports it (UTF-8 with a byte-order mark) reads like the plain file.
    visa = tmp_path / "visa"
    (visa / "split_csv").mkdir(parents=True)
    rows = "object,split,label,image,mask\ncandle,test,anomaly,images/part00.png,masks/part00.png\n"
    (visa / "split_csv" / "1cls.csv").write_text(rows, encoding="utf-8-sig")
    (item,) = read_items(visa, "visa")
    assert (item.object_name, item.image, item.mask) == (
        "candle",
        visa / "images/part00.png",
        visa / "masks/part00.png",
    )
    (visa / "split_csv" / "1cls.csv").write_bytes(b"object,split\n\xff\n")
    with pytest.raises(CurationError, match="1cls.csv is not UTF-8 text .* save VisA's split CSV as UTF-8"):
        read_items(visa, "visa")
    with pytest.raises(ConfigError, match="captioner.models"):
        CurateConfig(input="x", output="y", verifier=AgentConfig(url=server, model="v")).validate("c.toml")
    with pytest.raises(ConfigError, match="verifier.url"):
        CurateConfig(captioner=AgentConfig(url=server, models=["m"])).validate("c.toml")


def test_the_data_curate_command(server, factory, tmp_path, capsys) -> None:
    from unidg.cli import main

    toml = tmp_path / "curate.toml"
    toml.write_text(
        f'[captioner]\nurl = "{server}"\nmodels = ["cap-good"]\nretries = 0\n'
        f'[verifier]\nurl = "{server}"\nmodel = "verifier"\nretries = 0\n'
    )
    argv = ["data", "curate", "--config", str(toml), "--in", str(factory), "--out", str(tmp_path / "udg"), "--quiet"]
    assert main([*argv, "--set", "limit=4"]) == 0
    out = capsys.readouterr().out
    assert "curation.jsonl" in out and ("kept" in out or "rejected" in out)
    assert main([*argv, "--set", "min_confidence=2"]) == 2  # out of range: one line, before any work
    assert "min_confidence" in capsys.readouterr().err


def test_the_bundle_inpainter_paints_a_defect_free_patch_over_the_defect(server, factory, tmp_path) -> None:
    from unidg.core.geometry import dilate_mask
    from unidg.train.curation import clean_reference_box

    mask = np.zeros((64, 64), bool)
    mask[20:30, 24:36] = True
    box = clean_reference_box(mask)
    region = dilate_mask(mask, 7, 2)
    assert box is not None and not (box & region).any()
    assert box.sum() == region.any(axis=1).sum() * region.any(axis=0).sum()  # the dilated defect's box size
    assert clean_reference_box(np.ones((64, 64), bool)) is None

    bundle = Path(__file__).resolve().parents[1] / "runtime" / "assets" / "unidg-nano-bundle"
    out = tmp_path / "udg"
    options = {"limit": 3, "inpainter": "bundle", "inpaint_bundle": str(bundle)}
    curate(config(server, factory, out, ["cap-good"], **options), progress=False)
    kept = read_index(out)
    assert kept
    for q in kept:
        normal, abnormal, defect = q.load_normal(), q.load_abnormal(), q.load_mask()
        outside = ~dilate_mask(defect, 7, 2)
        assert np.array_equal(normal[outside], abnormal[outside])  # only the defect region is repainted
        assert not np.array_equal(normal[defect], abnormal[defect])
    with pytest.raises(ConfigError, match="inpaint_bundle"):
        CurateConfig(
            inpainter="bundle",
            captioner=AgentConfig(url=server, models=["m"]),
            verifier=AgentConfig(url=server, model="v"),
        ).validate("c.toml")
