"""PaliGemma / PaliGemma 2 backbones against transformers' PyTorch models (the reference).

Tiny random models (text hidden 64, 2 layers, 4 heads / 1-2 kv heads; SigLIP width 32, 2 layers,
28 px images of 14 px patches = 4 image tokens) are built with transformers, saved with
`save_pretrained`, loaded with our `load_hf`, and their last hidden states compared with
`hf_model.model(...).last_hidden_state` on every non-padding position. Batches are left-padded:
transformers' SDPA path turns PaliGemma (Gemma 1) fully bidirectional when no row is padded and no
`token_type_ids` are given (see the modeling docstring); every batch here has a padded row.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

import metaembed_jax.models.paligemma  # noqa: F401  (registers the family)
from metaembed_jax.models import load_hf
from metaembed_jax.models.paligemma import tiny_config

VOCAB = 300
PAD, EOS, BOS, IMAGE = 0, 1, 2, 3
TOKENS_PER_IMAGE = 4  # (28 / 14) ** 2
TOLERANCE_F32 = 1e-4


def build_hf_model(text_model_type, seed=0):
    torch.manual_seed(seed)
    config = transformers.PaliGemmaConfig(**tiny_config(VOCAB, text_model_type=text_model_type))
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Random init leaves biases / norm scales at 0 / 1 (Gemma's norm at w = 0): perturb
            # them so the loader and the `1 + w` scale are checked.
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            # Larger q / k so attention scores reach Gemma 2's soft cap (2.0 in the tiny config).
            if "language_model" in name and ("q_proj" in name or "k_proj" in name):
                param.mul_(8.0)
    return model


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def checkpoint(request, tmp_path_factory):
    """(text model type, hf_model, checkpoint dir, our float32 backbone)."""
    hf_model = build_hf_model(request.param)
    path = tmp_path_factory.mktemp(f"paligemma_{request.param}")
    hf_model.save_pretrained(path)
    return request.param, hf_model, path, load_hf(path, dtype=jnp.float32)


def random_images(count, seed=0):
    """Normalised pixel values [count, 3, 28, 28] of random RGB images (SigLIP PIL processor)."""
    if count == 0:
        return np.zeros((0, 3, 28, 28), np.float32)
    rng = np.random.default_rng(seed)
    images = [
        Image.fromarray(rng.integers(0, 256, (40, 33, 3), dtype=np.uint8)) for _ in range(count)
    ]
    processor = transformers.SiglipImageProcessorPil(size={"height": 28, "width": 28})
    return np.asarray(processor(images=images, return_tensors="np")["pixel_values"], np.float32)


# Rows: (images in the row, text tokens after <bos>, suffix tokens of type 1 at the end).
ROWS = [(1, 6, 2), (0, 3, 1), (2, 2, 2)]


def make_batch(rows=ROWS, seed=0):
    """Left-padded batch in PaliGemma's layout (<image>*T*n, <bos>, text), transformers' packed
    pixel_values [N, 3, 28, 28], token_type_ids (0 = prefix, 1 = the last `suffix` tokens)."""
    rng = np.random.default_rng(seed)
    token_rows = [
        [IMAGE] * (TOKENS_PER_IMAGE * n) + [BOS] + rng.integers(4, VOCAB, text).tolist()
        for n, text, _ in rows
    ]
    length = max(len(r) for r in token_rows) + 2  # every row padded
    batch = len(rows)
    input_ids = np.full((batch, length), PAD, np.int32)
    attention_mask = np.zeros((batch, length), np.int32)
    token_type_ids = np.zeros((batch, length), np.int32)
    for i, (row, (_, _, suffix)) in enumerate(zip(token_rows, rows, strict=True)):
        input_ids[i, length - len(row) :] = row
        attention_mask[i, length - len(row) :] = 1
        token_type_ids[i, length - suffix :] = 1
    num_images = sum(n for n, _, _ in rows)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": random_images(num_images, seed),
        "token_type_ids": token_type_ids,
    }


def per_example_pixels(batch, rows=ROWS):
    """The packed images regrouped [B, max_images, 3, 28, 28], zero images as padding."""
    slots = max(n for n, _, _ in rows)
    out = np.zeros((len(rows), slots, 3, 28, 28), np.float32)
    start = 0
    for b, (n, _, _) in enumerate(rows):
        out[b, :n] = batch["pixel_values"][start : start + n]
        start += n
    return out


def to_torch(batch):
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in out:
            out[key] = out[key].long()
    return out


def hf_last_hidden(hf_model, batch):
    with torch.no_grad():
        return hf_model.model(**to_torch(batch)).last_hidden_state.float().numpy()


@nnx.jit
def jax_forward(model, batch):
    return model(**batch)


def max_diff_on_real_tokens(ours, reference, attention_mask):
    real = np.asarray(attention_mask).astype(bool)
    return float(np.abs(np.asarray(ours, np.float32)[real] - reference[real]).max())


@pytest.mark.parametrize("with_token_types", [False, True], ids=["causal", "prefix_lm"])
@pytest.mark.parametrize("layout", ["packed", "per_example"])
def test_hidden_states_match_transformers(checkpoint, with_token_types, layout):
    """Last hidden states equal HF's on every real token (float32, <= 1e-4), for a left-padded
    batch of rows with 0, 1 and 2 images, with and without token_type_ids."""
    text_type, hf_model, _, model = checkpoint
    batch = make_batch()
    if not with_token_types:
        batch.pop("token_type_ids")
    reference = hf_last_hidden(hf_model, batch)
    ours_batch = dict(batch)
    if layout == "per_example":
        ours_batch["pixel_values"] = per_example_pixels(batch)
    diff = max_diff_on_real_tokens(
        jax_forward(model, ours_batch), reference, batch["attention_mask"]
    )
    assert diff <= TOLERANCE_F32, f"{text_type}: max abs diff {diff}"


def test_token_type_ids_change_the_prefix(checkpoint):
    """The prefix-LM mask is not a no-op on this batch (so the test above can fail)."""
    _, _, _, model = checkpoint
    batch = make_batch()
    with_types = np.asarray(jax_forward(model, batch))
    batch.pop("token_type_ids")
    without = np.asarray(jax_forward(model, batch))
    real = batch["attention_mask"].astype(bool)
    assert np.abs(with_types[real] - without[real]).max() > 1e-3


def test_text_only_batch_matches_transformers(checkpoint):
    _, hf_model, _, model = checkpoint
    batch = make_batch([(0, 9, 1), (0, 4, 1)])
    batch.pop("pixel_values")
    diff = max_diff_on_real_tokens(
        jax_forward(model, batch), hf_last_hidden(hf_model, batch), batch["attention_mask"]
    )
    assert diff <= TOLERANCE_F32


def test_vision_tower_matches_transformers(checkpoint):
    """SigLIP alone (last hidden states) and with the projector (the image features)."""
    _, hf_model, _, model = checkpoint
    pixels = random_images(3, seed=5)
    with torch.no_grad():
        tower = hf_model.model.vision_tower(torch.from_numpy(pixels)).last_hidden_state.numpy()
        features = hf_model.model.get_image_features(torch.from_numpy(pixels)).pooler_output
    np.testing.assert_allclose(np.asarray(model.visual.encode(pixels)), tower, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.visual(pixels)), features.numpy(), atol=1e-5)


def test_published_key_layout_loads(checkpoint, tmp_path):
    """The published layout (`vision_tower.vision_model.*`, `language_model.model.*`,
    `multi_modal_projector.*`) loads to the same weights; an unknown key is reported."""
    _, _, path, model = checkpoint
    tensors = load_file(path / "model.safetensors")
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("vision_tower."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        renamed[key] = value
    assert any(k.startswith("language_model.model.layers.") for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    published = load_hf(tmp_path)
    ours, theirs = nnx.state(model, nnx.Param), nnx.state(published, nnx.Param)
    for (name, a), (_, b) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(name))
    renamed["vision_tower.vision_model.bogus.weight"] = np.zeros(2, np.float32)
    save_file(renamed, tmp_path / "model.safetensors")
    from metaembed_jax.models.rules import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="bogus"):
        load_hf(tmp_path)


def hf_suffix_states(hf_model, batch, suffix, token_type_ids=None):
    """The reference: HF's embeddings + image features with `suffix` rows appended, fed to
    PaliGemmaModel as inputs_embeds (positions 1..L+M, its own masks), read at the suffix."""
    base = hf_model.model
    ids = torch.from_numpy(batch["input_ids"]).long()
    count = suffix.shape[1]
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
        features = base.get_image_features(torch.from_numpy(batch["pixel_values"])).pooler_output
        image_mask = (ids == IMAGE)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, features.reshape(-1, features.shape[-1]))
        embeds = torch.cat([embeds, torch.from_numpy(suffix)], dim=1)
        ones = torch.ones((ids.shape[0], count), dtype=torch.long)
        mask = torch.cat([torch.from_numpy(batch["attention_mask"]).long(), ones], dim=1)
        kwargs = {}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat([torch.from_numpy(token_type_ids).long(), ones], 1)
        hidden = base(inputs_embeds=embeds, attention_mask=mask, **kwargs).last_hidden_state
    return hidden[:, -count:].numpy()


@pytest.mark.parametrize("with_token_types", [False, True], ids=["causal", "prefix_lm"])
def test_encode_with_suffix_matches_transformers(checkpoint, with_token_types):
    """Meta rows appended after the content: equal to HF given them as extra embedding rows."""
    _, hf_model, _, model = checkpoint
    batch = make_batch()
    token_types = batch.pop("token_type_ids") if with_token_types else None
    batch.pop("token_type_ids", None)
    suffix = np.random.default_rng(3).normal(size=(3, 5, 64)).astype(np.float32)
    reference = hf_suffix_states(hf_model, batch, suffix, token_types)
    extra = {} if token_types is None else {"token_type_ids": token_types}
    ours = nnx.jit(lambda m, s, b: m.encode_with_suffix(s, **b))(model, suffix, {**batch, **extra})
    assert ours.shape == (3, 5, 64)
    np.testing.assert_allclose(np.asarray(ours), reference, atol=TOLERANCE_F32)
    shared = model.encode_with_suffix(suffix[:1], **batch, **extra)  # one suffix for every row
    reference = hf_suffix_states(hf_model, batch, np.repeat(suffix[:1], 3, axis=0), token_types)
    np.testing.assert_allclose(np.asarray(shared), reference, atol=TOLERANCE_F32)
    with pytest.raises(ValueError, match="suffix shape"):
        model.encode_with_suffix(suffix[:2], **batch)


def test_bfloat16_close_to_float32_reference(checkpoint):
    """bfloat16 compute and storage: within 5% of the largest hidden-state magnitude of HF's
    float32 output (bf16 keeps 8 mantissa bits; 2 layers)."""
    _, hf_model, path, _ = checkpoint
    model = load_hf(path, dtype=jnp.bfloat16)
    batch = make_batch()
    reference = hf_last_hidden(hf_model, batch)
    ours = jax_forward(model, batch)
    assert ours.dtype == jnp.bfloat16
    real = batch["attention_mask"].astype(bool)
    diff = max_diff_on_real_tokens(ours, reference, batch["attention_mask"])
    assert diff <= 0.05 * np.abs(reference[real]).max(), diff


def test_image_token_count_errors(checkpoint):
    _, _, _, model = checkpoint
    batch = make_batch()
    batch["input_ids"][0, -1] = IMAGE  # one stray <image> token: not a whole image
    with pytest.raises(ValueError, match="<image> tokens"):
        model(**batch)


def test_gemma2_layer_types_follow_transformers():
    """Layer i of Gemma 2 slides when i is even (transformers 5.23's default layer_types)."""
    from metaembed_jax.models.paligemma.config import text_config

    config = tiny_config(VOCAB, text_model_type="gemma2", num_hidden_layers=4)
    hf = transformers.PaliGemmaConfig(**config).text_config
    assert text_config(config).layer_types == tuple(hf.layer_types)
    saved = json.loads(transformers.PaliGemmaConfig(**config).to_json_string())
    assert text_config(saved).layer_types == tuple(hf.layer_types)


def test_eager_call_equals_jitted(checkpoint):
    """Eager call (outside jit) equals the jitted one."""
    _, _, _, model = checkpoint
    batch = make_batch()
    np.testing.assert_allclose(
        np.asarray(model(**batch)), np.asarray(jax_forward(model, batch)), atol=1e-5
    )


@pytest.mark.parametrize(
    "change",
    [{"layer_types": ["full_attention"] * 2}, {"attn_logit_softcapping": None}],
    ids=["no_sliding_window", "no_softcap"],
)
def test_gemma2_window_and_softcap_matter(checkpoint, tmp_path, change):
    """Gemma 2 without its sliding window or its soft-cap is far from transformers on this batch,
    so the parity test above checks both."""
    text_type, hf_model, path, _ = checkpoint
    if text_type != "gemma2":
        pytest.skip("Gemma 2 only")
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    batch = make_batch()
    batch.pop("token_type_ids")
    diff = max_diff_on_real_tokens(
        jax_forward(load_hf(tmp_path), batch),
        hf_last_hidden(hf_model, batch),
        batch["attention_mask"],
    )
    assert diff > 1e-3, diff


def test_sharded_load_equals_single_device(checkpoint):
    """Loaded onto a (data 2, fsdp 2, tensor 2) mesh by the logical axis names: same output."""
    from metaembed_jax import sharding

    _, _, path, model = checkpoint
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    sharded = load_hf(path, mesh=mesh)
    assert sharded.layers.mlp.gate_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor"
    )
    batch = make_batch()
    np.testing.assert_allclose(
        np.asarray(jax_forward(sharded, batch)), np.asarray(jax_forward(model, batch)), atol=1e-5
    )


