"""Synthetic dataset: determinism, disjoint splits, one-attribute hard negatives, rendering."""

import hashlib
import inspect
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from metaembed_jax.data import synthetic as S
from metaembed_jax.data.synthetic_render import COLORS, JITTER_FRACTION
from metaembed_jax.models.qwen2_vl.config import SPECIAL_TOKENS
from metaembed_jax.models.qwen2_vl.processing import QwenVLProcessor
from tests.helpers import RECORD_FIELDS, check_features, process_records, special_token_ids


def scene_difference(a: S.Scene, b: S.Scene) -> list[tuple[int, str]]:
    """(object index, attribute) pairs where the scenes differ; [(-1, "count")] if sizes do."""
    if len(a.objects) != len(b.objects):
        return [(-1, "count")]
    diffs = []
    for i, (x, y) in enumerate(zip(a.objects, b.objects, strict=True)):
        ax, ay = x.attributes(), y.attributes()
        diffs += [(i, name) for name in S.SCENE_ATTRIBUTES if ax[name] != ay[name]]
    return diffs


def document_difference(a: S.Document, b: S.Document) -> list[str]:
    """Names of the fields (table cells and labels one by one) where two pages differ."""
    diffs = [f for f in ("entity", "kind", "founded", "staff") if getattr(a, f) != getattr(b, f)]
    for field in ("years", "metrics"):
        x, y = getattr(a, field), getattr(b, field)
        if len(x) != len(y):
            diffs.append(field)
        else:
            diffs += [f"{field}[{i}]" for i in range(len(x)) if x[i] != y[i]]
    for i, (x, y) in enumerate(zip(a.values, b.values, strict=False)):
        diffs += [f"values[{i}][{j}]" for j in range(min(len(x), len(y))) if x[j] != y[j]]
    return diffs


CFG = S.SyntheticConfig(
    seed=3, num_train=50, num_val=20, num_test=30, image_size=56, word_prob=0.3, progress=False,
    tasks=S.TASKS,
)  # fmt: skip
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def rows():
    return {split: S.generate_train_rows(CFG, split) for split in SPLITS}


