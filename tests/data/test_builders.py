"""tfds builders and raw readers: each fixture round-trips; bad rows raise or are counted.

References: the fixture files read directly (json / pyarrow / PIL), independently of the readers.
"""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from metaembed_jax.data import builders, sources
from metaembed_jax.models.qwen2_vl.config import SPECIAL_TOKENS
from tests.paths import FIXTURES

tfds.disable_progress_bar()


def pixels(data) -> np.ndarray:
    """Decoded RGB pixels of image bytes or of a file."""
    data = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def fixture_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def expected_item(text: str, path: str):
    text = text.replace("<|image_1|>", "").strip()
    return text, (pixels(FIXTURES / path) if path else None)


def assert_item(record, side, text, image):
    assert record[f"{side}_text"] == text
    if image is None:
        assert record[f"{side}_image"] == b""
    else:
        assert record[f"{side}_image"].startswith(b"\x89PNG")
        np.testing.assert_array_equal(pixels(record[f"{side}_image"]), image)


@pytest.mark.parametrize("file", ["train.jsonl", "train.parquet"])
def test_mmeb_train_round_trip(tmp_path, file):
    """Every fixture row comes back: cleaned texts, identical pixels, negatives where given."""
    log = builders.convert_mmeb_train([FIXTURES / "mmeb_train" / file], FIXTURES, tmp_path)
    assert log.count == 0
    assert json.loads((tmp_path / "bad_rows.json").read_text())["count"] == 0
    source = builders.open_pairs(tmp_path, "train")
    rows = fixture_rows("mmeb_train/train.jsonl")
    assert len(source) == len(rows)
    for index, row in enumerate(rows):
        record = source[index]
        assert record["query_id"] == f"train:{index}" and record["task"] == "train"
        assert_item(record, "query", *expected_item(row["qry"], row["qry_image_path"]))
        assert_item(record, "positive", *expected_item(row["pos_text"], row["pos_image_path"]))
        assert_item(record, "negative", *expected_item(row["neg_text"], row["neg_image_path"]))
        assert bool(record["negative_id"]) == bool(row["neg_text"] or row["neg_image_path"])
    # Rows 1 and 2 have different positives; equal items would share a positive_id.
    assert len({source[i]["positive_id"] for i in range(len(rows))}) == len(rows)


def test_mmeb_eval_round_trip(tmp_path):
    """Queries keep their ordered candidate lists (positive first); candidates deduplicated."""
    builders.convert_mmeb_eval(
        [FIXTURES / "mmeb_eval" / "ToyRetrieval.parquet"], FIXTURES, "ToyRetrieval", tmp_path
    )
    rows = pq.read_table(FIXTURES / "mmeb_eval" / "ToyRetrieval.parquet").to_pylist()
    converted = builders.read_mmeb_eval(tmp_path)
    assert len(converted) == len(rows)
    for row, out in zip(rows, converted, strict=True):
        assert out["dataset"] == "ToyRetrieval"
        assert out["qry_text"] == row["qry_text"].replace("<|image_1|>", "").strip()
        assert out["tgt_text"] == row["tgt_text"]
        for path, data in zip(row["tgt_img_path"], out["tgt_image"], strict=True):
            if path:
                np.testing.assert_array_equal(pixels(data), pixels(FIXTURES / path))
            else:
                assert data == b""
    tables = builders.read_eval_set(tmp_path, "test")
    pairs = [zip(row["tgt_text"], row["tgt_img_path"], strict=True) for row in rows]
    unique = {pair for row_pairs in pairs for pair in row_pairs}
    assert len(tables["corpus"]) == len(unique)
    for query, out in zip(tables["queries"], converted, strict=True):
        assert tables["qrels"][query["id"]] == {out["tgt_id"][0]: 1}


