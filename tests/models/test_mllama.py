"""Llama-3.2-Vision (Mllama) family against transformers' PyTorch model (the reference).

A tiny random `MllamaConfig` (the family's `tiny_config`: text hidden 64, 4 layers with a
cross-attention layer at 2; vision hidden 32, 2 local + 1 global layers, 28 px tiles, up to 4
tiles) is built with transformers, saved with `save_pretrained`, loaded with `load_hf`, and
compared position by position on a left-padded batch mixing an image of one tile, an image of
several tiles, a row with two images and a text-only row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

from metaembed_jax.models import hf_loading, load_hf
from metaembed_jax.models import mllama as mllama_family
from metaembed_jax.models.mllama import processing
from metaembed_jax.models.mllama.modeling import cross_attention_masks

VOCAB = 300
IMAGE = 299
PAD = 0
TILES = 4
TOLERANCE_F32 = 1e-4
# (rows of segments: int = that many random text tokens, "img" = an <|image|> token), image
# sizes (h, w) in order of appearance: 28x28 -> one tile; 28x100 -> (1, 4) tiles; 56x56 -> 2x2.
ROWS = (
    (3, "img", 5),  # one image, one tile
    ("img", 9),  # one image, several tiles
    (2, "img", 3, "img", 2),  # two images
    (7,),  # text only
)
IMAGE_SIZES = ((28, 28), (28, 100), (56, 56), (30, 60))


def build_hf_model(seed=0, **overrides):
    import transformers

    torch.manual_seed(seed)
    config = transformers.MllamaConfig(
        **mllama_family.tiny_config(VOCAB, image_token_index=IMAGE, **overrides)
    )
    config._attn_implementation = "eager"
    model = transformers.MllamaForConditionalGeneration(config).eval()
    # Random init leaves gates at 0 (tanh 0 = 0 hides the cross-attention and tile embeddings),
    # biases at 0 and norm scales at 1: perturb them all so that the loader is checked.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gate" in name or name.endswith("bias") or "norm" in name:
                param.add_(0.5 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(hf_model, checkpoint dir, our float32 backbone)."""
    hf_model = build_hf_model()
    path = tmp_path_factory.mktemp("mllama")
    hf_model.save_pretrained(path)
    return hf_model, path, load_hf(path, dtype=jnp.float32)


def image_features(nested_sizes, seed=0):
    """transformers' image processor on a nested batch of random RGB images (rows may be
    empty): pixel_values, aspect_ratio_ids, aspect_ratio_mask, num_tiles."""
    from transformers import MllamaImageProcessorPil

    rng = np.random.default_rng(seed)
    nested = [
        [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in row]
        for row in nested_sizes
    ]
    processor = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=TILES)
    filled = [row or [Image.new("RGB", (28, 28))] for row in nested]  # placeholder, dropped below
    out = processor(images=filled, return_tensors="np")
    pixel_values = np.asarray(out["pixel_values"], np.float32)
    ids, mask = np.asarray(out["aspect_ratio_ids"]), np.asarray(out["aspect_ratio_mask"])
    num_tiles = [list(t) for t in out["num_tiles"]]
    for b, row in enumerate(nested):
        if not row:  # as transformers pads a row without images
            pixel_values[b], ids[b], mask[b] = 0, 0, 0
            mask[b, :, 0] = 1
            num_tiles[b] = []
    return pixel_values, ids, mask, num_tiles


def make_batch(rows=ROWS, image_sizes=IMAGE_SIZES, seed=0):
    """Left-padded batch; the cross-attention mask written by hand from the processor's rule
    (an image token and the tokens after it, up to the next image, see its tiles)."""
    rng = np.random.default_rng(seed)
    sizes = iter(image_sizes)
    nested = [[next(sizes) for s in row if s == "img"] for row in rows]
    pixel_values, ar_ids, ar_mask, num_tiles = image_features(nested, seed)
    token_rows = []
    for row in rows:
        ids = []
        for segment in row:
            ids += [IMAGE] if segment == "img" else rng.integers(3, 290, segment).tolist()
        token_rows.append(ids)
    length = max(len(r) for r in token_rows) + 2
    batch, images = len(rows), pixel_values.shape[1]
    input_ids = np.full((batch, length), PAD, np.int64)
    attention_mask = np.zeros((batch, length), np.int64)
    cross = np.zeros((batch, length, images, TILES), np.int64)
    for b, ids in enumerate(token_rows):
        start = length - len(ids)
        input_ids[b, start:], attention_mask[b, start:] = ids, 1
        image_positions = [start + k for k, t in enumerate(ids) if t == IMAGE]
        for i, position in enumerate(image_positions):
            end = image_positions[i + 1] if i + 1 < len(image_positions) else length
            cross[b, position:end, i, : num_tiles[b][i]] = 1
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        aspect_ratio_ids=ar_ids,
        aspect_ratio_mask=ar_mask,
        cross_attention_mask=cross,
    ), num_tiles


