"""Train a MetaEmbed model: `python train.py --config configs/demo.py --workdir DIR`.

Overrides: `--config.train.steps=100 --config.mesh.data=2 ...`; variants: `--config
configs/demo.py:nommr`. Writes DIR/metrics.jsonl, DIR/tensorboard/, DIR/checkpoints/, and resumes
from the latest checkpoint in DIR by itself. Multi-host: run the same command on every host
(docs/training.md); `jax.distributed` starts from the cluster environment or
`--config.distributed.*`.
An installed package runs the same program as `metaembed train` (metaembed_jax/cli/apps.py).
"""

from metaembed_jax.cli.apps import run_train

if __name__ == "__main__":
    run_train()