def test_lora_and_remat_train_the_decoder_only(checkpoint):
    """LoRA adapters on the decoder's projections (zero-initialised B: output unchanged) get
    finite, non-zero gradients through the scanned, rematerialised layers; none on SigLIP."""
    from metaembed_jax.models import layers

    _, _, path, model = checkpoint
    decoder_only = r".*language_model.*\.(q_proj|v_proj|gate_proj)"  # PEFT's regex form
    lora = layers.LoRASpec(rank=2, alpha=4.0, targets=decoder_only)
    adapted = load_hf(path, lora=lora, remat="full")
    batch = make_batch()
    batch.pop("token_type_ids")
    suffix = np.ones((3, 2, 64), np.float32)
    np.testing.assert_allclose(
        np.asarray(adapted.encode_with_suffix(suffix, **batch)),
        np.asarray(model.encode_with_suffix(suffix, **batch)),
        atol=1e-5,
    )
    assert not nnx.state(adapted.visual, nnx.LoRAParam)

    graphdef, lora_state, rest = nnx.split(adapted, nnx.LoRAParam, ...)

    def loss(lora_state):
        # fresh Variables for the rest too (as the train step): nnx.scan refuses outer ones
        merged = nnx.merge(graphdef, lora_state, jax.tree.map(lambda x: x, rest))
        return jnp.sum(merged.encode_with_suffix(suffix, **batch) ** 2)

    grads = jax.grad(loss)(lora_state)
    values = [np.asarray(g[...]) for _, g in nnx.to_flat_state(grads)]
    assert values and all(np.isfinite(v).all() for v in values)
    assert any(np.abs(v).max() > 0 for v in values)