def hf_hidden(hf_model, batch, **extra):
    torch_batch = {k: torch.as_tensor(v) for k, v in batch.items() if v is not None}
    with torch.no_grad():
        return hf_model.model(**torch_batch, **extra).last_hidden_state.float().numpy()


def assert_close_on_real(ours, reference, attention_mask, tolerance):
    real = np.asarray(attention_mask).astype(bool)
    np.testing.assert_allclose(
        np.asarray(ours, np.float32)[real], reference[real], atol=tolerance, rtol=tolerance
    )


def test_family_is_registered():
    """`family_for` finds the family by model_type (a built-in, imported on first use), and its
    backbone satisfies the Backbone protocol."""
    from metaembed_jax.models import family

    found = family.family_for({"model_type": "mllama"})
    assert found is mllama_family.FAMILY and found.feature_keys == processing.FEATURE_KEYS
    backbone = nnx.eval_shape(  # abstract: only the structure is checked
        lambda: found.build(
            found.tiny_config(VOCAB),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            lora=None,
            remat="none",
            rngs=nnx.Rngs(0),
        )
    )
    assert isinstance(backbone, family.Backbone) and backbone.hidden_size == 64


def test_batch_has_the_mixed_rows():
    """The test batch is what the issue asks for: 1-tile image, multi-tile image, two images,
    text-only row, left padding (so the parity tests below cover each case)."""
    batch, num_tiles = make_batch()
    assert num_tiles[0] == [1] and num_tiles[1][0] > 1 and len(num_tiles[2]) == 2
    assert num_tiles[3] == [] and not batch["cross_attention_mask"][3].any()
    assert (batch["attention_mask"][:, 0] == 0).all()


def test_last_hidden_state_matches_transformers(checkpoint):
    hf_model, _, ours = checkpoint
    batch, _ = make_batch()
    reference = hf_hidden(hf_model, batch)
    assert_close_on_real(ours(**batch), reference, batch["attention_mask"], TOLERANCE_F32)


def test_text_only_batch_matches_transformers(checkpoint):
    """Without pixel_values transformers skips the cross-attention layers; so do we."""
    hf_model, _, ours = checkpoint
    batch, _ = make_batch(rows=((4,), (9,)), image_sizes=())
    text = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert_close_on_real(
        ours(**text), hf_hidden(hf_model, text), text["attention_mask"], TOLERANCE_F32
    )


def test_vision_model_matches_transformers(checkpoint):
    hf_model, _, ours = checkpoint
    batch, _ = make_batch()
    keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
    with torch.no_grad():
        reference = hf_model.model.vision_model(**{k: torch.as_tensor(batch[k]) for k in keys})
    got = ours.vision_model(*(batch[k] for k in keys))
    np.testing.assert_allclose(
        np.asarray(got), reference.last_hidden_state.numpy(), atol=TOLERANCE_F32, rtol=TOLERANCE_F32
    )


