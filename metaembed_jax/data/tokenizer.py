"""A small byte-level BPE tokenizer carrying the Qwen2-VL special tokens.

Real runs use the checkpoint's own tokenizer; the built-in dataset and the tests use one trained
here on the dataset's text, so that `AutoTokenizer.from_pretrained(dir)` works offline and the
processor sees the same special tokens as with Qwen2.5-VL.

The special tokens take the first ids (0..7, order of `SPECIAL_TOKENS`), so a tiny model config
can hard-wire them; `special_token_ids` returns them by name for the model config.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
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

# Qwen2's pre-tokenizer split (single digits, letters runs, punctuation runs, whitespace), so that
# the small tokenizer segments text the way the real one does.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Text of the prompt templates (processing.py), so their words get their own merges.
TEMPLATE_TEXTS = ("user\n", "Query: ", "Describe the image.", "\n")


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on `texts` and saves it to `out_dir`.

    Args:
      texts: training text (any iterable of strings; consumed once).
      out_dir: directory written with `tokenizer.json`, `tokenizer_config.json` and
        `special_tokens_map.json`; `AutoTokenizer.from_pretrained(out_dir)` loads it offline.
      vocab_size: target vocabulary size including the 256 byte symbols and the special tokens.
      min_frequency: minimum pair count for a merge.

    Returns:
      The tokenizer, padding side left, pad token `<|endoftext|>`.

    Raises:
      ValueError: if `vocab_size` cannot hold the byte alphabet and the special tokens.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {minimum}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_with_templates(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, IM_END)],
        padding_side="left",
        model_max_length=32768,
    )
    os.makedirs(out_dir, exist_ok=True)
    wrapped.save_pretrained(os.fspath(out_dir))
    return wrapped


def _with_templates(texts: Iterable[str]) -> Iterable[str]:
    yield from TEMPLATE_TEXTS
    yield from texts


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Loads a tokenizer directory offline (`AutoTokenizer`), checking the Qwen special tokens.

    Raises:
      FileNotFoundError: if `path` holds no tokenizer files.
      ValueError: if one of the Qwen vision/chat special tokens is not a single known token.
    """
    path = os.fspath(path)
    if not os.path.isdir(path) or not any(
        os.path.exists(os.path.join(path, name))
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json, ...) in {path!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    special_token_ids(tokenizer)  # validates
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the special tokens a Qwen2-VL model config needs, by config field name.

    Raises:
      ValueError: if a token is missing from the vocabulary or not a single token.
    """
    names = {
        "pad_token_id": PAD_TOKEN,
        "bos_token_id": PAD_TOKEN,  # Qwen2-VL configs use <|endoftext|> as bos as well
        "eos_token_id": IM_END,
        "im_start_token_id": IM_START,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "image_token_id": IMAGE_PAD,
        "video_token_id": VIDEO_PAD,
    }
    ids = {}
    for field, token in names.items():
        encoded = tokenizer.encode(token, add_special_tokens=False)
        token_id = tokenizer.convert_tokens_to_ids(token)
        if len(encoded) != 1 or token_id is None or encoded[0] != token_id:
            raise ValueError(
                f"tokenizer has no single special token {token!r} (encodes to {encoded}); "
                "a Qwen2-VL tokenizer with the vision special tokens is expected"
            )
        ids[field] = int(token_id)
    return ids


# Fixed text for tests and quick experiments: covers the template words and common captions.
_TEST_CORPUS = (
    "Query: a large red circle at the top left and a small blue square in the center.",
    "Describe the image. A small green triangle at the bottom right.",
    "make the yellow star purple. move the black cross to the top. remove the orange diamond.",
    "What was the revenue of Valoria in 2019? Founded in 1987. Staff 420. Profit Year Table",
    "The quick brown fox jumps over the lazy dog 0123456789, with the word cat.",
)


def build_test_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 320):
    """A tiny tokenizer for tests: trained on a fixed corpus, saved to `out_dir`, returned."""
    return train_tokenizer(_TEST_CORPUS * 4, out_dir, vocab_size=vocab_size, min_frequency=2)
