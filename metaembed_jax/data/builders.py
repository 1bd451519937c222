"""tensorflow-datasets builders (ArrayRecord, images as PNG bytes) and their readers.

Two standalone builders, written with `download_and_prepare(file_format="array_record")` and read
back with `tfds.builder_from_directory(...).as_data_source()` (no TensorFlow needed):

- `RetrievalPairs`: training pairs (schema "Retrieval training pair" of docs/design.md), one split
  per given split name. Layout: `<dataset dir>/retrieval_pairs/1.0.0/`.
- `RetrievalEval`: evaluation sets, one builder config per table (`corpus`, `queries`, `qrels`),
  one split per evaluation split. Queries carry `candidate_ids` (MMEB: the query's own ordered
  candidate list, positive first; empty = rank against the whole corpus).
  Layout: `<dataset dir>/retrieval_eval/<table>/1.0.0/`.

Stored order is the generation order (shuffling disabled): the pipeline shuffles, evaluation
keeps ids stable. Images are raw PNG bytes (b"" = no image), texts UTF-8.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from metaembed_jax.data import build_record, sources

VERSION = "1.0.0"
PAIR_TEXT_FIELDS = (
    "query_text",
    "positive_text",
    "negative_text",
    "task",
    "query_id",
    "positive_id",
    "negative_id",
)
PAIR_IMAGE_FIELDS = ("query_image", "positive_image", "negative_image")
EVAL_TABLES = ("corpus", "queries", "qrels")

Records = Iterable[tuple[str, dict[str, Any]]]


def _bytes_feature():
    return tfds.features.Tensor(shape=(), dtype=np.object_)


def _pair_features() -> tfds.features.FeaturesDict:
    spec = {name: tfds.features.Text() for name in PAIR_TEXT_FIELDS}
    spec.update({name: _bytes_feature() for name in PAIR_IMAGE_FIELDS})
    return tfds.features.FeaturesDict(spec)


def _eval_features(table: str) -> tfds.features.FeaturesDict:
    if table == "qrels":
        spec = {
            "query_id": tfds.features.Text(),
            "corpus_id": tfds.features.Text(),
            "score": tfds.features.Scalar(dtype=np.int32),
        }
    else:
        spec = {
            "id": tfds.features.Text(),
            "text": tfds.features.Text(),
            "image": _bytes_feature(),
            "task": tfds.features.Text(),
        }
        if table == "queries":
            spec["candidate_ids"] = tfds.features.Sequence(tfds.features.Text())
    return tfds.features.FeaturesDict(spec)


class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the records handed to the constructor: {split: records or a callable making them}."""

    VERSION = tfds.core.Version(VERSION)
    # tfds derives this through `importlib_resources` (not installed) for packaged builders.
    code_path = epath.Path(__file__)

    def __init__(
        self, *, split_records: dict[str, Records | Callable[[], Records]] | None = None, **kwargs
    ):
        self._split_records = split_records or {}
        super().__init__(**kwargs)

    def _features(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=self._features(), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(rows) for split, rows in self._split_records.items()}

    def _generate_examples(self, rows):
        yield from rows() if callable(rows) else rows


class RetrievalPairs(_RecordsBuilder):
    """Training pairs: query / positive / optional hard negative (texts, PNG bytes, ids)."""

    def _features(self):
        return _pair_features()