def _decode(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_deterministic_from_seed(rows):
    """Same config -> byte-identical rows; another seed -> different data."""
    S._plan_all.cache_clear()  # re-plan from scratch, not from the cache
    again = S.generate_train_rows(CFG, "train")
    assert again == rows["train"]
    other = S.generate_train_rows(S.SyntheticConfig(**{**vars(CFG), "seed": 4}), "train")
    assert [r["query_text"] for r in other] != [r["query_text"] for r in rows["train"]]


def _digest(rows):
    digest = hashlib.sha256()
    for row in rows:
        for key in sorted(row):
            value = row[key]
            digest.update(key.encode() + (value if isinstance(value, bytes) else value.encode()))
    return digest.hexdigest()


def test_deterministic_across_processes(rows):
    """Another interpreter with another hash seed produces the same bytes (no hash() salt)."""
    code = (
        "import hashlib; from metaembed_jax.data.synthetic import *\n"
        f"rows = generate_train_rows({CFG!r}, 'val')\n"
        + inspect.getsource(_digest)
        + "print(_digest(rows))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == _digest(rows["val"])


def test_eval_sets_do_not_depend_on_train_size():
    """Test/val are planned first, so growing the train split leaves them unchanged."""
    bigger = S.SyntheticConfig(**{**vars(CFG), "num_train": 96})
    assert S.plan_examples(bigger, "test") == S.plan_examples(CFG, "test")
    assert S.plan_examples(bigger, "val") == S.plan_examples(CFG, "val")


def test_rows_follow_record_schema(rows):
    """Exact record keys (docs/design.md) and types; tasks round-robin; ids unique."""
    for split, split_rows in rows.items():
        assert len(split_rows) == CFG.size(split)
        for i, row in enumerate(split_rows):
            assert tuple(sorted(row)) == tuple(sorted(RECORD_FIELDS))
            assert row["task"] == CFG.tasks[i % len(CFG.tasks)]
            for side in ("query", "positive", "negative"):
                assert isinstance(row[f"{side}_text"], str)
                assert isinstance(row[f"{side}_image"], bytes)
                assert row[f"{side}_text"] or row[f"{side}_image"]
        ids = [r[k] for r in split_rows for k in ("query_id", "positive_id", "negative_id")]
        assert len(set(ids)) == len(ids)


def test_splits_share_no_item(rows):
    """No image, caption or scene/page appears in two splits (or twice in one split)."""
    seen_images, seen_texts, seen_keys = {}, {}, {}
    for split in SPLITS:
        for row in rows[split]:
            for side in ("positive", "negative"):
                for store, value in ((seen_images, row[f"{side}_image"]),
                                     (seen_texts, row[f"{side}_text"])):  # fmt: skip
                    if value:
                        assert value not in store, f"{split} repeats an item of {store[value]}"
                        store[value] = split
        for example in S.plan_examples(CFG, split):
            for key in S._item_keys(example):
                assert seen_keys.setdefault(key, split) == split


def test_hard_negatives_differ_in_exactly_one_attribute():
    """On the structured descriptions: one attribute of one object (or one page field)."""
    for split in SPLITS:
        for example in S.plan_examples(CFG, split):
            if example.task == "documents":
                diff = document_difference(example.positive, example.negative)
                assert len(diff) == 1, diff
                named = {"entity": example.positive.entity}
                field = diff[0]
                if field.startswith("years"):
                    named[field] = str(example.positive.years[int(field[6])])
                elif field.startswith("metrics"):
                    named[field] = example.positive.metrics[int(field[8])]
                # the changed field is one the question relies on
                assert named.get(field, example.positive.entity) in example.query_text
            else:
                assert len(scene_difference(example.positive, example.negative)) == 1


def _partial_examples(cfg, split):
    return [e for e in S.plan_examples(cfg, split) if e.task == "partial_match"]


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        S.SyntheticConfig(
            grid_size=2,
            max_objects=3,  # (other tasks' scenes; unused here)
            partial_objects=4,
            partial_named=2,
            word_prob=0.0,
            num_train=400,
            num_val=40,
            num_test=120,
            tasks=("partial_match",),
            progress=False,
        ),
    ],  # fmt: skip
    ids=["3x3-3-objects", "full-2x2"],
)
def test_partial_match_queries_name_only_objects_of_their_positive(cfg):
    """The query names `partial_named` objects, all of its positive's and no other; its hard
    negative changes one attribute of a named object; within a split, no item but the positive
    holds every named object (so the one relevant item in qrels is the only match)."""
    for split in SPLITS:
        examples = _partial_examples(cfg, split)
        assert len(examples) == cfg.size(split) // len(cfg.tasks)
        items = [(e.positive_id, e.positive) for e in examples]
        items += [(e.negative_id, e.negative) for e in examples]
        for example in examples:
            scene, text = example.positive, example.query_text
            assert len(scene.objects) == cfg.partial_objects
            assert len(set(example.named)) == cfg.partial_named
            for i, obj in enumerate(scene.objects):
                phrase = S.object_phrase(obj, cfg.grid_size)
                assert (phrase in text) == (i in example.named), (phrase, text)
            assert text.count(" at the ") == cfg.partial_named
            diff = scene_difference(scene, example.negative)
            assert len(diff) == 1 and diff[0][0] in example.named
            named = {tuple(scene.objects[i].attributes().values()) for i in example.named}
            holders = [
                item_id
                for item_id, item in items
                if named <= {tuple(o.attributes().values()) for o in item.objects}
            ]
            assert holders == [example.positive_id]


def test_composed_edit_matches_its_text():
    """The edited scene differs from the query scene exactly as the modification text says."""
    examples = [e for s in SPLITS for e in S.plan_examples(CFG, s) if e.task == "composed"]
    for example in examples:
        source, target, text = example.query_scene, example.positive, example.query_text
        by_name = {o.name: o for o in source.objects}
        if text.startswith("remove the "):
            gone = by_name[text.removeprefix("remove the ")]
            assert tuple(o for o in source.objects if o is not gone) == target.objects
            continue
        if text.startswith("add "):
            assert target.objects[:-1] == source.objects
            assert text == "add " + S.object_phrase(target.objects[-1], CFG.grid_size)
            continue
        diff = scene_difference(source, target)
        assert len(diff) == 1
        index, attribute = diff[0]
        changed = target.objects[index]
        assert f"the {source.objects[index].name} " in text
        if attribute == "position":
            where = S.position_name(changed.row, changed.col, CFG.grid_size)
            assert text.endswith(f"to the {where}")
        else:
            assert text.endswith(str(getattr(changed, attribute)))


