"""Model presets: the real FLUX.1-Fill + Redux dimensions (``full``) and a tiny model of the same classes (``nano``).

A preset only describes shapes; weights come from a local folder (``unidg.train.loading``) or from random
initialisation (``UniDGModel.from_preset``). The classes are always diffusers' ``FluxTransformer2DModel``,
``AutoencoderKL`` and ``ReduxImageEncoder`` and transformers' ``SiglipVisionModel``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from unidg.core.errors import UniDGError
from unidg.core.latents import COND_CHANNELS as CONDITION_CHANNELS
from unidg.core.latents import LATENT_CHANNELS, PACKED_CHANNELS, VAE_SCALE, VAE_SHIFT
from unidg.core.settings import UniDGSettings

# Fixed by the Fill layout (unidg.core.latents): 16 latent channels packed 2x2 -> 64 per token; the pixel mask of
# one token is 2x2 latent pixels x 8x8 pixels -> 256; transformer input = noisy latents 64 + masked latents 64 + mask.
TRANSFORMER_IN_CHANNELS = PACKED_CHANNELS + CONDITION_CHANNELS


class ModelParams:
    """The keyword arguments of one model class, as dataclass fields."""

    def config(self) -> dict:
        """The constructor's keyword arguments (a part whose class wants lists or derived keys adds them)."""
        return asdict(self)


@dataclass(frozen=True)
class TransformerParams(ModelParams):
    """Keyword arguments of diffusers' ``FluxTransformer2DModel``."""

    num_layers: int
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    pooled_projection_dim: int
    axes_dims_rope: tuple[int, int, int]
    in_channels: int = TRANSFORMER_IN_CHANNELS
    out_channels: int = PACKED_CHANNELS
    guidance_embeds: bool = True
    patch_size: int = 1

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise UniDGError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if any(dim % 2 for dim in self.axes_dims_rope):
            raise UniDGError(f"axes_dims_rope {self.axes_dims_rope} must be even (RoPE rotates pairs)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def config(self) -> dict:
        config = super().config()
        config["axes_dims_rope"] = list(self.axes_dims_rope)
        return config


@dataclass(frozen=True)
class VaeParams(ModelParams):
    """Keyword arguments of diffusers' ``AutoencoderKL`` in the FLUX layout (no quant convs, 8x downsampling)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    sample_size: int
    latent_channels: int = LATENT_CHANNELS
    scaling_factor: float = VAE_SCALE
    shift_factor: float = VAE_SHIFT
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    act_fn: str = "silu"
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        if len(self.block_out_channels) != 4:
            raise UniDGError(f"the Fill layout needs an 8x VAE: 4 blocks (got {self.block_out_channels})")

    def config(self) -> dict:
        config = super().config()
        blocks = len(self.block_out_channels)
        config["block_out_channels"] = list(self.block_out_channels)
        config["down_block_types"] = ["DownEncoderBlock2D"] * blocks
        config["up_block_types"] = ["UpDecoderBlock2D"] * blocks
        return config


@dataclass(frozen=True)
class ImageEncoderParams(ModelParams):
    """Keyword arguments of transformers' ``SiglipVisionConfig`` (the Redux reference encoder)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    vision_use_head: bool = True  # so400m ships a pooling head; Redux reads last_hidden_state and never uses it
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ReduxParams(ModelParams):
    """Keyword arguments of diffusers' ``ReduxImageEncoder``."""

    redux_dim: int
    txt_in_features: int


@dataclass(frozen=True)
class UniDGPreset:
    name: str
    transformer: TransformerParams
    vae: VaeParams
    image_encoder: ImageEncoderParams
    redux: ReduxParams
    settings: UniDGSettings = field(default_factory=UniDGSettings)

    def __post_init__(self) -> None:
        if self.redux.redux_dim != self.image_encoder.hidden_size:
            raise UniDGError(f"{self.name}: redux_dim must equal the image encoder's hidden_size")
        if self.redux.txt_in_features != self.transformer.joint_attention_dim:
            raise UniDGError(f"{self.name}: Redux txt_in_features must equal the transformer's joint_attention_dim")

    @property
    def reference_size(self) -> int:
        """Side of the square the reference is resized to before SigLIP (384 for so400m)."""
        return self.image_encoder.image_size

    @property
    def reference_tokens(self) -> int:
        """R: Redux tokens per reference (729 for so400m at 384 px)."""
        return self.image_encoder.num_tokens


# The transformer's and the image encoder's widths in their fields' order. TransformerParams: num_layers,
# num_single_layers, attention_head_dim, num_attention_heads, joint_attention_dim, pooled_projection_dim,
# axes_dims_rope. ImageEncoderParams: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
# patch_size, image_size.
FULL = UniDGPreset(
    name="full",
    transformer=TransformerParams(19, 38, 128, 24, 4096, 768, (16, 56, 56)),
    vae=VaeParams(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024),
    image_encoder=ImageEncoderParams(1152, 4304, 27, 16, 14, 384),
    redux=ReduxParams(redux_dim=1152, txt_in_features=4096),
    settings=UniDGSettings(),
)

# Same classes at tiny widths: trains and samples on a laptop CPU (the shipped demo model and the tests).
NANO = UniDGPreset(
    name="nano",
    transformer=TransformerParams(2, 4, 32, 4, 64, 32, (8, 12, 12)),
    # 8 groups: 4 channels per group at width 32, as in the FLUX autoencoder (128 wide, 32 groups).
    vae=VaeParams(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=256),
    image_encoder=ImageEncoderParams(64, 256, 2, 4, 8, 64, vision_use_head=False),
    redux=ReduxParams(redux_dim=64, txt_in_features=64),
    # Trained from scratch without guidance distillation: guidance is a constant input, 1.0 by convention.
    settings=UniDGSettings(resolution=256, text_tokens=8, steps=28, guidance=1.0),
)

PRESETS: dict[str, UniDGPreset] = {preset.name: preset for preset in (FULL, NANO)}


def get_preset(preset: str | UniDGPreset) -> UniDGPreset:
    """A preset by name (``"full"``, ``"nano"``), or the preset itself."""
    if isinstance(preset, UniDGPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise UniDGError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}") from None
