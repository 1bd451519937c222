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