# Sparse configs in the published spelling (keys left out take transformers' defaults).
PUBLISHED_STYLE = {
    "gemma": dict(
        model_type="paligemma",
        image_token_index=257152,
        projection_dim=2048,
        hidden_size=2048,
        text_config=dict(
            hidden_size=2048,
            intermediate_size=16384,
            model_type="gemma",
            num_attention_heads=8,
            num_hidden_layers=18,
            num_image_tokens=256,
            num_key_value_heads=1,
            vocab_size=257216,
        ),
        vision_config=dict(
            hidden_size=1152,
            intermediate_size=4304,
            model_type="siglip_vision_model",
            num_attention_heads=16,
            num_hidden_layers=27,
            patch_size=14,
            projection_dim=2048,
            vision_use_head=False,
        ),
    ),
    "gemma2": dict(
        model_type="paligemma",
        image_token_index=257152,
        projection_dim=2304,
        hidden_size=2048,
        text_config=dict(
            hidden_activation="gelu_pytorch_tanh",
            hidden_size=2304,
            intermediate_size=9216,
            model_type="gemma2",
            num_attention_heads=8,
            num_hidden_layers=26,
            num_key_value_heads=4,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            vocab_size=257216,
        ),
        vision_config=dict(
            hidden_size=1152,
            intermediate_size=4304,
            model_type="siglip_vision_model",
            num_attention_heads=16,
            num_hidden_layers=27,
            patch_size=14,
            projection_dim=2304,
            image_size=448,
        ),
    ),
}