def test_vidore_round_trip(tmp_path):
    """ViDoRe parquet: image dicts (PNG and JPEG) become PNG with identical pixels; qrels kept."""
    builders.convert_beir(FIXTURES / "vidore", tmp_path)
    tables = builders.read_eval_set(tmp_path, "test")
    corpus = pq.read_table(FIXTURES / "vidore" / "corpus.parquet").to_pylist()
    assert [item["id"] for item in tables["corpus"]] == [str(r["corpus-id"]) for r in corpus]
    for item, row in zip(tables["corpus"], corpus, strict=True):
        assert item["image"].startswith(b"\x89PNG") and item["text"] == ""
        assert item["task"] == "vidore"
        np.testing.assert_array_equal(pixels(item["image"]), pixels(row["image"]["bytes"]))
    queries = pq.read_table(FIXTURES / "vidore" / "queries.parquet").to_pylist()
    assert [(q["id"], q["text"], q["image"]) for q in tables["queries"]] == [
        (str(r["query-id"]), r["query"], b"") for r in queries
    ]
    assert tables["qrels"] == {"10": {"0": 1}, "11": {"2": 2}}


def test_beir_text_round_trip(tmp_path):
    """Text BEIR: title prepended to the text, string ids, qrels as {qid: {docid: score}}."""
    builders.convert_beir(FIXTURES / "beir", tmp_path)
    tables = builders.read_eval_set(tmp_path, "test")
    assert [(c["id"], c["text"]) for c in tables["corpus"]] == [
        ("d1", "Colours\nRed is warm."),
        ("d2", "Blue is cold."),
    ]
    assert tables["qrels"] == {"q1": {"d1": 1}}


def test_convert_is_idempotent(tmp_path):
    """A second conversion of a built dataset does not rewrite it."""
    files = [FIXTURES / "mmeb_train" / "train.jsonl"]
    builders.convert_mmeb_train(files, FIXTURES, tmp_path)
    record_file = next(builders.pairs_path(tmp_path).glob("*.array_record*"))
    before = record_file.stat().st_mtime_ns
    builders.convert_mmeb_train(files, FIXTURES, tmp_path)
    assert record_file.stat().st_mtime_ns == before


# ----------------------------------------------------------------------------- bad rows


