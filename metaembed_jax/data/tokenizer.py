"""A small byte-level BPE tokenizer carrying a backbone family's special tokens.

Real runs use the checkpoint's own tokenizer; the built-in dataset and the tests use one trained
here on the dataset's text, so that `AutoTokenizer.from_pretrained(dir)` works offline and the
processor sees the special tokens of the configured family (`BackboneFamily.special_tokens`,
e.g. Qwen2-VL's `<|image_pad|>`). The special tokens take the first ids, in the family's order,
so a tiny model config can hard-wire them; the first one is the pad token.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Qwen2's pre-tokenizer split (single digits, letters runs, punctuation runs, whitespace), so that
# the small tokenizer segments text the way the real one does.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Words of the MetaEmbed prompt templates, so that they get their own merges.
TEMPLATE_TEXTS = ("user\n", "Query: ", "Describe the image.", "\n")


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    special_tokens: Sequence[str],
    vocab_size: int = 1024,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on `texts` and saves it to `out_dir`.

    Args:
      texts: training text (any iterable of strings; consumed once).
      out_dir: directory written with `tokenizer.json`, `tokenizer_config.json` and
        `special_tokens_map.json`; `AutoTokenizer.from_pretrained(out_dir)` loads it offline.
      special_tokens: the family's special tokens (`BackboneFamily.special_tokens`), given ids
        0, 1, ... in this order; the first is the pad token.
      vocab_size: target vocabulary size including the 256 byte symbols and the special tokens.
      min_frequency: minimum pair count for a merge.

    Returns:
      The tokenizer, padding side left.

    Raises:
      ValueError: no special tokens, or a `vocab_size` that cannot hold the byte alphabet and them.
    """
    special_tokens = list(special_tokens)
    if not special_tokens:
        raise ValueError("special_tokens is empty: expected the family's tokens, pad token first")
    minimum = 256 + len(special_tokens)
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
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_with_templates(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=special_tokens[0],
        unk_token=None,
        additional_special_tokens=special_tokens[1:],
        padding_side="left",
        model_max_length=32768,
    )
    os.makedirs(out_dir, exist_ok=True)
    wrapped.save_pretrained(os.fspath(out_dir))
    return wrapped


def _with_templates(texts: Iterable[str]) -> Iterable[str]:
    yield from TEMPLATE_TEXTS
    yield from texts
