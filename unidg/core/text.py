"""UniDG-Text's tokenization contract, shared by the torch encoders (train/), their export and the lean runtime.

FluxPipeline's conventions: CLIP-L's ids are padded and truncated to 77 (its pooled output feeds
``pooled_projections``), T5's to ``max_sequence_length`` = 512 (its hidden states are the text tokens); neither
encoder is given an attention mask. A FLUX pipeline folder keeps them in these subfolders (diffusers layout).
"""

from __future__ import annotations

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
CLIP_ENCODER_FOLDER = "text_encoder"
T5_ENCODER_FOLDER = "text_encoder_2"
CLIP_TOKENIZER_FOLDER = "tokenizer"
T5_TOKENIZER_FOLDER = "tokenizer_2"
FLUX_TEXT_FOLDERS = (CLIP_ENCODER_FOLDER, T5_ENCODER_FOLDER, CLIP_TOKENIZER_FOLDER, T5_TOKENIZER_FOLDER)
TOKENIZER_FILE = "tokenizer.json"  # the `tokenizers` serialization that the runtime reads
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # transformers' settings beside it (pad token, model_max_length)
# The two encoder graphs of a text bundle: name -> (inputs, outputs). Ids are int64, outputs float32.
CLIP_GRAPH = "clip_text"
T5_GRAPH = "t5_text"
TEXT_GRAPH_IO = {
    CLIP_GRAPH: (("input_ids",), ("pooled",)),  # (B, 77) -> (B, CLIP width)
    T5_GRAPH: (("input_ids",), ("hidden",)),  # (B, L <= 512) -> (B, L, T5 width)
}
