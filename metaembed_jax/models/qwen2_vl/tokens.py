"""The Qwen2-VL special tokens: what the prompts use and what the built-in tokenizer must carry.

The built-in tokenizer puts a family's special tokens first, in the order of `SPECIAL_TOKENS`
(ids 0..7 here), so that `tiny.tiny_config` can hard-wire the ids the prompts produce.
"""

from __future__ import annotations

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# The pad token first: the built-in tokenizer pads with its first special token.
SPECIAL_TOKENS = (
    PAD_TOKEN,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    VISION_PAD,
    IMAGE_PAD,
    VIDEO_PAD,
)
# Their ids in the built-in tokenizer (position in SPECIAL_TOKENS).
PAD_ID, VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = (
    SPECIAL_TOKENS.index(token)
    for token in (PAD_TOKEN, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
)

# config.json field -> special token, for a model config that fits a tokenizer.
_CONFIG_FIELDS = {
    "pad_token_id": PAD_TOKEN,
    "bos_token_id": PAD_TOKEN,  # Qwen2-VL configs use <|endoftext|> as bos as well
    "eos_token_id": IM_END,
    "im_start_token_id": IM_START,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
    "image_token_id": IMAGE_PAD,
    "video_token_id": VIDEO_PAD,
}


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the special tokens a Qwen2-VL model config needs, by config field name.

    Raises:
      ValueError: if a token is missing from the vocabulary or not a single token.
    """
    ids = {}
    for field, token in _CONFIG_FIELDS.items():
        encoded = tokenizer.encode(token, add_special_tokens=False)
        token_id = tokenizer.convert_tokens_to_ids(token)
        if len(encoded) != 1 or token_id is None or encoded[0] != token_id:
            raise ValueError(
                f"tokenizer has no single special token {token!r} (encodes to {encoded}); "
                "a Qwen2-VL tokenizer with the vision special tokens is expected"
            )
        ids[field] = int(token_id)
    return ids