def test_cross_attention_mask_matches_transformers():
    """Boolean masks == transformers' additive `_prepare_cross_attention_mask` (rows that see
    nothing: all allowed, text_row 0)."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    batch, _ = make_batch()
    patches = 5
    additive, full_row = _prepare_cross_attention_mask(
        torch.as_tensor(batch["cross_attention_mask"]), patches, torch.float32
    )
    allowed, text_row = cross_attention_masks(batch["cross_attention_mask"], patches)
    np.testing.assert_array_equal(np.asarray(allowed), additive.numpy() == 0)
    np.testing.assert_array_equal(np.asarray(text_row), full_row[:, 0].numpy() == 1)


def _meta_reference(hf_model, batch, num_tiles, suffix):
    """transformers given the meta tokens as extra embedding rows: image rows with the cross
    mask extended by their real tiles; a row without images run alone, text-only (what the
    family defines for it)."""
    count = suffix.shape[1]
    with torch.no_grad():
        embeds = hf_model.model.language_model.embed_tokens(torch.as_tensor(batch["input_ids"]))
    embeds = torch.cat([embeds, torch.as_tensor(suffix)], dim=1)
    mask = np.concatenate([batch["attention_mask"], np.ones(suffix.shape[:2], np.int64)], 1)
    cross = batch["cross_attention_mask"]
    meta = np.zeros((cross.shape[0], count, *cross.shape[2:]), np.int64)
    for b, tiles in enumerate(num_tiles):
        for i, n in enumerate(tiles):
            meta[b, :, i, :n] = 1
    full = dict(batch, attention_mask=mask, cross_attention_mask=np.concatenate([cross, meta], 1))
    full.pop("input_ids")
    out = hf_hidden(hf_model, full, inputs_embeds=embeds)[:, -count:]
    for b, tiles in enumerate(num_tiles):
        if not tiles:
            alone = {"attention_mask": mask[b : b + 1]}
            out[b] = hf_hidden(hf_model, alone, inputs_embeds=embeds[b : b + 1])[0, -count:]
    return out


def test_encode_with_suffix_matches_transformers(checkpoint):
    hf_model, _, ours = checkpoint
    batch, num_tiles = make_batch()
    rng = np.random.default_rng(1)
    suffix = rng.normal(0, 0.02, (len(num_tiles), 3, ours.hidden_size)).astype(np.float32)
    got = ours.encode_with_suffix(suffix, **batch)
    reference = _meta_reference(hf_model, batch, num_tiles, suffix)
    np.testing.assert_allclose(np.asarray(got), reference, atol=TOLERANCE_F32, rtol=TOLERANCE_F32)


def test_text_only_row_meta_states_do_not_depend_on_the_batch(checkpoint):
    """A text row gets the same meta states alone (no images in the batch) as next to images;
    a `[1, M, H]` suffix is the same rows for every example."""
    _, _, ours = checkpoint
    batch, _ = make_batch()
    suffix = np.random.default_rng(2).normal(0, 0.02, (1, 3, ours.hidden_size)).astype(np.float32)
    mixed = encode(ours, suffix, batch)
    repeated = encode(ours, np.repeat(suffix, 4, axis=0), batch)
    np.testing.assert_array_equal(np.asarray(mixed), np.asarray(repeated))
    text = {k: batch[k][3:] for k in ("input_ids", "attention_mask")}
    alone = encode(ours, suffix, text)[0]
    np.testing.assert_allclose(np.asarray(mixed[3]), np.asarray(alone), atol=1e-5)


@nnx.jit
def encode(model, suffix, features):
    """`encode_with_suffix`, compiled (eager dispatch of the tiny model is slower here)."""
    return model.encode_with_suffix(suffix, **features)


def _rename(path, out_dir, rename):
    tensors = load_file(str(path / "model.safetensors"))
    out_dir.mkdir()
    save_file({rename(k): v for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text((path / "config.json").read_text())
    return out_dir


def test_in_memory_key_layout_loads(checkpoint, tmp_path):
    """transformers' in-memory names (model.language_model.layers.N, model.vision_model, ...)
    reach the same rules through the key aliases as the published layout save_pretrained writes."""
    hf_model, path, ours = checkpoint
    published = load_file(str(path / "model.safetensors"))
    assert any(k.startswith("language_model.model.layers.") for k in published)
    assert any(k.startswith("vision_model.") for k in published)

    def to_memory(key):
        for old, new in (
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_model.", "model.vision_model."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ):
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    loaded = load_hf(_rename(path, tmp_path / "memory", to_memory))
    batch, _ = make_batch()
    np.testing.assert_array_equal(np.asarray(loaded(**batch)), np.asarray(ours(**batch)))


def test_missing_and_unexpected_tensors_listed_together(checkpoint, tmp_path):
    _, path, _ = checkpoint
    dropped = "language_model.model.layers.3.mlp.up_proj.weight"

    def rename(key):
        return "vision_model.extra_tensor" if key == dropped else key

    with pytest.raises(hf_loading.CheckpointMismatchError) as error:
        load_hf(_rename(path, tmp_path / "broken", rename))
    message = str(error.value)
    assert "2 problem(s)" in message
    # layer 3 is the only layer of the second self-attention block (layer_offset 3)
    assert "missing tensor for parameter self_blocks.1.mlp.up_proj.kernel" in message
    assert "unexpected tensor vision_model.extra_tensor" in message


def test_bfloat16_close_to_float32_reference(checkpoint):
    hf_model, path, _ = checkpoint
    batch, _ = make_batch()
    ours = load_hf(path, dtype=jnp.bfloat16)
    reference = hf_hidden(hf_model, batch)
    real = batch["attention_mask"].astype(bool)
    got = np.asarray(ours(**batch), np.float32)[real]
    scale = np.abs(reference[real]).max()
    assert np.abs(got - reference[real]).max() < 0.05 * scale


# ---------------------------------------------------------------------------------------------
# Processor and static shapes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny byte-level BPE tokenizer holding the Mllama special tokens, saved to a dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=list(processing.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["Query: a red circle", "Describe the image.", "user\n\n"] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=processing.BOS_TOKEN,
        pad_token=processing.PAD_TOKEN,
        padding_side="left",
    )
    path = tmp_path_factory.mktemp("mllama_tokenizer")
    fast.save_pretrained(path)
    return fast, path


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def tiny_image_processor():
    from transformers import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=TILES)


def test_processor_matches_mllama_processor(tokenizer):
    """Our features == transformers' MllamaProcessor on our prompts (left padding), key by key."""
    from transformers import MllamaProcessor

    fast, _ = tokenizer
    ours = processing.MllamaEmbedProcessor(fast, tiny_image_processor(), length_buckets=None)
    first, second, third, fourth = random_images(((28, 28), (28, 100), (56, 56), (40, 20)))
    images = [[first], [second, third], [fourth]]
    texts = ["a red circle", "", "circle"]
    prompts = [ours.build_prompt(t, len(i), "query") for t, i in zip(texts, images, strict=True)]
    reference = MllamaProcessor(image_processor=tiny_image_processor(), tokenizer=fast)(
        text=prompts, images=images, padding=True, return_tensors="np", add_special_tokens=False
    )
    got = ours(texts, images, side="query")
    assert set(got) == set(processing.FEATURE_KEYS)
    for key in processing.FEATURE_KEYS:
        np.testing.assert_array_equal(got[key], reference[key], err_msg=key)
    assert prompts[1].startswith("<|image|><|image|><|begin_of_text|>")
    assert "Query: Describe the image." in prompts[1]


