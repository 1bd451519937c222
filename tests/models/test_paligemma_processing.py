"""The PaliGemma processor against transformers' PaliGemmaProcessor (the reference layout:
`<image>` x image_seq_length per image, `<bos>`, prompt, "\\n"), built from a tiny tokenizer and
the SigLIP PIL image processor (no torchvision); left padding, buckets, image layouts, static
shapes, and the processor's features through the backbone equal to transformers on them."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from ml_collections import ConfigDict
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from metaembed_jax.models.family import Processor
from metaembed_jax.models.paligemma import tiny_config
from metaembed_jax.models.paligemma.config import SPECIAL_TOKENS
from metaembed_jax.models.paligemma.processing import (
    PaliGemmaInputProcessor,
    make_processor,
    static_shapes,
)

CORPUS = (
    "Query: a large red circle at the top left and a small blue square in the center.",
    "Describe the image. A small green triangle at the bottom right.",
    "What was the revenue of Valoria in 2019? The quick brown fox jumps over the lazy dog.",
)
TOKENS_PER_IMAGE = 4  # 28 px / 14 px patches


def build_tokenizer(out_dir=None):
    """A tiny byte-level BPE tokenizer whose first ids are <pad> <eos> <bos> <image> (Gemma's)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        additional_special_tokens=["<image>"],
        padding_side="left",
    )
    if out_dir is not None:
        wrapped.save_pretrained(out_dir)
    return wrapped


def images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)) for _ in range(count)
    ]