def bad_train_files(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the fixture with one bad row of each kind appended (rows 4..7)."""
    root = tmp_path / "raw"
    shutil.copytree(FIXTURES / "images", root / "images")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    good = fixture_rows("mmeb_train/train.jsonl")
    bad = [
        {**good[0], "qry_image_path": "images/missing.png"},
        {**good[0], "qry_image_path": "images/broken.png"},
        {**good[3], "pos_text": "  "},
        {key: value for key, value in good[3].items() if key != "pos_text"},
    ]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in good + bad))
    return path, root


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        (4, r"row 4: image file not found: .*images/missing\.png"),
        (5, r"row 5: cannot decode image .*images/broken\.png"),
        (6, r"row 6: positive has an empty text and no image"),
        (7, r"row 7: missing column 'pos_text'"),
    ],
)
def test_bad_row_errors_name_row_and_file(tmp_path, bad_row, message):
    """Each kind of bad row raises BadRowError naming the input file, the row and the cause."""
    path, root = bad_train_files(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4] + [lines[bad_row]]) + "\n")
    message = message.replace(f"row {bad_row}", "row 4")
    with pytest.raises(sources.BadRowError, match=f"train\\.jsonl: {message}"):
        builders.convert_mmeb_train([path], root, tmp_path / "out")


def test_skip_bad_rows_counts_and_reports(tmp_path):
    """skip_bad_rows: the 4 good rows are built, the 4 bad ones counted and listed, none lost."""
    path, root = bad_train_files(tmp_path)
    out = tmp_path / "out"
    log = builders.convert_mmeb_train([path], root, out, skip_bad_rows=True)
    assert log.count == 4
    report = json.loads((out / "bad_rows.json").read_text())
    assert report["count"] == 4 and [row["row"] for row in report["rows"]] == [4, 5, 6, 7]
    source = builders.open_pairs(out)
    assert [source[i]["query_id"] for i in range(len(source))] == [f"train:{i}" for i in range(4)]


def test_parquet_missing_column_and_unknown_qrel(tmp_path):
    """A parquet file without a required column fails on its first row; a qrel pointing to an
    unknown document is a bad row of the qrels file."""
    rows = pq.read_table(FIXTURES / "mmeb_eval" / "ToyRetrieval.parquet").drop(["tgt_text"])
    pq.write_table(rows, tmp_path / "Bad.parquet")
    with pytest.raises(
        sources.BadRowError, match=r"Bad\.parquet: row 0: missing column 'tgt_text'"
    ):
        builders.convert_mmeb_eval([tmp_path / "Bad.parquet"], FIXTURES, "Bad", tmp_path / "o")
    beir = tmp_path / "beir"
    shutil.copytree(FIXTURES / "beir", beir)
    qrels = pa.Table.from_pylist([{"query-id": "q1", "corpus-id": "nope", "score": 1}])
    pq.write_table(qrels, beir / "qrels.parquet")
    with pytest.raises(sources.BadRowError, match=r"qrels\.parquet: row 0: corpus_id 'nope'"):
        builders.convert_beir(beir, tmp_path / "b")


def test_open_unbuilt_dataset_names_directory(tmp_path):
    """Reading a dataset that was never built says where and what to run."""
    with pytest.raises(FileNotFoundError, match="metaembed data --config"):
        len(builders.open_pairs(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- built-in dataset


def test_build_synthetic_round_trip_and_idempotence(tmp_path):
    """build.py writes exactly the generator's rows (train/validation/test pairs, eval tables),
    the tokenizer, skips a second build, and refuses a directory built with other settings."""
    from metaembed_jax.data import build, synthetic
    from metaembed_jax.data.config import get_data_config

    config = get_data_config()
    config.dir = str(tmp_path)
    config.synthetic.update(num_train=6, num_val=3, num_test=3, image_size=56, vocab_size=300)
    directory = build.build_synthetic(config, SPECIAL_TOKENS, progress=False)
    cfg = synthetic.SyntheticConfig.from_mapping(
        config.synthetic, ignore=("vocab_size",), progress=False
    )
    for name, split in build.SYNTHETIC_SPLITS.items():
        source = builders.open_pairs(directory, name)
        assert [source[i] for i in range(len(source))] == synthetic.generate_train_rows(cfg, split)
    for name in build.EVAL_SPLITS:
        expected = synthetic.generate_eval_set(cfg, build.SYNTHETIC_SPLITS[name])
        tables = builders.read_eval_set(directory, name)
        assert tables["corpus"] == expected["corpus"]
        assert tables["queries"] == [{**q, "candidate_ids": []} for q in expected["queries"]]
        assert tables["qrels"] == {q["query_id"]: {q["corpus_id"]: 1} for q in expected["qrels"]}
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    record_file = next(builders.pairs_path(directory).glob("*train.array_record*"))
    before = record_file.stat().st_mtime_ns
    build.build_synthetic(config, SPECIAL_TOKENS, progress=False)
    assert record_file.stat().st_mtime_ns == before
    config.synthetic.seed = 1
    with pytest.raises(ValueError, match="was built with .*use another config.data.dir"):
        build.build_synthetic(config, SPECIAL_TOKENS, progress=False)


def test_build_cli_converts_user_datasets(tmp_path):
    """build() with name="mmeb" converts the training files where the pipeline reads them, and
    convert_eval converts the MMEB eval / BEIR sets under <dir>/mmeb_eval, <dir>/beir."""
    from metaembed_jax.data import build, pipeline
    from metaembed_jax.data.config import get_data_config

    config = get_data_config()
    config.dir = str(tmp_path)
    config.name = "mmeb"
    config.mmeb_train.update(files=(str(FIXTURES / "mmeb_train" / "train.parquet"),))
    config.mmeb_train.image_root = str(FIXTURES)
    config.mmeb_eval.update(root=str(FIXTURES / "mmeb_eval"), image_root=str(FIXTURES))
    config.mmeb_eval.datasets = ("ToyRetrieval",)
    config.beir.roots = (str(FIXTURES / "beir"),)
    written = build.build(config, convert_eval=True)
    assert written == [
        tmp_path / "mmeb_train",
        tmp_path / "mmeb_eval" / "ToyRetrieval",
        tmp_path / "beir" / "beir",
    ]
    source = builders.open_pairs(pipeline.dataset_dir(config))
    assert [source[i]["query_id"] for i in range(len(source))] == [f"train:{i}" for i in range(4)]
    assert len(builders.read_mmeb_eval(written[1])) == 3
    assert builders.read_eval_set(written[2])["qrels"] == {"q1": {"d1": 1}}
