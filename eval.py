"""Evaluate a trained MetaEmbed at every retrieval budget and print the scaling table.

    python eval.py --config configs/demo.py --workdir runs/demo
    python eval.py --config configs/demo.py --workdir DIR --checkpoint DIR/checkpoints/400
    python eval.py --config configs/demo.py --workdir DIR --config.eval.budgets='((1,1),(16,64))'

Reads the latest checkpoint of `--workdir` (or `--checkpoint`), encodes the evaluation sets
once (cached under DIR/eval/cache), scores each budget of `config.eval.budgets`, prints one row
per budget and writes DIR/eval/results.json and DIR/eval/scaling.png. The logic lives in
`metaembed_jax.evaluation.runner`.
"""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py).", lock_config=True)
flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints are read and eval/ is written here."
)
flags.DEFINE_string(
    "checkpoint", None, "A checkpoint step directory (default: the latest in workdir)."
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from metaembed_jax.cli import warnings_only_unless_verbosity_given
    from metaembed_jax.evaluation import runner

    warnings_only_unless_verbosity_given()
    table, _ = runner.run(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint)
    print(table)


if __name__ == "__main__":
    app.run(main)
