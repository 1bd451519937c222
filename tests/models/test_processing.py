"""QwenVLProcessor against transformers' own Qwen2VLProcessor / image processor / tokenizer."""

import io
import json
import pickle
from unittest import mock

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from metaembed_jax.models.processing import BadRowError, decode_image
from metaembed_jax.models.qwen2_vl.config import SPECIAL_TOKENS
from metaembed_jax.models.qwen2_vl.processing import QwenVLProcessor
from tests.helpers import (
    build_test_tokenizer,
    check_features,
    process_records,
    special_token_ids,
)

MIN_PIXELS, MAX_PIXELS = 28 * 28, 56 * 56


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_test_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def _image(height, width, seed=0):
    pixels = np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _hf_processor(tokenizer):
    """transformers' Qwen2VLProcessor; its class check wants torchvision's video processor."""
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    target = "transformers.processing_utils.ProcessorMixin.check_argument_for_proper_class"
    with mock.patch(target, lambda *args, **kwargs: None):
        return Qwen2VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None
        )


def _reference_prompt(text, num_images, prefix):
    """The reference templates (docs/design.md), written out independently of processing.py."""
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
    body = text if text else "Describe the image."
    return f"<|im_start|>user\n{vision}{prefix}{body}<|im_end|><|endoftext|>"


BATCH_TEXTS = ["a red circle at the top left", "", "make the blue square small", "hi"]
BATCH_IMAGES = [[], [_image(60, 90, 1)], [_image(56, 56, 2), _image(30, 100, 3)], []]


