"""The `config.json` of each published checkpoint a bundled recipe names, for building its model
abstractly (shapes and shardings, no weights) on a machine that has no copy of it:
`metaembed compile` compiles a recipe's real-size train step from these.

Only the fields the families read are given (the rest take the families' defaults); the values
are those of the checkpoints' own `config.json` on the Hugging Face Hub, in transformers 5's
nested spelling. `tests/test_tpu_compile.py` checks each model's parameter count against the
size the checkpoint's name states.
"""

from __future__ import annotations

import copy
import os
from typing import Any

_QWEN_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "hidden_act": "silu",
}


def _qwen2_5_vl(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab):
    return {
        "model_type": "qwen2_5_vl",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "tie_word_embeddings": hidden == 2048,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [16, 24, 24],
                "rope_theta": 1000000.0,
            },
        },
        "vision_config": {**_QWEN_VISION, "out_hidden_size": hidden},
    }


_SIGLIP_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}

PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen2.5-VL-3B-Instruct": _qwen2_5_vl(2048, 11008, 36, 16, 2, 151936),
    "Qwen2.5-VL-7B-Instruct": _qwen2_5_vl(3584, 18944, 28, 28, 4, 152064),
    "Qwen2.5-VL-32B-Instruct": _qwen2_5_vl(5120, 27648, 64, 40, 8, 152064),
    "paligemma-3b-pt-224": {
        "model_type": "paligemma",
        "image_token_index": 257152,
        "projection_dim": 2048,
        "text_config": {
            "model_type": "gemma",
            "vocab_size": 257216,
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "num_hidden_layers": 18,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "rms_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh",
            "rope_theta": 10000.0,
        },
        "vision_config": {**_SIGLIP_SO400M, "projection_dim": 2048},
    },
    "paligemma2-3b-pt-224": {
        "model_type": "paligemma",
        "image_token_index": 257152,
        "projection_dim": 2304,
        "text_config": {
            "model_type": "gemma2",
            "vocab_size": 257216,
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 26,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "rms_norm_eps": 1e-6,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "rope_theta": 10000.0,
        },
        "vision_config": {**_SIGLIP_SO400M, "projection_dim": 2304},
    },
    "Llama-3.2-11B-Vision-Instruct": {
        "model_type": "mllama",
        "image_token_index": 128256,
        "text_config": {
            "model_type": "mllama_text_model",
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
        "vision_config": {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_global_layers": 8,
            "attention_heads": 16,
            "num_channels": 3,
            "image_size": 560,
            "patch_size": 14,
            "max_num_tiles": 4,
            "vision_output_dim": 7680,
            "intermediate_layers_indices": [3, 7, 15, 23, 30],
            "norm_eps": 1e-5,
            "hidden_act": "gelu",
            "supported_aspect_ratios": [
                [1, 1],
                [1, 2],
                [1, 3],
                [1, 4],
                [2, 1],
                [2, 2],
                [3, 1],
                [4, 1],
            ],  # fmt: skip
        },
    },
}


def published_config(init_from: str) -> dict[str, Any] | None:
    """A copy of the published `config.json` of the checkpoint `init_from` names (a local path or
    a Hub id, matched on its last component), or None for a checkpoint not in the table."""
    name = os.path.basename(os.path.normpath(os.fspath(init_from))) if init_from else ""
    found = PUBLISHED_CONFIGS.get(name)
    return None if found is None else copy.deepcopy(found)
