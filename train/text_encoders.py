"""UniDG-Text's text branch: FLUX's CLIP-L and T5-XXL encoders and their tokenizers, from a local folder only.

Reference mode (what the product ships) never loads these: its text branch is zeros. UniDG-Text (paper App. B.3)
encodes an instruction the way diffusers' FluxPipeline does:

* CLIP-L (``text_encoder/`` + ``tokenizer/``): padded to 77 tokens with truncation, no attention mask given to the
  model; its ``pooler_output`` is the transformer's ``pooled_projections``;
* T5-XXL (``text_encoder_2/`` + ``tokenizer_2/``): padded to ``max_length`` (512) with truncation, no attention mask
  given to the model; its last hidden state is the transformer's ``encoder_hidden_states``; ``txt_ids`` are zeros.

The folder is a FLUX pipeline download (diffusers layout), one of its ``models--ORG--NAME`` cache folders or a repo id
in an offline Hugging Face cache, or what ``save_text_encoders`` writes. ``make_text_encoders("nano")`` builds tiny
random encoders with tiny tokenizers trained offline on UniDG instructions (a byte-level BPE with CLIP's
normalisation and pre-tokenisation, a Unigram with T5's Metaspace), wrapped in transformers' own tokenizer classes so
their folders have FLUX's layout; they are for tests and the nano model, never for quality.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from unidg.core.errors import UniDGError
from unidg.core.instructions import ATTRIBUTE_FIELDS, REFERENCE_INSTRUCTION, instruction
from unidg.core.manifest import WeightsError
from unidg.core.text import CLIP_MAX_LENGTH, FLUX_TEXT_FOLDERS, T5_MAX_LENGTH
from unidg.core.udg import CATEGORIES, caption_stub
from unidg.train.weights_import import resolve_location

CLIP_MODEL_TYPE = "clip_text_model"
T5_MODEL_TYPE = "t5"
# CLIP's pre-tokenisation (transformers' CLIPTokenizer): special tokens, contractions, letter runs, single digits,
# runs of other non-space characters.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"


class TextEncoderError(UniDGError):
    """A text-encoder folder or instruction that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class TextParams:
    """Widths of the two encoders; CLIP's width is the transformer's pooled_projection_dim, T5's its
    joint_attention_dim."""

    clip_hidden: int
    clip_layers: int
    clip_heads: int
    clip_intermediate: int
    t5_d_model: int
    t5_d_ff: int
    t5_d_kv: int
    t5_heads: int
    t5_layers: int
    clip_vocab: int = 49408
    t5_vocab: int = 32128

    def clip_config(self, tokenizer: CLIPTokenizer | None = None) -> CLIPTextConfig:
        ids = {}
        if tokenizer is not None:  # tiny tokenizers put their special tokens elsewhere than CLIP's 49406/49407
            ids = dict(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        return CLIPTextConfig(
            **{"vocab_size": self.clip_vocab, **ids},
            hidden_size=self.clip_hidden,
            intermediate_size=self.clip_intermediate,
            num_hidden_layers=self.clip_layers,
            num_attention_heads=self.clip_heads,
            projection_dim=self.clip_hidden,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act="quick_gelu",
        )

    def t5_config(self, tokenizer: T5Tokenizer | None = None) -> T5Config:
        return T5Config(
            vocab_size=len(tokenizer) if tokenizer is not None else self.t5_vocab,
            d_model=self.t5_d_model,
            d_ff=self.t5_d_ff,
            d_kv=self.t5_d_kv,
            num_heads=self.t5_heads,
            num_layers=self.t5_layers,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
            dropout_rate=0.0,
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
        )


# One row a preset, the columns TextParams' fields in order: CLIP hidden, layers, heads, intermediate; T5 d_model, d_ff,
# d_kv, heads, layers. full: FLUX's encoders (openai/clip-vit-large-patch14's text tower, google/t5-v1_1-xxl's
# encoder); nano: the nano transformer's widths (pooled_projection_dim 32, joint_attention_dim 64).
FULL_TEXT = TextParams(768, 12, 12, 3072, 4096, 10240, 64, 64, 24)
NANO_TEXT = TextParams(32, 2, 2, 64, 64, 128, 16, 4, 2)
TEXT_PRESETS = {"full": FULL_TEXT, "nano": NANO_TEXT}


# ---------------------------------------------------------------------------------------------- tiny tokenizers
_ATTRIBUTE_WORDS = {
    "size": ("small", "large", "tiny", "medium-sized"),
    "severity": ("slight", "severe"),
    "shape": ("linear", "round", "irregular", "elongated"),
    "edge": ("sharp", "blurry"),
    "contrast": ("high-contrast", "low-contrast"),
    "color": ("dark grey", "brown", "white", "reddish"),
    "direction": ("horizontal", "vertical", "diagonal"),
}


def instruction_corpus(count: int, seed: int = 0) -> list[str]:
    """``count`` instructions of both forms over every category, with attribute words drawn by ``seed``."""
    rng = random.Random(seed)
    texts = []
    for index in range(count):
        category = CATEGORIES[index % len(CATEGORIES)]
        caption = caption_stub(category, "metal plate")
        for name in ATTRIBUTE_FIELDS:
            caption["defect-level"][0][name] = rng.choice(_ATTRIBUTE_WORDS[name] + ("unknown",))
        with_reference = index % 7 == 0
        texts.append(instruction(caption, category, with_reference=with_reference, seed=seed, sample_id=str(index)))
    return texts


def _byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def build_clip_tokenizer(corpus: list[str], merges: int = 200) -> CLIPTokenizer:
    """A tiny CLIP tokenizer: byte-level BPE learnt on ``corpus`` with CLIP's normalisation and pre-tokenisation,
    its vocabulary laid out as CLIP's (256 bytes, the same with ``</w>``, the merges, then the two special tokens)."""
    backend = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = _byte_alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + merges,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    learnt = [tuple(pair) for pair in json.loads(backend.to_str())["model"]["merges"]]
    vocab: dict[str, int] = {}
    for token in alphabet + [f"{char}</w>" for char in alphabet] + ["".join(pair) for pair in learnt]:
        vocab.setdefault(token, len(vocab))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=learnt, model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer(corpus: list[str], vocab_size: int = 300, extra_ids: int = 8) -> T5Tokenizer:
    """A tiny T5 tokenizer: a Unigram learnt on ``corpus`` behind T5's Metaspace pre-tokenisation, with T5's
    ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 and ``extra_ids`` sentinels."""
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=[T5_PAD, T5_EOS, T5_UNK], unk_token=T5_UNK, show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=extra_ids, model_max_length=T5_MAX_LENGTH)