class RetrievalEval(_RecordsBuilder):
    """Evaluation tables: builder config `corpus`, `queries` or `qrels`."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=table) for table in EVAL_TABLES]

    def _features(self):
        return _eval_features(self.builder_config.name)


# ----------------------------------------------------------------------------- writing


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )


# Dataset name (config.data.name) -> its directory under config.data.dir.
DATASET_DIRS = {"synthetic": "synthetic", "mmeb": "mmeb_train"}


def pairs_path(dataset_dir: str | os.PathLike) -> Path:
    return Path(dataset_dir) / "retrieval_pairs" / VERSION


def eval_path(dataset_dir: str | os.PathLike, table: str) -> Path:
    return Path(dataset_dir) / "retrieval_eval" / table / VERSION


def is_built(path: str | os.PathLike) -> bool:
    """True when a builder directory holds a finished dataset (tfds writes the info last)."""
    return (Path(path) / "dataset_info.json").is_file()


def eval_set_built(dataset_dir: str | os.PathLike) -> bool:
    """True when every table of an evaluation set under `dataset_dir` is built."""
    return all(is_built(eval_path(dataset_dir, table)) for table in EVAL_TABLES)


def write_pairs(dataset_dir: str | os.PathLike, split_records: dict[str, Any]) -> Path:
    """Writes training pairs {split: records} under `dataset_dir` (skips if already built)."""
    path = pairs_path(dataset_dir)
    if not is_built(path):
        _prepare(RetrievalPairs(split_records=split_records, data_dir=str(dataset_dir)))
    return path


def write_eval_set(dataset_dir: str | os.PathLike, split_tables: dict[str, dict[str, Any]]) -> Path:
    """Writes evaluation tables {split: {"corpus"|"queries"|"qrels": records}} (skips if built)."""
    for table in EVAL_TABLES:
        if is_built(eval_path(dataset_dir, table)):
            continue
        records = {
            split: _with_defaults(tables[table], table) for split, tables in split_tables.items()
        }
        _prepare(RetrievalEval(config=table, split_records=records, data_dir=str(dataset_dir)))
    return Path(dataset_dir)


def _with_defaults(records, table: str) -> Callable[[], Records]:
    """Fills optional fields: queries without `candidate_ids` rank against the whole corpus."""

    def rows():
        for key, record in records() if callable(records) else records:
            if table == "queries" and "candidate_ids" not in record:
                record = {**record, "candidate_ids": []}
            yield key, record

    return rows


def _write_bad_rows(dataset_dir: str | os.PathLike, bad_rows: sources.BadRows) -> None:
    bad_rows.write(Path(dataset_dir) / "bad_rows.json")


def check_inputs(
    dataset_dir: str | os.PathLike, settings: dict[str, Any], files: list[str | os.PathLike]
) -> None:
    """`build_record.check_build_inputs` for a dataset directory of these builders: the parts
    they would reuse are the finished training pairs and evaluation tables."""
    built = is_built(pairs_path(dataset_dir)) or any(
        is_built(eval_path(dataset_dir, table)) for table in EVAL_TABLES
    )
    build_record.check_build_inputs(dataset_dir, settings, files, built=built)


def convert_mmeb_train(
    files: list[str | os.PathLike],
    image_root: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    skip_bad_rows: bool = False,
    split: str = "train",
    columns: dict[str, str] | None = None,
) -> sources.BadRows:
    """MMEB-style JSONL / parquet training files -> `RetrievalPairs` under `dataset_dir`.

    Returns the bad-row log (also written to `<dataset_dir>/bad_rows.json`).
    Raises sources.BadRowError on the first bad row unless `skip_bad_rows`; ValueError when
    `dataset_dir` was built from other files or settings (see `build_record`).
    """
    settings = {
        "builder": "mmeb_train",
        "image_root": str(Path(image_root).resolve()),
        "skip_bad_rows": bool(skip_bad_rows),
        "split": split,
        "columns": {**sources.MMEB_TRAIN_COLUMNS, **(columns or {})},
    }
    check_inputs(dataset_dir, settings, files)
    bad_rows = sources.BadRows(skip=skip_bad_rows)
    if is_built(pairs_path(dataset_dir)):
        return bad_rows
    records = lambda: sources.mmeb_train_records(files, image_root, bad_rows, columns)
    write_pairs(dataset_dir, {split: records})
    _write_bad_rows(dataset_dir, bad_rows)
    return bad_rows


def convert_mmeb_eval(
    files: list[str | os.PathLike],
    image_root: str | os.PathLike,
    dataset: str,
    dataset_dir: str | os.PathLike,
    skip_bad_rows: bool = False,
) -> sources.BadRows:
    """One MMEB evaluation dataset (parquet files) -> `RetrievalEval` split "test".

    Raises ValueError when `dataset_dir` was built from other files or settings."""
    settings = {
        "builder": "mmeb_eval",
        "dataset": dataset,
        "image_root": str(Path(image_root).resolve()),
        "skip_bad_rows": bool(skip_bad_rows),
    }
    check_inputs(dataset_dir, settings, files)
    bad_rows = sources.BadRows(skip=skip_bad_rows)
    if eval_set_built(dataset_dir):
        return bad_rows
    tables = sources.mmeb_eval_records(files, image_root, dataset, bad_rows)
    write_eval_set(dataset_dir, {"test": tables})
    _write_bad_rows(dataset_dir, bad_rows)
    return bad_rows


def convert_beir(
    root: str | os.PathLike, dataset_dir: str | os.PathLike, skip_bad_rows: bool = False
) -> sources.BadRows:
    """A ViDoRe / BEIR directory (corpus, queries, qrels parquet) -> `RetrievalEval` "test".

    Raises ValueError when `dataset_dir` was built from other files or settings."""
    files = [file for kind in EVAL_TABLES for file in sources.table_files(root, kind)]
    settings = {"builder": "beir", "skip_bad_rows": bool(skip_bad_rows)}
    check_inputs(dataset_dir, settings, files)
    bad_rows = sources.BadRows(skip=skip_bad_rows)
    if eval_set_built(dataset_dir):
        return bad_rows
    tables = sources.beir_records(root, bad_rows)
    write_eval_set(dataset_dir, {"test": tables})
    _write_bad_rows(dataset_dir, bad_rows)
    return bad_rows


# ----------------------------------------------------------------------------- reading


class RecordSource:
    """Random-access view of one built split: `len(source)`, `source[i]` -> record dict.

    Texts come back as str, images as PNG bytes, lists as lists. Picklable (grain workers).
    """

    def __init__(self, builder_dir: str | os.PathLike, split: str):
        self.builder_dir = str(builder_dir)
        self.split = split
        self._source = None

    def _open(self):
        if self._source is None:
            if not is_built(self.builder_dir):
                raise FileNotFoundError(
                    f"no built dataset at {self.builder_dir}: run "
                    "`metaembed data --config <config>` first"
                )
            builder = tfds.builder_from_directory(self.builder_dir)
            if self.split not in builder.info.splits:
                raise ValueError(
                    f"split {self.split!r} not in {self.builder_dir}: "
                    f"available {sorted(builder.info.splits)}"
                )
            self._source = builder.as_data_source(split=self.split)
        return self._source

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _decode(self._open()[index])

    def __getstate__(self):
        return {"builder_dir": self.builder_dir, "split": self.split, "_source": None}

    def __repr__(self) -> str:
        return f"RecordSource({self.builder_dir!r}, split={self.split!r})"


def _decode(value: Any) -> Any:
    """tfds numpy output -> python: Text bytes -> str (image fields stay bytes)."""
    if isinstance(value, dict):
        return {
            key: item if key.endswith("image") else _decode(item) for key, item in value.items()
        }
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_decode(item) for item in value]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def open_pairs(dataset_dir: str | os.PathLike, split: str = "train") -> RecordSource:
    """The training pairs of `split` of a dataset built by `write_pairs` / `convert_mmeb_train`."""
    return RecordSource(pairs_path(dataset_dir), split)


def open_eval_set(dataset_dir: str | os.PathLike, split: str = "test") -> dict[str, RecordSource]:
    """{"corpus", "queries", "qrels"} sources of an evaluation split."""
    return {table: RecordSource(eval_path(dataset_dir, table), split) for table in EVAL_TABLES}


def read_eval_set(dataset_dir: str | os.PathLike, split: str = "test") -> dict[str, Any]:
    """An evaluation split in memory: corpus / queries lists of records, qrels as
    {query_id: {corpus_id: score}} (the pytrec_eval layout)."""
    tables = open_eval_set(dataset_dir, split)
    qrels: dict[str, dict[str, int]] = {}
    for index in range(len(tables["qrels"])):
        row = tables["qrels"][index]
        qrels.setdefault(row["query_id"], {})[row["corpus_id"]] = int(row["score"])
    return {
        "corpus": [tables["corpus"][i] for i in range(len(tables["corpus"]))],
        "queries": [tables["queries"][i] for i in range(len(tables["queries"]))],
        "qrels": qrels,
    }


def read_mmeb_eval(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """A converted MMEB evaluation dataset as rows of the MMEB schema, images as bytes:
    {"dataset", "qry_text", "qry_image", "tgt_text": [..], "tgt_image": [..], "tgt_id": [..]}
    with the positive at candidate 0."""
    tables = read_eval_set(dataset_dir, "test")
    corpus = {item["id"]: item for item in tables["corpus"]}
    rows = []
    for query in tables["queries"]:
        candidates = [corpus[key] for key in query["candidate_ids"]]
        rows.append(
            {
                "dataset": query["task"],
                "qry_text": query["text"],
                "qry_image": query["image"],
                "tgt_text": [c["text"] for c in candidates],
                "tgt_image": [c["image"] for c in candidates],
                "tgt_id": [c["id"] for c in candidates],
            }
        )
    return rows