def test_captions_name_every_object_and_images_draw_them(rows):
    """Caption = phrase of each object; each object's colour is at its centre in the PNG."""
    examples = S.plan_examples(CFG, "train")
    for example, row in zip(examples, rows["train"], strict=True):
        if example.task not in ("text_to_image", "image_to_text"):
            continue
        scene = example.positive
        text = row["query_text"] or row["positive_text"]
        assert text == S.caption(scene, CFG.grid_size)
        lowered = text[0].lower() + text[1:]
        for obj in scene.objects:
            assert S.object_phrase(obj, CFG.grid_size) in lowered
        image = _decode(row["positive_image"] or row["query_image"])
        cell = CFG.image_size / CFG.grid_size
        for obj in scene.objects:
            if obj.word:
                continue  # the word covers the centre
            x = int((obj.col + 0.5 + JITTER_FRACTION * obj.jitter[0]) * cell)
            y = int((obj.row + 0.5 + JITTER_FRACTION * obj.jitter[1]) * cell)
            np.testing.assert_allclose(image[y, x], COLORS[obj.color], atol=40)


def test_eval_set_structure():
    """corpus/queries/qrels rows: ids unique, qrels point at the positive of the same task."""
    evaluation = S.generate_eval_set(CFG, "validation")
    corpus = {row["id"]: row for row in evaluation["corpus"]}
    queries = {row["id"]: row for row in evaluation["queries"]}
    assert len(corpus) == 2 * CFG.num_val and len(queries) == CFG.num_val
    assert len(evaluation["qrels"]) == CFG.num_val
    for qrel in evaluation["qrels"]:
        assert qrel["score"] == 1 and qrel["corpus_id"].endswith("-p")
        assert corpus[qrel["corpus_id"]]["task"] == queries[qrel["query_id"]]["task"]
    for row in corpus.values():
        assert set(row) == {"id", "text", "image", "task"}
        assert bool(row["text"]) != bool(row["image"])  # captions or images, never both
        assert (row["task"] == "image_to_text") == bool(row["text"])


def test_tokenizer_from_dataset_text_feeds_processor(tmp_path, rows):
    """Trained tokenizer loads with AutoTokenizer offline, has the Qwen specials at 0..7, and
    the processor turns the dataset's rows into contract-valid features."""
    S.build_tokenizer(CFG, tmp_path, SPECIAL_TOKENS, vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(8))
    assert len(tokenizer) <= 400 and special_token_ids(tokenizer)["image_token_id"] == 6
    caption = rows["train"][0]["query_text"]
    ids = tokenizer(caption)["input_ids"]
    assert tokenizer.decode(ids) == caption and len(ids) < len(caption) / 2
    proc = QwenVLProcessor.from_pretrained(tmp_path, max_pixels=56 * 56, length_buckets=(128, 256))
    for side in ("query", "positive", "negative"):
        features = process_records(proc, rows["train"][:8], side)
        check_features(features, proc.image_token_id)
        assert features["input_ids"].shape[1] in (128, 256)


def test_config_errors_and_exhaustion():
    """Bad options raise ValueError naming them; an exhausted scene space a RuntimeError."""
    with pytest.raises(ValueError, match="tasks must be a non-empty subset"):
        S.SyntheticConfig(tasks=("video",))
    with pytest.raises(ValueError, match="max_objects"):
        S.SyntheticConfig(max_objects=9)
    with pytest.raises(ValueError, match="partial_named < partial_objects"):
        S.SyntheticConfig(partial_objects=2, partial_named=2)
    with pytest.raises(ValueError, match="split must be one of"):
        S.plan_examples(CFG, "dev2")
    tiny = S.SyntheticConfig(grid_size=2, max_objects=1, word_prob=0.0, num_test=500,
                             num_val=0, num_train=0, tasks=("text_to_image",))  # fmt: skip
    with pytest.raises(RuntimeError, match=re.escape("scene space is exhausted")):
        S.plan_examples(tiny, "test")
    assert S.SyntheticConfig.from_mapping({"seed": 5}, num_train=3).num_train == 3
    mapping = {"seed": 5, "vocab_size": 300}
    assert S.SyntheticConfig.from_mapping(mapping, ignore=("vocab_size",)).seed == 5
    with pytest.raises(ValueError, match=r"unknown config.data.synthetic key\(s\) \['dir'\]"):
        S.SyntheticConfig.from_mapping({"seed": 5, "dir": "/x"})
