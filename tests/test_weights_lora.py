"""``unidg weights lora``: LoRA files in the published layouts fold into a weights folder as peft merges them (diffusers
/ peft layouts), as the dense BFL-space update W + alpha/rank * B @ A converted to diffusers keys (kohya and BFL
layouts), and exactly as ``unidg train merge`` does (the SFT layout); a LoRA for other shapes is refused by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.loaders import FluxLoraLoaderMixin
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from weights_fixtures import random_nano

from unidg.cli import main
from unidg.core.manifest import WeightsError, read_manifest, verify_files
from unidg.core.settings import UniDGSettings
from unidg.train.config import LoraConfig
from unidg.train.loading import bfl_transformer_state_dict, convert_bfl_transformer, load_model, save_model
from unidg.train.lora import add_lora, save_lora
from unidg.train.lora_files import _split_linear1, merge_lora_file, read_lora_file
from unidg.train.merge import merge_lora, probe_inputs, probe_velocity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH = 128  # the nano transformer's inner dimension
MODULES = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.1.ff.net.2",
    "single_transformer_blocks.2.proj_mlp",
    "single_transformer_blocks.3.proj_out",
    "x_embedder",
]
# BFL module -> (rows, columns) of its weight in the nano transformer.
BFL_MODULES = {
    "double_blocks.0.img_attn.qkv": (3 * WIDTH, WIDTH),
    "double_blocks.1.txt_mlp.0": (4 * WIDTH, WIDTH),
    "single_blocks.1.linear1": (7 * WIDTH, WIDTH),
    "single_blocks.2.linear2": (WIDTH, 5 * WIDTH),
    "img_in": (WIDTH, 384),
    "final_layer.linear": (64, WIDTH),
    "final_layer.adaLN_modulation.1": (2 * WIDTH, WIDTH),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    settings = UniDGSettings(resolution=64, text_tokens=8, guidance=1.0, steps=4)
    model = random_nano(seed=3)
    model.settings = settings
    return save_model(model, tmp_path_factory.mktemp("lora") / "base")


def _random(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return 0.05 * torch.randn(shape, generator=generator)


def _peft_transformer(base: Path, config: PeftLoraConfig, seed: int):
    """The base transformer with peft adapters of random (trained-looking) weights."""
    transformer = load_model(base).transformer
    inject_adapter_in_model(config, transformer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(_random(tuple(parameter.shape), generator))
    return transformer


def _peft_merged(transformer) -> dict[str, torch.Tensor]:
    """peft's own merge of every adapter into its layer, under the plain layer names."""
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    return {
        key.replace(".base_layer", ""): value for key, value in transformer.state_dict().items() if "lora_" not in key
    }


def _max_difference(folder: Path, expected: dict[str, torch.Tensor]) -> float:
    merged = load_model(folder).transformer.state_dict()
    assert set(merged) == set(expected)
    return max(float((merged[key].double() - expected[key].double()).abs().max()) for key in expected)


def test_peft_and_diffusers_layouts_merge_as_peft_does(base: Path, tmp_path: Path) -> None:
    config = PeftLoraConfig(
        r=4, lora_alpha=6, target_modules=MODULES, rank_pattern={"x_embedder": 2}, alpha_pattern={"x_embedder": 5}
    )
    transformer = _peft_transformer(base, config, seed=1)
    factors = get_peft_model_state_dict(transformer)
    # peft: adapter_model.safetensors (base_model.model. keys) + adapter_config.json, as PeftModel.save_pretrained.
    (tmp_path / "peft").mkdir()
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in factors.items()},
        tmp_path / "peft" / "adapter_model.safetensors",
    )
    config.save_pretrained(str(tmp_path / "peft"))
    # diffusers: transformer.* keys, the LoRA config in the file's lora_adapter_metadata, written by diffusers itself.
    FluxLoraLoaderMixin.save_lora_weights(
        tmp_path / "diffusers",
        transformer_lora_layers=factors,
        transformer_lora_adapter_metadata=config.to_dict(),
        weight_name="pytorch_lora_weights.safetensors",
    )
    expected = _peft_merged(transformer)
    for layout, path in (
        ("peft", tmp_path / "peft"),
        ("diffusers", tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"),
    ):
        report = merge_lora_file(base, path, tmp_path / f"merged-{layout}", progress=False)
        assert report["lora"]["modules"] == len(MODULES) and report["lora"]["ranks"] == [2, 4]
        assert report["lora"]["scales"] == [1.5, 2.5]  # 6/4 and x_embedder's 5/2, from peft's own layers
        difference = _max_difference(tmp_path / f"merged-{layout}", expected)
        print(f"{layout} LoRA: max abs difference to peft's merge {difference:.3g}")
        assert difference < 1e-6


def _bfl_lora(generator: torch.Generator, rank: int = 4) -> tuple[dict, dict]:
    """Factors per BFL module (down, up, alpha): kohya's / BFL's LoRA on the fused qkv, linear1, final layer..."""
    lora = {}
    for index, (module, (rows, columns)) in enumerate(BFL_MODULES.items()):
        lora[module] = (_random((rank, columns), generator), _random((rows, rank), generator), float(2 + index))
    return lora


def _dense_expected(base: Path, lora: dict) -> dict[str, torch.Tensor]:
    """The base in BFL keys plus alpha/rank * up @ down per module, converted back by the checkpoint converter."""
    state = bfl_transformer_state_dict(load_model(base).transformer.state_dict())
    for module, (down, up, alpha) in lora.items():
        weight = state[f"{module}.weight"]
        state[f"{module}.weight"] = (weight.double() + alpha / down.shape[0] * (up.double() @ down.double())).float()
    return convert_bfl_transformer(state, WIDTH)


def _kohya_keys(lora: dict) -> dict[str, torch.Tensor]:
    tensors = {}
    for module, (down, up, alpha) in lora.items():
        name = "lora_unet_" + module.replace(".", "_")
        tensors |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(alpha),
        }
    return tensors