@pytest.mark.parametrize("text_type", ["gemma", "gemma2"])
def test_published_style_config_reads_as_transformers(text_type):
    """Every hyper-parameter we read from a sparse published-style config equals what
    transformers' PaliGemmaConfig makes of it (its defaults fill the missing keys)."""
    from metaembed_jax.models.paligemma.config import image_token_id, text_config, vision_config

    raw = PUBLISHED_STYLE[text_type]
    hf = transformers.PaliGemmaConfig(**json.loads(json.dumps(raw)))
    text, vision = text_config(raw), vision_config(raw)
    t, v = hf.text_config, hf.vision_config
    assert (text.hidden_size, text.num_layers, text.vocab_size) == (
        t.hidden_size,
        t.num_hidden_layers,
        t.vocab_size,
    )
    assert (text.num_heads, text.num_kv_heads, text.head_dim) == (
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
    )
    assert text.rms_norm_eps == t.rms_norm_eps
    assert text.rope_theta == t.rope_parameters["rope_theta"]
    if text_type == "gemma2":
        assert text.attn_scale == t.query_pre_attn_scalar**-0.5
        assert text.attn_logit_softcapping == t.attn_logit_softcapping
        assert text.final_logit_softcapping == t.final_logit_softcapping
        assert text.sliding_window == t.sliding_window
        assert text.layer_types == tuple(t.layer_types)
    else:
        assert text.attn_scale == t.head_dim**-0.5
    assert (vision.hidden_size, vision.num_layers, vision.image_size, vision.patch_size) == (
        v.hidden_size,
        v.num_hidden_layers,
        v.image_size,
        v.patch_size,
    )
    assert vision.layer_norm_eps == v.layer_norm_eps
    assert vision.projection_dim == hf.projection_dim
    assert vision.num_patches == t.num_image_tokens
    assert image_token_id(raw) == hf.image_token_id