def test_processor_buckets_and_text_only_rows(tokenizer):
    fast, path = tokenizer
    processor = processing.MllamaEmbedProcessor.from_pretrained(
        path, size={"height": 28, "width": 28}, length_buckets=(32, 64), max_images=2
    )
    out = processor(["a circle", "red"], [random_images(((28, 60),)), []], side="candidate")
    assert out["input_ids"].shape == (2, 32) and out["attention_mask"][:, 0].sum() == 0
    assert out["pixel_values"].shape == (2, 2, TILES, 3, 28, 28)
    assert out["aspect_ratio_ids"][1].tolist() == [0, 0]
    assert out["aspect_ratio_mask"][1].tolist() == [[1, 0, 0, 0]] * 2  # as transformers pads
    assert not out["cross_attention_mask"][1].any() and out["cross_attention_mask"][0].any()
    text_only = processor(["a circle"], None, side="query")
    assert text_only["pixel_values"].shape == (1, 2, TILES, 3, 28, 28)
    with pytest.raises(ValueError, match="nothing to embed"):
        processor([""], [[]], side="query")
    with pytest.raises(ValueError, match="max_images=2"):
        processor(["x"], [random_images(((28, 28),) * 3)], side="query")


def test_static_image_padding_keeps_meta_states(checkpoint, tokenizer):
    """Padding the image axis (static shapes) or giving a text-only batch zero image arrays
    leaves every row's meta states unchanged (images lead the prompt; rows without images
    attend to nothing)."""
    from ml_collections import ConfigDict

    _, _, ours = checkpoint
    fast, _ = tokenizer
    processor = processing.MllamaEmbedProcessor(fast, tiny_image_processor(), length_buckets=None)
    images = [random_images(((28, 28),)), random_images(((28, 100), (56, 56)), 1), []]
    features = processor(["a red circle", "circle", "red"], images, side="query")
    data_config = ConfigDict(
        dict(max_images=3, always_emit_pixels=True, mllama_max_tiles=TILES, mllama_tile_size=28)
    )
    static = processing.static_shapes(data_config, batch_size=3)
    padded = static(dict(features))
    assert padded["pixel_values"].shape[1] == 3 and padded["cross_attention_mask"].shape[2] == 3
    suffix = np.random.default_rng(3).normal(0, 0.02, (3, 2, ours.hidden_size)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(encode(ours, suffix, padded)),
        np.asarray(encode(ours, suffix, features)),
        atol=1e-5,
    )
    text = processor(["red", "a red circle"], None, side="query")
    text_static = static(dict(text))
    assert text_static["pixel_values"].shape == (2, 3, TILES, 3, 28, 28)
    np.testing.assert_allclose(
        np.asarray(encode(ours, suffix[:2], text_static)),
        np.asarray(encode(ours, suffix[:2], text)),
        atol=1e-5,
    )