def _bfl_keys(lora: dict, prefix: str, down_name: str, up_name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for module, (down, up, alpha) in lora.items():
        tensors |= {
            f"{prefix}{module}.{down_name}.weight": down,
            f"{prefix}{module}.{up_name}.weight": up,
            f"{prefix}{module}.alpha": torch.tensor(alpha),
        }
    return tensors


@pytest.mark.parametrize(
    "layout",
    ["kohya lora_unet_", "BFL diffusion_model. lora_down/up", "BFL lora_A/B"],
)
def test_kohya_and_bfl_layouts_merge_as_the_dense_update(base: Path, tmp_path: Path, layout: str) -> None:
    lora = _bfl_lora(torch.Generator().manual_seed(2))
    tensors = {
        "kohya lora_unet_": lambda: _kohya_keys(lora),
        "BFL diffusion_model. lora_down/up": lambda: _bfl_keys(lora, "diffusion_model.", "lora_down", "lora_up"),
        "BFL lora_A/B": lambda: _bfl_keys(lora, "", "lora_A", "lora_B"),
    }[layout]()
    save_file(tensors, tmp_path / "lora.safetensors")
    report = merge_lora_file(base, tmp_path / "lora.safetensors", tmp_path / "merged", progress=False)
    assert report["lora"]["layout"] == "kohya"
    difference = _max_difference(tmp_path / "merged", _dense_expected(base, lora))
    print(f"{layout}: max abs difference to the dense BFL-space merge {difference:.3g}")
    assert difference < 1e-6


def test_single_block_split_matches_diffusers_at_flux_width() -> None:
    """linear1 (q, k, v, mlp) is split here for any width; at FLUX's 3072 it equals diffusers' own conversion."""
    generator = torch.Generator().manual_seed(4)
    down, up = _random((2, 3072), generator), _random((7 * 3072, 2), generator)
    state = {
        "lora_unet_single_blocks_0_linear1.lora_down.weight": down,
        "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
    }
    ours = _split_linear1({**state, "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(3.0)}, 3072, Path("x"))
    theirs = FluxLoraLoaderMixin.lora_state_dict(
        {**{k: v.double() for k, v in state.items()}, "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(3.0)}
    )
    probe = torch.randn(3072, 1, generator=generator, dtype=torch.float64)
    for target in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        factor = ours[f"single_transformer_blocks.0.{target}"]
        a = theirs[f"transformer.single_transformer_blocks.0.{target}.lora_A.weight"]
        b = theirs[f"transformer.single_transformer_blocks.0.{target}.lora_B.weight"]
        # The updates compared on a random probe: B @ (A @ x) (the dense 21504 x 3072 products take seconds).
        mine = factor.scale * (factor.b.double() @ (factor.a.double() @ probe))
        assert torch.allclose(mine, b @ (a @ probe), rtol=0, atol=1e-12), target


def test_the_sft_layout_merges_exactly_as_train_merge(base: Path, tmp_path: Path, capsys) -> None:
    model = load_model(base)
    lora = LoraConfig(rank=4, alpha=8.0)
    modules = add_lora(model.transformer, lora)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(_random(tuple(parameter.shape), generator))
    save_lora(tmp_path / "sft", model.transformer, lora, modules, {"settings": model.settings.to_dict()})
    merge_lora(base, tmp_path / "sft", tmp_path / "train-merge")
    assert (
        main(
            [
                "weights",
                "lora",
                "--base",
                str(base),
                "--lora",
                str(tmp_path / "sft"),
                "--out",
                str(tmp_path / "w"),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["lora"]["layout"] == "unidg" and report["lora"]["alpha_from"] == "lora.json"
    ours, theirs = (
        load_model(tmp_path / "w").transformer.state_dict(),
        load_model(tmp_path / "train-merge").transformer.state_dict(),
    )
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)  # the same float64 fold, bit for bit
    manifest = read_manifest(tmp_path / "w", kind="weights")
    verify_files(tmp_path / "w", manifest)
    assert (
        manifest.metadata["stage"] == "merged"
        and manifest.metadata["lora"]["base_fingerprint"] == read_manifest(base).fingerprint
    )
    # The merged folder is a whole weights folder: its sampler probe runs, and `weights info` describes it.
    merged = load_model(tmp_path / "w")
    assert probe_velocity(merged, probe_inputs(merged), 1.0).isfinite().all()
    assert main(["weights", "info", str(tmp_path / "w")]) == 0
    assert "LoRA merged: lora.safetensors" in capsys.readouterr().out


MISFITS = {
    "FLUX.1-dev x_embedder": (
        lambda g: {"x_embedder.lora_A.weight": _random((4, 64), g), "x_embedder.lora_B.weight": _random((WIDTH, 4), g)},
        r"x_embedder.lora_A.weight gives x_embedder an update of shape \(128, 64\); the base's x_embedder.weight is "
        r"\(128, 384\)",
    ),
    "another width": (
        lambda g: {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": _random((4, 256), g),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": _random((768, 4), g),
        },
        r"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight gives transformer_blocks.0.attn.to_[qkv] an update "
        r"of shape \(256, 256\); the base's transformer_blocks.0.attn.to_[qkv].weight is \(128, 128\)",
    ),
    "a block the base lacks": (
        lambda g: {
            "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": _random((4, WIDTH), g),
            "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": _random((WIDTH, 4), g),
        },
        r"adapts transformer_blocks.7.attn.to_q, which the base transformer has no linear layer for",
    ),
    "text encoder keys": (
        lambda g: {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": _random((4, 8), g)},
        r"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight is a text-encoder LoRA key",
    ),
    "unknown key": (
        lambda g: {"transformer.transformer_blocks.0.attn.to_q.lora_magic.weight": _random((4, 4), g)},
        r"unknown key 'transformer.transformer_blocks.0.attn.to_q.lora_magic.weight'",
    ),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_a_lora_for_other_shapes_is_refused_by_key(base: Path, tmp_path: Path, case: str) -> None:
    make, message = MISFITS[case]
    save_file(make(torch.Generator().manual_seed(6)), tmp_path / "lora.safetensors")
    with pytest.raises(WeightsError, match=message):
        merge_lora_file(base, tmp_path / "lora.safetensors", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_truncated_or_missing_lora_files_are_refused(base: Path, tmp_path: Path, capsys) -> None:
    tensors = _kohya_keys(_bfl_lora(torch.Generator().manual_seed(7)))
    save_file(tensors, tmp_path / "lora.safetensors")
    data = (tmp_path / "lora.safetensors").read_bytes()
    (tmp_path / "lora.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match=r"lora.safetensors is not a readable safetensors file"):
        read_lora_file(tmp_path / "lora.safetensors", dict(load_model(base).transformer.config))
    half = {k: v for k, v in tensors.items() if not k.startswith("lora_unet_single_blocks_1_linear1.lora_up")}
    save_file(half, tmp_path / "half.safetensors")
    argv = [
        "weights",
        "lora",
        "--base",
        str(base),
        "--lora",
        str(tmp_path / "half.safetensors"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--quiet"]) == 2
    assert "lora_unet_single_blocks_1_linear1 lacks lora_down or lora_up" in capsys.readouterr().err
    assert (
        main(
            [
                "weights",
                "lora",
                "--base",
                str(tmp_path / "nowhere"),
                "--lora",
                str(tmp_path / "half.safetensors"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert load_file(str(tmp_path / "half.safetensors"))  # untouched
