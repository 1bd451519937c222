"""The demo recipe at the smallest size that still trains and encodes: the `--smoke` runs of
demo_stability.py (as train.py / `metaembed data` flags) and encode_demo_corpus.py (applied to
the loaded config) use it, so that a test runs both scripts end to end in seconds.
"""

from __future__ import annotations

# Dotted config paths -> values: a 16-example dataset, batches of 8 (the 4 x 2 mesh's shards),
# one decoder layer, two small budgets.
OVERRIDES = {
    "data.synthetic.num_train": 16,
    "data.synthetic.num_val": 8,
    "data.synthetic.num_test": 12,
    "train.batch_size": 8,
    "eval.batch_size": 8,
    "model.num_query_tokens": 2,
    "model.num_candidate_tokens": 4,
    "model.hf_config.text_config.num_hidden_layers": 1,
    "loss.groups": ((1, 1, 1.0), (2, 4, 1.0)),
}


def flags() -> list[str]:
    """`OVERRIDES` as `--config.PATH=VALUE` flags of train.py and `metaembed data`."""
    return [f"--config.{path}={value}" for path, value in OVERRIDES.items()]


def apply(config) -> None:
    """Sets `OVERRIDES` on a loaded recipe (a ConfigDict), in place."""
    for path, value in OVERRIDES.items():
        *parents, name = path.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
