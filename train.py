"""Train a MetaEmbed model: `python train.py --config configs/demo.py --workdir DIR`.

Overrides: `--config.train.steps=100 --config.mesh.data=2 ...`; variants: `--config
configs/demo.py:nommr`. Writes DIR/metrics.jsonl, DIR/tensorboard/, DIR/checkpoints/, and resumes
from the latest checkpoint in DIR by itself. Multi-host: run the same command on every host (see
README); `jax.distributed` starts from the cluster environment or `--config.distributed.*`.
"""

from absl import app, flags
from ml_collections import config_flags

from metaembed_jax.cli import warnings_only_unless_verbosity_given
from metaembed_jax.training.loop import train

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).")
flags.DEFINE_string("workdir", None, "Directory of metrics, checkpoints and TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    warnings_only_unless_verbosity_given()
    rows = train(flags.FLAGS.config, flags.FLAGS.workdir)
    if rows:
        print(f"last logged step {rows[-1]['step']}: loss {rows[-1]['loss']:.4f}")


if __name__ == "__main__":
    app.run(main)