def siglip(size=28):
    processor = transformers.SiglipImageProcessorPil(size={"height": size, "width": size})
    processor.image_seq_length = (size // 14) ** 2
    return processor


@pytest.fixture(scope="module")
def reference():
    """transformers' PaliGemmaProcessor on its own copy of the tokenizer (it adds tokens)."""
    return transformers.PaliGemmaProcessor(image_processor=siglip(), tokenizer=build_tokenizer())


def unpadded(features, row):
    mask = features["attention_mask"][row].astype(bool)
    return features["input_ids"][row][mask].tolist()


def test_rows_match_paligemma_processor(reference):
    ours = PaliGemmaInputProcessor(build_tokenizer(), 28, length_buckets=(64, 128), max_images=2)
    row_images = [images(1, 0), images(2, 1), images(1, 2)]
    texts = ["a large red circle", "the lazy dog", ""]
    query = ours(texts, row_images, side="query")
    candidate = ours(texts, row_images, side="candidate")
    for row, (text, imgs) in enumerate(zip(texts, row_images, strict=True)):
        for side, features, prefix in (("query", query, "Query: "), ("candidate", candidate, "")):
            prompt = prefix + (text or "Describe the image.")
            expected = reference(images=[imgs], text=[prompt], return_tensors="np")
            assert unpadded(features, row) == expected["input_ids"][0].tolist(), (side, row)
            np.testing.assert_allclose(
                features["pixel_values"][row, : len(imgs)], expected["pixel_values"], atol=1e-6
            )
    # Left padding to the smallest bucket; zero images past each row's own.
    assert query["input_ids"].shape == (3, 64)
    assert query["attention_mask"][:, -1].all() and not query["attention_mask"][:, 0].any()
    assert query["pixel_values"].shape == (3, 2, 3, 28, 28)
    assert not query["pixel_values"][0, 1].any() and query["pixel_values"][1, 1].any()


def test_text_only_row_layout():
    """PaliGemmaProcessor refuses text without images; its layout rule (transcribed: `<bos>`,
    prompt, "\\n", no image tokens) is what a text-only row gets."""
    tokenizer = build_tokenizer()
    ours = PaliGemmaInputProcessor(tokenizer, 28, length_buckets=None)
    features = ours(["the quick brown fox"], None, side="query")
    expected = tokenizer("<bos>Query: the quick brown fox\n", add_special_tokens=False)
    assert features["input_ids"][0].tolist() == expected["input_ids"]
    assert "pixel_values" not in features


def test_packed_layout_and_truncation():
    ours = PaliGemmaInputProcessor(
        build_tokenizer(), 28, length_buckets=(16,), max_images=1, image_layout="packed"
    )
    long_text = "the quick brown fox jumps over the lazy dog " * 3
    features = ours([long_text, "dog"], [images(1), []], side="candidate")
    assert features["input_ids"].shape == (2, 16)
    assert features["pixel_values"].shape == (2, 3, 28, 28)
    row = features["input_ids"][0].tolist()
    assert row[:TOKENS_PER_IMAGE] == [ours.image_token_id] * TOKENS_PER_IMAGE  # images kept
    assert row[TOKENS_PER_IMAGE] == 2 and row[-1] == ours.tokenizer.encode("\n")[0]
    strict = PaliGemmaInputProcessor(
        build_tokenizer(), 28, length_buckets=(16,), truncation="error"
    )
    with pytest.raises(ValueError, match="exceed max_length=16"):
        strict([long_text], None, side="query")
    with pytest.raises(ValueError, match="more than max_images=1"):
        ours(["a"], [images(2)], side="query")
    with pytest.raises(ValueError, match="empty text and no image"):
        ours([""], None, side="query")


def data_config(tmp_path, **overrides):
    config = ConfigDict(
        dict(
            dir=str(tmp_path),
            length_buckets=(32, 64),
            max_images=1,
            image_layout="per_example",
            max_pixels=28 * 28,
        )
    )
    config.update(overrides)
    return config


def test_make_processor_and_static_shapes(tmp_path):
    build_tokenizer(tmp_path / "tokenizer")
    processor = make_processor(data_config(tmp_path))  # image side sqrt(max_pixels) = 28
    assert processor.image_size == 28 and processor.image_seq_length == TOKENS_PER_IMAGE
    build_tokenizer(tmp_path / "checkpoint")
    siglip(42).save_pretrained(tmp_path / "checkpoint")  # a checkpoint's preprocessor config wins
    assert make_processor(data_config(tmp_path), tmp_path / "checkpoint").image_size == 42
    assert isinstance(processor, Processor)
    processor.save_pretrained(tmp_path / "saved")
    reloaded = make_processor(data_config(tmp_path, max_pixels=56 * 56), tmp_path / "saved")
    assert reloaded.image_size == 28 and reloaded.pad_token_id == processor.pad_token_id == 0
    text_only = processor(["a red circle", "dog"], None, side="query")
    assert text_only["pixel_values"].shape == (2, 1, 3, 28, 28)  # max_images set: always emitted
    padded = static_shapes(data_config(tmp_path), 2)(text_only)
    assert padded["pixel_values"].shape == (2, 1, 3, 28, 28) and not padded["pixel_values"].any()
    packed_config = data_config(tmp_path, image_layout="packed")
    features = make_processor(packed_config)(["a"], [images(1)], side="query")
    packed = static_shapes(packed_config, 3, multiple=4)(features)["pixel_values"]
    assert packed.shape == (4, 3, 28, 28)
    np.testing.assert_array_equal(packed[:1], features["pixel_values"])
    assert not packed[1:].any()


def test_processor_features_through_the_backbone(tmp_path):
    """Our processor's features (per-example images) through our backbone equal transformers'
    model on transformers' processor output (float32)."""
    from metaembed_jax.models import load_hf

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    hf_model = transformers.PaliGemmaForConditionalGeneration(
        transformers.PaliGemmaConfig(**config)
    )
    hf_model.eval().save_pretrained(tmp_path)
    model = load_hf(tmp_path, dtype=jnp.float32)
    ours = PaliGemmaInputProcessor(tokenizer, 28, length_buckets=(64,), max_images=1)
    row_images = [images(1, 3), []]
    features = ours(["a red circle", "a small blue square in the center"], row_images, side="query")
    hidden = np.asarray(model(**features))
    reference_processor = transformers.PaliGemmaProcessor(siglip(), build_tokenizer())
    for row in range(2):
        real = features["attention_mask"][row].astype(bool)
        ids = torch.from_numpy(features["input_ids"][row][real][None]).long()
        kwargs = {"input_ids": ids}
        if row_images[row]:
            kwargs["pixel_values"] = torch.from_numpy(
                reference_processor.image_processor(row_images[row], return_tensors="np")[
                    "pixel_values"
                ]
            )
        with torch.no_grad():
            # one row without padding: force transformers' causal path (see test_paligemma)
            kwargs["token_type_ids"] = torch.ones_like(ids)
            expected = hf_model.model(**kwargs).last_hidden_state[0].numpy()
        np.testing.assert_allclose(hidden[row][real], expected, atol=1e-4)
