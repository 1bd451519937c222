"""Evaluate a trained MetaEmbed at every retrieval budget and print the scaling table.

    python eval.py --workdir runs/demo                   # the run's own saved config
    python eval.py --workdir DIR --checkpoint 400        # an earlier step
    python eval.py --config configs/demo.py --workdir DIR --config.eval.budgets='((1,1),(16,64))'

Without `--config`, the run's saved DIR/config.json is used; a `--config` given must name the
same model / loss / LoRA / base checkpoint as the run (its eval settings may differ). Reads the
latest checkpoint of `--workdir` (or `--checkpoint`), encodes the evaluation sets
once (cached under DIR/eval/cache), scores each budget of `config.eval.budgets`, prints one row
per budget and writes DIR/eval/results.json and DIR/eval/scaling.png. The logic lives in
`metaembed_jax.evaluation.runner`; an installed package runs it as `metaembed eval`.
"""

from metaembed_jax.cli.apps import run_eval

if __name__ == "__main__":
    run_eval()