# ---------------------------------------------------------------------------------------------- the encoders
class TextEncoders(nn.Module):
    """CLIP-L + T5 and their tokenizers; ``encode`` turns instructions into the transformer's text inputs."""

    def __init__(
        self,
        clip: CLIPTextModel,
        t5: T5EncoderModel,
        clip_tokenizer: CLIPTokenizer,
        t5_tokenizer: T5Tokenizer,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.t5 = t5
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer

    @property
    def pooled_dim(self) -> int:
        return self.clip.config.hidden_size

    @property
    def hidden_dim(self) -> int:
        return self.t5.config.d_model

    def check_transformer(self, pooled_projection_dim: int, joint_attention_dim: int) -> None:
        """Refuse encoders whose widths do not feed this transformer (another FLUX size, or nano vs full)."""
        if (self.pooled_dim, self.hidden_dim) != (pooled_projection_dim, joint_attention_dim):
            raise TextEncoderError(
                f"text encoders of widths CLIP {self.pooled_dim} / T5 {self.hidden_dim} do not feed a transformer "
                f"with pooled_projection_dim {pooled_projection_dim} / joint_attention_dim {joint_attention_dim}; "
                "load the text encoders of the same FLUX model (or preset)"
            )

    def tokenize(self, texts: list[str], max_length: int = T5_MAX_LENGTH) -> dict[str, torch.Tensor]:
        """FluxPipeline's tokenization: CLIP ids padded/truncated to 77, T5 ids padded/truncated to ``max_length``
        (with their attention masks, which the encoders are not given, as in FluxPipeline)."""
        if isinstance(texts, str) or not texts:
            raise TextEncoderError("instructions: pass a non-empty list of strings")
        clip = self.clip_tokenizer(
            texts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        )
        t5 = self.t5_tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return {
            "clip_ids": clip.input_ids,
            "clip_mask": clip.attention_mask,
            "t5_ids": t5.input_ids,
            "t5_mask": t5.attention_mask,
        }

    def encode_ids(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids -> (pooled (B, clip width), hidden (B, len, T5 width)), in the encoders' dtypes."""
        device = next(self.clip.parameters()).device
        pooled = self.clip(input_ids=clip_ids.to(device), output_hidden_states=False).pooler_output
        hidden = self.t5(input_ids=t5_ids.to(next(self.t5.parameters()).device)).last_hidden_state
        return pooled, hidden

    @torch.no_grad()
    def encode(self, texts: list[str], max_length: int = T5_MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """Instructions -> (pooled_projections (B, clip width), encoder_hidden_states (B, max_length, T5 width))."""
        ids = self.tokenize(texts, max_length)
        return self.encode_ids(ids["clip_ids"], ids["t5_ids"])


def make_text_encoders(
    preset: str | TextParams = "nano", seed: int = 0, corpus: list[str] | None = None
) -> TextEncoders:
    """Randomly initialised encoders of a preset's widths with tiny tokenizers trained on ``corpus`` (default: 400
    UniDG instructions). For tests and the nano model; the full preset's shapes are for speed measurements only."""
    params = TEXT_PRESETS[preset] if isinstance(preset, str) else preset
    corpus = corpus if corpus is not None else instruction_corpus(400) + [REFERENCE_INSTRUCTION]
    clip_tokenizer = build_clip_tokenizer(corpus)
    t5_tokenizer = build_t5_tokenizer(corpus)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(params.clip_config(clip_tokenizer))
        t5 = T5EncoderModel(params.t5_config(t5_tokenizer))
    return TextEncoders(clip.eval(), t5.eval(), clip_tokenizer, t5_tokenizer)


def save_text_encoders(encoders: TextEncoders, folder: str | Path) -> Path:
    """Write the four FLUX folders (text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) into ``folder``."""
    folder = Path(folder)
    clip_folder, t5_folder, clip_tok_folder, t5_tok_folder = (folder / name for name in FLUX_TEXT_FOLDERS)
    encoders.clip.save_pretrained(clip_folder, safe_serialization=True)
    encoders.t5.save_pretrained(t5_folder, safe_serialization=True)
    save_tokenizer(encoders.clip_tokenizer, clip_tok_folder)
    save_tokenizer(encoders.t5_tokenizer, t5_tok_folder)
    return folder


def save_tokenizer(tokenizer: CLIPTokenizer | T5Tokenizer, folder: Path) -> None:
    """``save_pretrained`` without the padding and truncation of the last call, which tokenizer.json would keep
    (transformers sets both again on every call, so clearing them changes nothing for it)."""
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.save_pretrained(folder)


def _model_type(folder: Path, expected: str, what: str) -> None:
    config_path = folder / "config.json"
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as error:
        raise WeightsError(
            f"{folder}: {config_path.name} is missing or unreadable ({error}); a FLUX pipeline folder holds the "
            f"{what} there"
        ) from error
    if model_type != expected:
        raise WeightsError(f"{config_path} describes a {model_type!r} model; the {what} is a {expected!r} model")


def load_text_encoders(
    location: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    hf_cache: str | Path | None = None,
) -> TextEncoders:
    """CLIP-L + T5 and their tokenizers from a FLUX pipeline folder (or an offline Hugging Face cache entry); local
    files only, never a download."""
    root = resolve_location(str(location), "--text-encoders", hf_cache)
    missing = [name for name in FLUX_TEXT_FOLDERS if not (root / name).is_dir()]
    if missing:
        raise WeightsError(
            f"--text-encoders {root}: no {', '.join(f'{name}/' for name in missing)} in it; pass a FLUX.1 pipeline "
            f"folder (diffusers layout: {', '.join(f'{name}/' for name in FLUX_TEXT_FOLDERS)})"
        )
    clip_folder, t5_folder, clip_tok_folder, t5_tok_folder = (root / name for name in FLUX_TEXT_FOLDERS)
    _model_type(clip_folder, CLIP_MODEL_TYPE, "CLIP text encoder")
    _model_type(t5_folder, T5_MODEL_TYPE, "T5 encoder")
    common = {"local_files_only": True}
    clip = CLIPTextModel.from_pretrained(clip_folder, dtype=dtype, **common)
    t5 = T5EncoderModel.from_pretrained(t5_folder, dtype=dtype, **common)
    clip_tokenizer = CLIPTokenizer.from_pretrained(clip_tok_folder, **common)
    t5_tokenizer = T5Tokenizer.from_pretrained(t5_tok_folder, **common)
    return TextEncoders(clip, t5, clip_tokenizer, t5_tokenizer).to(device).eval()