def test_lora_and_remat_start_equal_and_train_every_decoder_layer(checkpoint):
    """A LoRA backbone (remat="full") starts equal to its base; the loss gradient reaches the
    adapters of the self-attention blocks and of the cross-attention layer (both remat paths)."""
    from metaembed_jax.models import layers

    hf_model, path, ours = checkpoint
    lora = layers.LoRASpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "up_proj"))
    adapted = load_hf(path, lora=lora, remat="full")
    batch, num_tiles = make_batch()
    suffix = np.random.default_rng(4).normal(0, 0.02, (4, 2, ours.hidden_size)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(encode(adapted, suffix, batch)),
        np.asarray(encode(ours, suffix, batch)),
        atol=1e-6,
    )
    graphdef, lora_state, rest = nnx.split(adapted, nnx.LoRAParam, ...)

    @jax.jit
    def grads(lora_state, rest):
        def loss(lora_state):
            # fresh Variables for the frozen part: nnx.scan refuses ones from an outer trace
            model = nnx.merge(graphdef, lora_state, jax.tree.map(lambda x: x, rest))
            return jnp.sum(model.encode_with_suffix(suffix, **batch) ** 2)

        return jax.grad(loss)(lora_state)

    flat = {
        ".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path): np.asarray(
            value
        )
        for path, value in jax.tree_util.tree_leaves_with_path(grads(lora_state, rest))
    }
    for prefix in ("self_blocks.0.", "self_blocks.1.", "cross_layers.0."):
        b_grads = [g for name, g in flat.items() if prefix in name and "lora_b" in name]
        assert b_grads and all(np.isfinite(g).all() for g in b_grads), prefix
        assert any(np.abs(g).max() > 0 for g in b_grads), prefix


def test_metaembed_on_mllama_matches_transformers(checkpoint):
    """MetaEmbed on the Mllama backbone == transformers given the meta-token table as extra
    embedding rows and the extended cross-attention mask, L2-normalised, query / candidate
    slices."""
    from metaembed_jax import MetaEmbed

    hf_model, path, _ = checkpoint
    model = MetaEmbed.from_pretrained(
        path, num_query_tokens=2, num_candidate_tokens=3, rngs=nnx.Rngs(5)
    )
    batch, num_tiles = make_batch()
    table = np.asarray(model.meta_tokens[...], np.float32)
    table = np.broadcast_to(table, (len(num_tiles), *table.shape))
    reference = _meta_reference(hf_model, batch, num_tiles, np.ascontiguousarray(table))
    reference = reference / np.linalg.norm(reference, axis=-1, keepdims=True)
    queries = model.embed(side="query", **batch)
    candidates = model.embed(side="candidate", **batch)
    np.testing.assert_allclose(np.asarray(queries), reference[:, :2], atol=TOLERANCE_F32)
    np.testing.assert_allclose(np.asarray(candidates), reference[:, 2:], atol=TOLERANCE_F32)