@pytest.mark.parametrize("side,prefix", [("query", "Query: "), ("candidate", "")])
def test_matches_hf_qwen2vl_processor(tokenizer, side, prefix):
    """Same input_ids / mask / pixel_values / grid as HF's processor on the reference prompts."""
    proc = QwenVLProcessor(
        tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, length_buckets=None
    )
    ours = proc(BATCH_TEXTS, BATCH_IMAGES, side=side)
    prompts = [
        _reference_prompt(t, len(i), prefix) for t, i in zip(BATCH_TEXTS, BATCH_IMAGES, strict=True)
    ]
    tokenizer.padding_side = "left"
    flat = [image for row in BATCH_IMAGES for image in row]
    ref = _hf_processor(tokenizer)(text=prompts, images=flat, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["input_ids"].dtype == np.int32 and ours["image_grid_thw"].dtype == np.int32
    assert ours["pixel_values"].dtype == np.float32


def test_buckets_left_padding_and_tokenizer_parity(tokenizer):
    """L is the smallest bucket that fits; each row = tokenizer(expanded prompt), left-padded."""
    proc = QwenVLProcessor(
        tokenizer,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        length_buckets=(8, 48, 96, 512),
        patch_buckets=(16, 128),
        max_images=5,
    )
    out = proc(BATCH_TEXTS, BATCH_IMAGES, side="query")
    reference_images = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    flat = [image for row in BATCH_IMAGES for image in row]
    ref = reference_images(images=flat, return_tensors="np")
    grid = ref["image_grid_thw"]
    rows = []
    for i, (text, images) in enumerate(zip(BATCH_TEXTS, BATCH_IMAGES, strict=True)):
        prompt = _reference_prompt(text, len(images), "Query: ")
        for g in grid[sum(len(r) for r in BATCH_IMAGES[:i]) :][: len(images)]:
            prompt = prompt.replace("<|image_pad|>", "<|placeholder|>" * (g.prod() // 4), 1)
        rows.append(tokenizer(prompt.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"])
    expected_length = min(b for b in (8, 48, 96, 512) if b >= max(map(len, rows)))
    assert out["input_ids"].shape == (4, expected_length)
    for i, row in enumerate(rows):
        pad = expected_length - len(row)
        np.testing.assert_array_equal(out["input_ids"][i, pad:], row)
        assert (out["input_ids"][i, :pad] == tokenizer.pad_token_id).all()
        np.testing.assert_array_equal(out["attention_mask"][i], [0] * pad + [1] * len(row))
    num_patches = ref["pixel_values"].shape[0]
    assert out["pixel_values"].shape == (128, 1176) and num_patches > 16
    np.testing.assert_array_equal(out["pixel_values"][:num_patches], ref["pixel_values"])
    assert not out["pixel_values"][num_patches:].any()
    np.testing.assert_array_equal(out["image_grid_thw"][:3], grid)
    assert not out["image_grid_thw"][3:].any() and out["image_grid_thw"].shape == (5, 3)
    check_features(out, image_token_id=proc.image_token_id, merge_size=2)


def test_text_only_batches(tokenizer):
    """Text-only: image arrays omitted, or all-zero with max_images set (static structure)."""
    plain = QwenVLProcessor(tokenizer, length_buckets=(32,))
    assert set(plain(["hello"])) == {"input_ids", "attention_mask"}
    static = QwenVLProcessor(tokenizer, length_buckets=(32,), patch_buckets=(16,), max_images=2)
    out = static(["hello"])
    assert out["pixel_values"].shape == (16, 1176) and not out["pixel_values"].any()
    np.testing.assert_array_equal(out["image_grid_thw"], np.zeros((2, 3), np.int32))


def test_truncation_cuts_text_only(tokenizer):
    """A row over max_length loses the end of its text; image and template tokens stay."""
    proc = QwenVLProcessor(
        tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, length_buckets=(24, 32)
    )
    text = "the red circle " * 10
    out = proc([text], [[_image(56, 56)]], side="query")
    ids = out["input_ids"][0].tolist()
    assert len(ids) == 32 and all(out["attention_mask"][0])
    full = tokenizer(
        _reference_prompt(text, 1, "Query: ").replace("<|image_pad|>", "<|image_pad|>" * 4)
    )
    full = full["input_ids"]
    head = full.index(tokenizer.convert_tokens_to_ids("<|vision_end|>")) + 1
    prefix_length = len(tokenizer("Query: ")["input_ids"])
    tail = full[-2:]  # <|im_end|><|endoftext|>
    assert ids[:head] == full[:head] and ids[-2:] == tail
    assert ids[: len(ids) - 2] == full[: len(ids) - 2]  # text cut from its end
    assert ids.count(proc.image_token_id) == 4
    assert len(ids) - 2 > head + prefix_length  # the prefix survived, some text kept
    strict = QwenVLProcessor(tokenizer, length_buckets=(24, 32), truncation="error")
    with pytest.raises(ValueError, match="exceed max_length=32"):
        strict([text], side="query")


def test_truncation_never_cuts_images(tokenizer):
    """Image tokens alone over max_length: a ValueError, not a silent cut."""
    proc = QwenVLProcessor(tokenizer, min_pixels=MAX_PIXELS, max_pixels=MAX_PIXELS * 4)
    proc.max_length = 8
    with pytest.raises(ValueError, match="image tokens never are"):
        proc(["x"], [[_image(112, 112)]])


def test_errors(tokenizer):
    """User mistakes raise ValueErrors naming the row and what was expected."""
    proc = QwenVLProcessor(
        tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_buckets=(4,), max_images=1
    )
    with pytest.raises(ValueError, match="row 'q7': empty text and no image"):
        proc(["ok", "  "], side="query", row_ids=["q6", "q7"])
    with pytest.raises(ValueError, match="side must be one of"):
        proc(["ok"], side="document")
    with pytest.raises(ValueError, match="2 texts but 1 image entries"):
        proc(["a", "b"], [[]])
    with pytest.raises(ValueError, match="prompt has 2 <\\|image_pad\\|> tokens but 1 images"):
        proc(["see <|image_pad|> here"], [[_image(28, 28)]])
    with pytest.raises(ValueError, match="prompt has 0 <\\|image_pad\\|> tokens but 1 images"):
        proc.encode_prompts(["<|im_start|>user\nno image<|im_end|>"], [[_image(28, 28)]])
    with pytest.raises(ValueError, match="2 images, more than max_images=1"):
        proc(["a", "b"], [[_image(28, 28)], [_image(28, 28)]])
    with pytest.raises(ValueError, match="16 image patches, more than the largest patch bucket"):
        proc(["a"], [[_image(56, 56)]])
    with pytest.raises(BadRowError, match="cannot decode row 'r1': image"):
        proc(["a"], [[b"not a png"]], row_ids=["r1"])


def test_check_features_detects_grid_mismatch(tokenizer):
    """check_features: image tokens must equal sum(prod(grid)) / merge**2."""
    proc = QwenVLProcessor(tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    out = proc(["a"], [[_image(56, 56)]])
    check_features(out, proc.image_token_id)
    out["image_grid_thw"] = np.array([[1, 4, 8]], np.int32)
    with pytest.raises(ValueError, match="4 image tokens in input_ids, image_grid_thw needs 8"):
        check_features(out, proc.image_token_id)


def test_per_example_layout_regroups_the_packed_output(tokenizer):
    """image_layout="per_example": same input_ids / mask as the packed layout; example b's
    patches (0, 1 and 2 images) then zero rows up to the patch bucket, its grid rows then zero
    rows up to max_images; check_features accepts it and names the row of a mismatch."""
    options = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, length_buckets=(96, 512))
    packed = QwenVLProcessor(tokenizer, **options)(BATCH_TEXTS, BATCH_IMAGES, side="query")
    proc = QwenVLProcessor(
        tokenizer, **options, image_layout="per_example", patch_buckets=(16, 32), max_images=3
    )
    out = proc(BATCH_TEXTS, BATCH_IMAGES, side="query")
    np.testing.assert_array_equal(out["input_ids"], packed["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], packed["attention_mask"])
    assert out["pixel_values"].shape == (4, 32, 1176) and out["image_grid_thw"].shape == (4, 3, 3)
    grid, image, patch = packed["image_grid_thw"], 0, 0
    for b, images in enumerate(BATCH_IMAGES):
        example_grid = grid[image : image + len(images)]
        size = int(np.prod(example_grid, axis=-1).sum())
        np.testing.assert_array_equal(out["image_grid_thw"][b, : len(images)], example_grid)
        assert not out["image_grid_thw"][b, len(images) :].any()
        np.testing.assert_array_equal(
            out["pixel_values"][b, :size], packed["pixel_values"][patch : patch + size]
        )
        assert not out["pixel_values"][b, size:].any()
        image, patch = image + len(images), patch + size
    assert patch > 32  # the batch would not fit one example's bucket: buckets are per example
    check_features(out, proc.image_token_id)
    swapped = {**out, "image_grid_thw": out["image_grid_thw"][[0, 2, 1, 3]]}
    with pytest.raises(
        ValueError, match="row 1: 2 image tokens in input_ids, image_grid_thw needs 8"
    ):
        check_features(swapped, proc.image_token_id)
    unpadded = QwenVLProcessor(tokenizer, **options, image_layout="per_example")
    shapes = unpadded(BATCH_TEXTS, BATCH_IMAGES)
    most = max(int(np.prod(out["image_grid_thw"][b], -1).sum()) for b in range(4))
    assert shapes["pixel_values"].shape == (4, most, 1176)
    assert shapes["image_grid_thw"].shape == (4, 2, 3)  # the most images of one example
    assert set(unpadded(["hello"])) == {"input_ids", "attention_mask"}


def test_per_example_layout_errors(tokenizer):
    """Per-example limits name the row: too many images, too many patches for the buckets."""
    proc = QwenVLProcessor(
        tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, image_layout="per_example",
        patch_buckets=(8,), max_images=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="row 'b' has 2 images, more than max_images=1"):
        proc(["a", "b"], [[_image(28, 28)], [_image(28, 28)] * 2], row_ids=["a", "b"])
    with pytest.raises(ValueError, match="row 'b' has 16 image patches, more than the largest"):
        proc(["a", "b"], [[_image(28, 28)], [_image(56, 56)]], row_ids=["a", "b"])
    text_only = proc(["hello"])
    assert text_only["pixel_values"].shape == (1, 8, 1176) and not text_only["pixel_values"].any()
    assert text_only["image_grid_thw"].shape == (1, 1, 3) and not text_only["image_grid_thw"].any()
    with pytest.raises(ValueError, match="image_layout must be one of"):
        QwenVLProcessor(tokenizer, image_layout="ragged")


def test_tokenizer_without_image_token_rejected():
    """A tokenizer lacking the Qwen vision tokens is refused up front."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[UNK]")
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        QwenVLProcessor(tokenizer)
    with pytest.raises(ValueError, match="no single special token"):
        special_token_ids(tokenizer)


def test_from_pretrained_round_trip(tokenizer_dir, tmp_path):
    """save_pretrained writes HF-style preprocessor_config.json; from_pretrained reads it back."""
    proc = QwenVLProcessor.from_pretrained(tokenizer_dir, min_pixels=MIN_PIXELS, max_pixels=4096)
    proc.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["min_pixels"] == MIN_PIXELS and config["max_pixels"] == 4096
    again = QwenVLProcessor.from_pretrained(tmp_path, length_buckets=(64,))
    image = _image(80, 80)
    a, b = proc(["x"], [[image]]), again(["x"], [[image]])
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        QwenVLProcessor.from_pretrained(tmp_path / "missing")
    copied = pickle.loads(pickle.dumps(again))  # grain worker processes get pickled copies
    np.testing.assert_array_equal(copied(["x"], [[image]])["input_ids"], b["input_ids"])


def _record(**overrides):
    record = {
        "query_text": "a red circle",
        "query_image": b"",
        "positive_text": "",
        "positive_image": _png(_image(56, 56)),
        "negative_text": "",
        "negative_image": _png(_image(56, 56, 9)),
        "task": "text_to_image",
        "query_id": "q0",
        "positive_id": "p0",
        "negative_id": "n0",
    }
    return {**record, **overrides}


def test_records_and_bad_rows(tokenizer):
    """process_records encodes each side; bad rows raise naming the row and the field (skipping
    and counting bad rows happens when a dataset is built: tests/test_builders.py)."""
    proc = QwenVLProcessor(tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    records = [_record(), _record(query_id="q1", query_text="a blue square")]
    query = process_records(proc, records, "query")
    np.testing.assert_array_equal(
        query["input_ids"], proc(["a red circle", "a blue square"])["input_ids"]
    )
    positive = process_records(proc, records, "positive")
    reference = proc(["", ""], [[decode_image(r["positive_image"])] for r in records], "candidate")
    np.testing.assert_array_equal(positive["pixel_values"], reference["pixel_values"])
    bad = [_record(query_id="q2", positive_image=b"\x89PNG broken"), _record(query_text="")]
    with pytest.raises(BadRowError, match="cannot decode row 'q2': positive_image of 'p0'"):
        process_records(proc, bad[:1], "positive")
    with pytest.raises(BadRowError, match="query has empty text and no image"):
        process_records(proc, bad[1:], "query")
    missing = _record()
    del missing["positive_text"]
    with pytest.raises(BadRowError, match="missing column 'positive_text'"):
        process_records(proc, [missing], "positive")
    with pytest.raises(FileNotFoundError, match="row 7: image file '/nonexistent.png'"):
        decode_image("/nonexistent.png", "row 7")


def test_qwen2_tokenizer_class_directory(tokenizer_dir, tmp_path):
    """A directory written by transformers' Qwen2Tokenizer (the class real Qwen2.5-VL
    checkpoints name) loads and gives the same features as the tokenizers-backend one."""
    from transformers import Qwen2Tokenizer

    model = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]
    qwen = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        unk_token=None,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    extra = [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]
    qwen.add_special_tokens({"additional_special_tokens": extra})
    qwen.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    options = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "length_buckets": (64,)}
    ours = QwenVLProcessor.from_pretrained(tokenizer_dir, **options)
    theirs = QwenVLProcessor.from_pretrained(tmp_path, **options)
    a, b = ours(BATCH_TEXTS, BATCH_IMAGES), theirs(BATCH_TEXTS, BATCH_IMAGES)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


PUBLISHED_PREPROCESSOR_CONFIG = {  # as in Qwen/Qwen2.5-VL-3B-Instruct
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


@pytest.mark.parametrize("override", [{}, {"max_pixels": 56 * 56}])
def test_published_preprocessor_config(tokenizer_dir, tmp_path, override):
    """A checkpoint's preprocessor_config.json gives what HF's from_pretrained gives."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    config_path = tmp_path / "preprocessor_config.json"
    config_path.write_text(json.dumps(PUBLISHED_PREPROCESSOR_CONFIG))
    proc = QwenVLProcessor.from_pretrained(tmp_path, length_buckets=None, **override)
    reference = Qwen2VLImageProcessorPil.from_pretrained(tmp_path, **override)
    images = [_image(150, 230, 5), _image(40, 40, 6)]
    ours = proc(["a", "b"], [[images[0]], [images[1]]])
    ref = reference(images=images, return_tensors="np")
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])


@pytest.mark.parametrize(
    "low, high", [(28 * 28, 56 * 56), (56 * 56, 56 * 56), (4 * 784, 16 * 784), (3136, 12845056)]
)
def test_fitted_size_keeps_the_budget_and_agrees_with_transformers(low, high):
    """Whatever the image's size, what the HF processor makes of the fitted image (its
    smart_resize of the fitted size) fits max_pixels and an aspect ratio of 200; where
    transformers' own size fits both, it is that size (issue 36, cases 2 and 13)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from metaembed_jax.models.qwen2_vl.processing import fitted_size

    sides = (1, 3, 27, 28, 57, 150, 230, 300, 400, 1000, 4000, 9020)
    for height in sides:
        for width in sides:
            fitted = fitted_size(height, width, 28, low, high)
            final = smart_resize(*fitted, 28, low, high)
            assert final[0] * final[1] <= high and max(final) / min(final) <= 200, (height, width)
            try:
                direct = smart_resize(height, width, 28, low, high)
            except ValueError:  # an aspect ratio over 200: transformers refuses the image
                continue
            if direct[0] * direct[1] <= high and max(direct) / min(direct) <= 200:
                assert final == direct, (height, width)


def test_a_panorama_and_a_strip_fit_the_largest_patch_bucket(tokenizer):
    """A 300 x 9020 panorama (40 patches at transformers' size) and a 1 x 400 strip (refused by
    transformers) are squeezed into the budget: at most 16 patches, within patch_buckets (16,),
    the long side kept the long side."""
    proc = QwenVLProcessor(
        tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_buckets=(16,)
    )
    for height, width in ((300, 9020), (400, 1)):
        out = proc(["a"], [[_image(height, width)]])
        (grid,) = out["image_grid_thw"]
        assert int(np.prod(grid)) <= 16 and out["pixel_values"].shape[0] <= 16
        assert (grid[1] < grid[2]) == (height < width)
