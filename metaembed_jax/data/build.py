"""Builds the datasets a config names, under `config.data.dir` (idempotent: finished parts skip).

    metaembed data --config configs/demo.py [--config.data.dir=...] [--convert_eval]

- `config.data.name == "synthetic"`: the built-in dataset (`<dir>/synthetic`: training pairs for
  splits train / validation / test, evaluation tables for validation / test) and its tokenizer
  (`<dir>/tokenizer`), which carries the special tokens of the configured model's backbone
  family (`BackboneFamily.special_tokens`) and of no other.
- `config.data.name == "mmeb"`: MMEB-style training files `config.data.mmeb_train.files` ->
  `<dir>/mmeb_train`.
- `--convert_eval`: also converts `config.data.mmeb_eval.datasets` -> `<dir>/mmeb_eval/<name>`
  and each of `config.data.beir.roots` -> `<dir>/beir/<name>`.

Every dataset directory records what it was built from in `build_config.json` (the config
fields that change its rows; the input files' paths, sizes, modification times and sha256):
building again into it from other settings or changed files is refused, naming each difference,
instead of keeping the old rows (use another `config.data.dir` or delete the directory).

Bad rows of converted files raise (naming file and row) unless `config.data.skip_bad_rows`; the
skipped rows are counted, printed and listed in `<dataset dir>/bad_rows.json`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

from metaembed_jax.data import builders, sources, synthetic

# tfds split name -> the generator's split name.
SYNTHETIC_SPLITS = {"train": "train", "validation": "val", "test": "test"}
EVAL_SPLITS = ("validation", "test")


def _keyed(rows, key: str = "query_id"):
    for row in rows:
        yield row[key], row


def build_synthetic(data_config, special_tokens: Sequence[str], progress: bool = True) -> Path:
    """The built-in dataset and its tokenizer (with the family's `special_tokens`, pad token
    first) under `data_config.dir`; returns the dataset dir."""
    root = Path(data_config.dir)
    directory = root / builders.DATASET_DIRS["synthetic"]
    builders.check_inputs(directory, data_config.synthetic.to_dict(), [])
    cfg = synthetic.SyntheticConfig.from_mapping(
        data_config.synthetic, ignore=("vocab_size",), progress=progress
    )
    eval_splits = {SYNTHETIC_SPLITS[name] for name in EVAL_SPLITS}

    @functools.cache
    def rendered(split: str) -> list[dict]:
        # Validation / test records feed both the training pairs and the evaluation tables:
        # rendered once. Train stays a stream (it may not fit in memory).
        return synthetic.generate_train_rows(cfg, split)

    def records(split: str):
        return rendered(split) if split in eval_splits else synthetic.iter_train_rows(cfg, split)

    splits = {
        name: (lambda split=split: _keyed(records(split)))
        for name, split in SYNTHETIC_SPLITS.items()
        if cfg.size(split) > 0
    }
    builders.write_pairs(directory, splits)  # skips a finished build; the lambdas stay unread
    if not builders.eval_set_built(directory):
        tables = {}
        for name in EVAL_SPLITS:
            rows = synthetic.eval_tables(rendered(SYNTHETIC_SPLITS[name]))
            tables[name] = {
                "corpus": list(_keyed(rows["corpus"], "id")),
                "queries": list(_keyed(rows["queries"], "id")),
                "qrels": [(f"{q['query_id']}:{q['corpus_id']}", q) for q in rows["qrels"]],
            }
        builders.write_eval_set(directory, tables)
    tokenizer_dir = root / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        synthetic.build_tokenizer(
            cfg, tokenizer_dir, special_tokens, vocab_size=data_config.synthetic.vocab_size
        )
    return directory


def _report(name: str, bad_rows: sources.BadRows) -> None:
    if bad_rows.count:
        logging.warning("%s: skipped %d bad rows (listed in bad_rows.json)", name, bad_rows.count)
        print(f"{name}: skipped {bad_rows.count} bad rows (see bad_rows.json)")


def build_mmeb_train(data_config) -> Path:
    """Converts `config.data.mmeb_train.files` -> `<dir>/mmeb_train`."""
    files = list(data_config.mmeb_train.files)
    if not files:
        raise ValueError("config.data.name='mmeb' but config.data.mmeb_train.files is empty")
    directory = Path(data_config.dir) / builders.DATASET_DIRS["mmeb"]
    bad_rows = builders.convert_mmeb_train(
        files, data_config.mmeb_train.image_root, directory, data_config.skip_bad_rows
    )
    _report("mmeb_train", bad_rows)
    return directory


def convert_eval_sets(data_config) -> list[Path]:
    """Converts the configured MMEB evaluation datasets and ViDoRe / BEIR roots."""
    root = Path(data_config.dir)
    written = []
    for dataset in data_config.mmeb_eval.datasets:
        files = sources.table_files(data_config.mmeb_eval.root, dataset)
        directory = root / "mmeb_eval" / dataset
        image_root = data_config.mmeb_eval.image_root
        bad = builders.convert_mmeb_eval(
            files, image_root, dataset, directory, data_config.skip_bad_rows
        )
        _report(f"mmeb_eval/{dataset}", bad)
        written.append(directory)
    for beir_root in data_config.beir.roots:
        directory = root / "beir" / Path(beir_root).name
        _report(
            f"beir/{directory.name}",
            builders.convert_beir(beir_root, directory, data_config.skip_bad_rows),
        )
        written.append(directory)
    return written


def build(
    data_config,
    special_tokens: Sequence[str] = (),
    convert_eval: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Everything `data_config` needs; returns the dataset directories. `special_tokens`: the
    backbone family's (for the built-in dataset's tokenizer)."""
    if data_config.name == "synthetic":
        written = [build_synthetic(data_config, special_tokens, progress)]
    elif data_config.name == "mmeb":
        written = [build_mmeb_train(data_config)]
    else:
        raise ValueError(f"config.data.name={data_config.name!r}: expected 'synthetic' or 'mmeb'")
    if convert_eval:
        written += convert_eval_sets(data_config)
    return written
