"""Evaluate a trained MetaEmbed at every retrieval budget and print the scaling table.

    python eval.py --workdir runs/demo                   # the run's own saved config
    python eval.py --workdir DIR --checkpoint 400        # an earlier step
    python eval.py --config configs/demo.py --workdir DIR --config.eval.budgets='((1,1),(16,64))'

Without `--config`, the run's saved DIR/config.json is used; a `--config` given must name the
same model / loss / LoRA / base checkpoint as the run (its eval settings may differ). Reads the
latest checkpoint of `--workdir` (or `--checkpoint`), encodes the evaluation sets
once (cached under DIR/eval/cache), scores each budget of `config.eval.budgets`, prints one row
per budget and writes DIR/eval/results.json and DIR/eval/scaling.png. The logic lives in
`metaembed_jax.evaluation.runner`.
"""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Recipe file (configs/*.py); default: the run's config.json.", lock_config=True
)
flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints are read and eval/ is written here."
)
flags.DEFINE_string(
    "checkpoint",
    None,
    "A step of workdir (400) or a step directory DIR/checkpoints/400 (default: the latest).",
)
flags.mark_flags_as_required(["workdir"])
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
