"""A procedural multimodal retrieval dataset, generated locally and deterministically from a seed.

Five tasks (the first four by default), each example a (query, positive, hard negative) triple:
  text_to_image  caption of a scene -> the scene's image
  image_to_text  scene image -> its caption
  composed       scene image + modification text ("make the red circle blue") -> edited scene
  documents      question about one fact ("What was the revenue of Valoria in 2019?") -> the page
  partial_match  text naming some objects of a busier scene ("Contains a small red circle at
                 the top left and a large blue star at the center.") -> the scene's image

Scenes hold 1-5 objects (shape, colour, size, grid cell, optional word); captions name every
object, so one vector has to summarise several objects and more vectors help. Partial-match
queries name only `partial_named` of a scene's `partial_objects` objects (the paper's motivation
for late interaction: a query matches part of a candidate); within a split no other item holds
every object a query names. Each hard negative differs from its positive in exactly one attribute
of one object (for partial matches: of a named object; for pages: one field that the question
depends on). Every scene/page/caption is a distinct item: no item appears twice, within
or across splits (test is planned first, then val, then train, against one set of used items, so
the evaluation sets do not change when the train size does).

Structured descriptions (`Scene`, `Document`, `Example`) come from `plan_examples`; rows in the
record schema of docs/design.md from `generate_train_rows` / `generate_eval_set`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import random
from collections.abc import Iterable, Iterator, Mapping

from tqdm.auto import tqdm

from metaembed_jax.data import synthetic_render as render
from metaembed_jax.data.synthetic_documents import (  # noqa: F401 (public names of the dataset)
    KINDS,
    METRICS,
    Document,
    document_texts,
    make_document,
    perturb_document,
)
from metaembed_jax.data.tokenizer import train_tokenizer

TASKS = ("text_to_image", "image_to_text", "composed", "documents", "partial_match")
DEFAULT_TASKS = TASKS[:4]
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
_TASK_CODES = {
    "text_to_image": "t2i",
    "image_to_text": "i2t",
    "composed": "cir",
    "documents": "doc",
    "partial_match": "pm",
}
_MAX_ATTEMPTS = 200


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Options of the synthetic dataset (all sizes are numbers of examples = queries)."""

    seed: int = 0  # everything is a function of this seed (and the other fields)
    num_train: int = 2048  # training triples
    num_val: int = 128  # validation queries (and triples)
    num_test: int = 256  # test queries (and triples)
    tasks: tuple[str, ...] = DEFAULT_TASKS  # tasks to generate, round-robin over example indices
    image_size: int = 112  # scene images are image_size x image_size pixels
    doc_width: int | None = None  # document page width in pixels (None: image_size)
    doc_height: int | None = None  # page height in pixels (None: 5/4 of the width, portrait)
    grid_size: int = 3  # objects sit on a grid_size x grid_size grid
    min_objects: int = 1  # objects per scene, at least
    max_objects: int = 5  # objects per scene, at most
    word_prob: float = 0.1  # probability that an object carries a short word
    partial_objects: int = 3  # objects per partial_match scene (at most grid_size**2)
    partial_named: int = 2  # objects a partial_match query names (fewer than partial_objects)
    supersample: int = 2  # draw scenes at this multiple of the size, then downsample (smooth edges)
    progress: bool = True  # tqdm progress bar while rendering

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.doc_width is None:
            object.__setattr__(self, "doc_width", self.image_size)
        if self.doc_height is None:
            object.__setattr__(self, "doc_height", self.doc_width * 5 // 4)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid_size**2 - 1:
            raise ValueError(
                "need 1 <= min_objects <= max_objects <= grid_size**2 - 1 (a free cell for "
                f"moves), got {self.min_objects}, {self.max_objects}, grid_size={self.grid_size}"
            )
        if not 1 <= self.partial_named < self.partial_objects <= self.grid_size**2:
            raise ValueError(
                "need 1 <= partial_named < partial_objects <= grid_size**2, got "
                f"{self.partial_named}, {self.partial_objects}, grid_size={self.grid_size}"
            )
        if self.image_size < 28 or min(self.doc_width, self.doc_height) < 28:
            raise ValueError("image_size, doc_width and doc_height must be >= 28 pixels")
        if not 0.0 <= self.word_prob <= 1.0:
            raise ValueError(f"word_prob must be in [0, 1], got {self.word_prob}")

    @classmethod
    def from_mapping(
        cls, mapping: Mapping, ignore: Iterable[str] = (), **overrides
    ) -> SyntheticConfig:
        """From a dict / ConfigDict (`config.data.synthetic`); keys in `ignore` are skipped.

        Raises ValueError naming any other key that is not a field (a typo would otherwise
        silently generate the default dataset)."""
        names = {f.name for f in dataclasses.fields(cls)}
        items = {k: v for k, v in dict(mapping.items()).items() if k not in set(ignore)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ValueError(
                f"unknown config.data.synthetic key(s) {unknown}; expected fields of "
                f"SyntheticConfig: {sorted(names)}"
            )
        return cls(**{**items, **overrides})

    def size(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


def synthetic_settings(cfg: SyntheticConfig) -> dict:
    """The generator settings of `cfg` as config values (what `config.data.synthetic` holds and
    `build_config.json` records); `progress` is a display option, not a setting."""
    settings = dataclasses.asdict(cfg)
    del settings["progress"]
    return settings


def canonical_split(split: str) -> str:
    """'train' | 'val' | 'test' (also accepts 'validation')."""
    name = _SPLIT_ALIASES.get(split, split)
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or 'validation'), got {split!r}")
    return name


# ------------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS = tuple(render.COLORS)
SIZES = ("small", "large")
WORDS = ("cat", "dog", "sun", "map", "box", "key", "cup", "pen", "hat", "owl", "fig", "jam")
SCENE_ATTRIBUTES = ("shape", "color", "size", "position", "word")


# ------------------------------------------------------------------------------- structures


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object; `jitter` (offset in the cell, [-1, 1]^2) is drawing noise, not an attribute."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    word: str = ""
    jitter: tuple[float, float] = (0.0, 0.0)

    def attributes(self) -> dict:
        position = (self.row, self.col)
        return {"shape": self.shape, "color": self.color, "size": self.size,
                "position": position, "word": self.word}  # fmt: skip

    @property
    def name(self) -> str:
        """How text refers to the object; (colour, shape) is unique within a scene."""
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    def signature(self) -> tuple:
        """Identity of the item: the set of objects' attributes (order and jitter ignored)."""
        return ("scene", tuple(sorted(tuple(o.attributes().values()) for o in self.objects)))

    def replace_object(self, index: int, obj: SceneObject) -> Scene:
        return Scene(self.objects[:index] + (obj,) + self.objects[index + 1 :])


@dataclasses.dataclass(frozen=True)
class Example:
    """One (query, positive, hard negative) triple, before rendering.

    `query_scene` is the query image (None for text queries); `positive`/`negative` are Scenes
    (rendered as images, or as captions for image_to_text) or Documents (rendered as pages).
    """

    task: str
    split: str
    index: int
    query_id: str
    positive_id: str
    negative_id: str
    query_text: str
    query_scene: Scene | None
    positive: Scene | Document
    negative: Scene | Document
    named: tuple[int, ...] = ()  # partial_match: the positive's objects the query names


# ------------------------------------------------------------------------------- scenes


def random_scene(rng: random.Random, cfg: SyntheticConfig, count: int | None = None) -> Scene:
    """`count` (default: min_objects to max_objects) objects in distinct cells, with distinct
    (colour, shape) so text can name each."""
    g = cfg.grid_size
    count = rng.randint(cfg.min_objects, cfg.max_objects) if count is None else count
    cells = rng.sample(range(g * g), count)
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLORS], count)
    objects = tuple(_random_object(rng, cfg, shape, color, cell // g, cell % g)
                    for (shape, color), cell in zip(pairs, cells, strict=True))  # fmt: skip
    return Scene(objects)


def _random_object(rng, cfg, shape: str, color: str, row: int, col: int) -> SceneObject:
    word = rng.choice(WORDS) if rng.random() < cfg.word_prob else ""
    jitter = (round(rng.uniform(-1, 1), 3), round(rng.uniform(-1, 1), 3))
    return SceneObject(shape, color, rng.choice(SIZES), row, col, word, jitter)


def _attribute_options(scene: Scene, index: int, attribute: str, grid_size: int) -> list:
    """Values `attribute` of object `index` can take that keep the scene valid and change it."""
    obj = scene.objects[index]
    others = [o for j, o in enumerate(scene.objects) if j != index]
    pairs = {(o.shape, o.color) for o in others}
    if attribute == "shape":
        return [s for s in SHAPES if s != obj.shape and (s, obj.color) not in pairs]
    if attribute == "color":
        return [c for c in COLORS if c != obj.color and (obj.shape, c) not in pairs]
    if attribute == "size":
        return [z for z in SIZES if z != obj.size]
    if attribute == "position":
        taken = {(o.row, o.col) for o in scene.objects}
        cells = [(r, c) for r in range(grid_size) for c in range(grid_size)]
        return [cell for cell in cells if cell not in taken]
    if attribute == "word":
        return [w for w in WORDS if w != obj.word] if obj.word else []
    raise ValueError(f"unknown attribute {attribute!r}; expected one of {SCENE_ATTRIBUTES}")


def _with_attribute(obj: SceneObject, attribute: str, value) -> SceneObject:
    if attribute == "position":
        return dataclasses.replace(obj, row=value[0], col=value[1])
    return dataclasses.replace(obj, **{attribute: value})


def perturb_scene(scene: Scene, rng, cfg, index=None, attributes=SCENE_ATTRIBUTES) -> Scene:
    """The scene with exactly one attribute of one object changed (the hard negative)."""
    indices = range(len(scene.objects)) if index is None else [index]
    choices = [(i, a) for i in indices for a in attributes
               if _attribute_options(scene, i, a, cfg.grid_size)]  # fmt: skip
    i, attribute = rng.choice(choices)
    value = rng.choice(_attribute_options(scene, i, attribute, cfg.grid_size))
    return scene.replace_object(i, _with_attribute(scene.objects[i], attribute, value))


def position_name(row: int, col: int, grid_size: int) -> str:
    if grid_size != 3:
        return f"row {row + 1} column {col + 1}"
    vertical, horizontal = ("top", "", "bottom")[row], ("left", "", "right")[col]
    return " ".join(p for p in (vertical, horizontal) if p) or "center"


def object_phrase(obj: SceneObject, grid_size: int) -> str:
    word = f' with the word "{obj.word}"' if obj.word else ""
    where = position_name(obj.row, obj.col, grid_size)
    return f"a {obj.size} {obj.color} {obj.shape}{word} at the {where}"


def caption(scene: Scene, grid_size: int) -> str:
    """Names every object, in reading order: 'A large red circle at the top left and ...'."""
    ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
    phrases = [object_phrase(o, grid_size) for o in ordered]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def partial_query(scene: Scene, named: tuple[int, ...], grid_size: int) -> str:
    """'Contains a large red circle at the top left and ...': the named objects, reading order."""
    ordered = sorted((scene.objects[i] for i in named), key=lambda o: (o.row, o.col))
    return "Contains " + " and ".join(object_phrase(o, grid_size) for o in ordered) + "."


def _object_key(objects) -> frozenset:
    return frozenset(tuple(o.attributes().values()) for o in objects)


class _PartialMatchIndex:
    """Keeps a split's partial-match queries unambiguous: no item but a query's positive holds
    every object the query names (objects compared by attributes; jitter is not one)."""

    def __init__(self, named_count: int):
        self.named_count, self.named, self.held = named_count, set(), set()

    def _held_by(self, scene: Scene) -> set:
        combos = itertools.combinations(scene.objects, self.named_count)
        return {_object_key(combo) for combo in combos}

    def admit(self, example: Example) -> bool:
        """Records the example and returns True if it keeps every query unambiguous (its named
        objects are held by no item so far, not even its own negative, and its items hold no
        earlier query's named objects); else returns False and records nothing."""
        key = _object_key(example.positive.objects[i] for i in example.named)
        negative_held = self._held_by(example.negative)
        held = self._held_by(example.positive) | negative_held
        if key in negative_held or key in self.held or held & self.named:
            return False
        self.named.add(key)
        self.held |= held
        return True


@dataclasses.dataclass(frozen=True)
class Edit:
    """A composed-retrieval modification: its text, the edited scene and what it changed."""

    text: str
    target: Scene
    index: int | None  # object of `target` the edit touched (None for a removal)
    attribute: str | None
    original: object = None  # the attribute's value before the edit


def make_modification(scene: Scene, rng, cfg) -> Edit | None:
    """A random edit of `scene` (recolour, reshape, resize, move, add, remove); None if n/a."""
    g, count = cfg.grid_size, len(scene.objects)
    kinds = ["color", "shape", "size", "position"]
    kinds += ["add"] if count < cfg.max_objects else []
    kinds += ["remove"] if count > max(1, cfg.min_objects) else []
    kind = rng.choice(kinds)
    if kind == "remove":
        i = rng.randrange(count)
        target = Scene(scene.objects[:i] + scene.objects[i + 1 :])
        return Edit(f"remove the {scene.objects[i].name}", target, None, None)
    if kind == "add":
        taken = {(o.shape, o.color) for o in scene.objects}
        pairs = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in taken]
        cells = _attribute_options(scene, 0, "position", g)
        (shape, color), (row, col) = rng.choice(pairs), rng.choice(cells)
        obj = _random_object(rng, cfg, shape, color, row, col)
        text = "add " + object_phrase(obj, g)
        return Edit(text, Scene(scene.objects + (obj,)), count, "color", color)
    i = rng.randrange(count)
    options = _attribute_options(scene, i, kind, g)
    if not options:
        return None
    value, obj = rng.choice(options), scene.objects[i]
    if kind == "position":
        text = f"move the {obj.name} to the {position_name(*value, g)}"
    elif kind == "shape":
        text = f"turn the {obj.name} into a {value}"
    else:
        text = f"make the {obj.name} {value}"
    original = obj.attributes()[kind]
    return Edit(text, scene.replace_object(i, _with_attribute(obj, kind, value)), i, kind, original)


def composed_negative(edit: Edit, rng, cfg) -> Scene:
    """Half the time the edited attribute set to a wrong value, else any one-attribute change."""
    if edit.index is not None and rng.random() < 0.5:
        options = _attribute_options(edit.target, edit.index, edit.attribute, cfg.grid_size)
        options = [v for v in options if v != edit.original]
        if options:
            obj = edit.target.objects[edit.index]
            wrong = _with_attribute(obj, edit.attribute, rng.choice(options))
            return edit.target.replace_object(edit.index, wrong)
    return perturb_scene(edit.target, rng, cfg)


# ------------------------------------------------------------------------------- planning


def _rng(*parts) -> random.Random:
    """A generator seeded by a stable hash of `parts` (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _try_example(cfg: SyntheticConfig, task: str, split: str, index: int, rng) -> Example | None:
    """One candidate example (may be None when a random choice does not apply)."""
    ids = _example_ids(split, task, index)
    if task == "documents":
        positive = make_document(rng)
        negative, question = perturb_document(positive, rng)
        return Example(task, split, index, *ids, question, None, positive, negative)
    if task == "partial_match":
        scene = random_scene(rng, cfg, count=cfg.partial_objects)
        named = tuple(sorted(rng.sample(range(cfg.partial_objects), cfg.partial_named)))
        negative = perturb_scene(scene, rng, cfg, index=rng.choice(named))
        text = partial_query(scene, named, cfg.grid_size)
        return Example(task, split, index, *ids, text, None, scene, negative, named)
    scene = random_scene(rng, cfg)
    if task == "composed":
        edit = make_modification(scene, rng, cfg)
        if edit is None:
            return None
        negative = composed_negative(edit, rng, cfg)
        return Example(task, split, index, *ids, edit.text, scene, edit.target, negative)
    negative = perturb_scene(scene, rng, cfg)
    if task == "text_to_image":
        return Example(
            task, split, index, *ids, caption(scene, cfg.grid_size), None, scene, negative
        )
    return Example(task, split, index, *ids, "", scene, scene, negative)


def _example_ids(split: str, task: str, index: int) -> tuple[str, str, str]:
    stem = f"{split}-{_TASK_CODES[task]}-{index:06d}"
    return f"{stem}-q", f"{stem}-p", f"{stem}-n"


def _item_keys(example: Example) -> set:
    """What makes the example's items distinct: scene/page signatures and page entity names."""
    keys = set()
    for item in (example.query_scene, example.positive, example.negative):
        if isinstance(item, Scene):
            keys.add(item.signature())
        elif isinstance(item, Document):
            keys.add(item.signature())
            keys.add(("entity", item.entity))  # one entity name = one page (and its variant)
    return keys


def _expected_keys(example: Example) -> int:
    if example.task == "documents":
        same_entity = example.positive.entity == example.negative.entity
        return 3 if same_entity else 4
    return 2 if example.task == "image_to_text" or example.query_scene is None else 3


@functools.lru_cache(maxsize=8)
def _plan_all(cfg: SyntheticConfig, last_split: str) -> dict[str, tuple[Example, ...]]:
    """Plans test, then val, then train (stopping after `last_split`) with no shared item."""
    used: set = set()
    plans = {}
    for split in ("test", "val", "train"):
        examples, partial = [], _PartialMatchIndex(cfg.partial_named)
        for index in range(cfg.size(split)):
            task = cfg.tasks[index % len(cfg.tasks)]
            examples.append(_unique_example(cfg, task, split, index, used, partial))
        plans[split] = tuple(examples)
        if split == last_split:
            break
    return plans


def _unique_example(cfg, task, split, index, used: set, partial: _PartialMatchIndex) -> Example:
    for attempt in range(_MAX_ATTEMPTS):
        rng = _rng(cfg.seed, split, task, index, attempt)
        example = _try_example(cfg, task, split, index, rng)
        if example is None:
            continue
        keys = _item_keys(example)
        # a collision inside the example (e.g. the negative undoes the edit) also rejects it
        if len(keys) != _expected_keys(example) or keys & used:
            continue
        if task == "partial_match" and not partial.admit(example):
            continue
        used |= keys
        return example
    raise RuntimeError(
        f"no new unique {task} item after {_MAX_ATTEMPTS} attempts at {split}[{index}]: the "
        "scene space is exhausted; lower the sizes or raise grid_size / max_objects"
    )


def plan_examples(cfg: SyntheticConfig, split: str) -> tuple[Example, ...]:
    """Structured examples of a split (no rendering; cheap). Deterministic in `cfg`."""
    split = canonical_split(split)
    return _plan_all(cfg, split)[split]


# ------------------------------------------------------------------------------- rendering


class _Renderer:
    """Renders items to PNG bytes (scenes, pages) and captions."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg

    def image(self, item) -> bytes:
        cfg = self.cfg
        if isinstance(item, Document):
            image = render.render_document(item, cfg.doc_width, cfg.doc_height)
        else:
            image = render.render_scene(item, cfg.image_size, cfg.grid_size, cfg.supersample)
        return render.png_bytes(image)

    def text(self, scene: Scene) -> str:
        return caption(scene, self.cfg.grid_size)


def _example_row(example: Example, renderer: _Renderer) -> dict:
    """An example as a training record (docs/design.md schema)."""
    row = {
        "query_text": example.query_text,
        "query_image": b"" if example.query_scene is None else renderer.image(example.query_scene),
        "task": example.task,
        "query_id": example.query_id,
        "positive_id": example.positive_id,
        "negative_id": example.negative_id,
    }
    for role in ("positive", "negative"):
        item = getattr(example, role)
        if example.task == "image_to_text":
            row[f"{role}_text"], row[f"{role}_image"] = renderer.text(item), b""
        else:
            row[f"{role}_text"], row[f"{role}_image"] = "", renderer.image(item)
    return row


def iter_train_rows(cfg: SyntheticConfig, split: str = "train") -> Iterator[dict]:
    """Yields the split's (query, positive, hard negative) records, in index order."""
    examples = plan_examples(cfg, split)
    renderer = _Renderer(cfg)
    bar = tqdm(examples, desc=f"synthetic {split}", unit="ex", disable=not cfg.progress)
    for example in bar:
        yield _example_row(example, renderer)


def generate_train_rows(cfg: SyntheticConfig, split: str = "train") -> list[dict]:
    """All records of a split as a list (see `iter_train_rows`)."""
    return list(iter_train_rows(cfg, split))


def generate_eval_set(cfg: SyntheticConfig, split: str = "test") -> dict[str, list[dict]]:
    """Retrieval evaluation set of a split: {"corpus", "queries", "qrels"} row lists.

    Per task, the corpus holds every query's positive and its hard negative (as distractor);
    each query has one relevant item (score 1). Rows carry `task`; ids are unique overall.
    """
    return eval_tables(iter_train_rows(cfg, split))


def eval_tables(rows: Iterable[dict]) -> dict[str, list[dict]]:
    """`generate_eval_set` of a split's already rendered records (`iter_train_rows`)."""
    corpus, queries, qrels = [], [], []
    for row in rows:
        task = row["task"]
        queries.append(
            {
                "id": row["query_id"],
                "text": row["query_text"],
                "image": row["query_image"],
                "task": task,
            }
        )
        for role in ("positive", "negative"):
            corpus.append(
                {
                    "id": row[f"{role}_id"],
                    "text": row[f"{role}_text"],
                    "image": row[f"{role}_image"],
                    "task": task,
                }
            )
        qrels.append({"query_id": row["query_id"], "corpus_id": row["positive_id"], "score": 1})
    return {"corpus": corpus, "queries": queries, "qrels": qrels}


def tokenizer_texts(cfg: SyntheticConfig, split: str = "train") -> Iterator[str]:
    """The text of a split, for training the tokenizer: captions, edits, questions, page text."""
    for example in plan_examples(cfg, split):
        if example.query_text:
            yield example.query_text
        for item in (example.positive, example.negative):
            if isinstance(item, Scene):
                yield caption(item, cfg.grid_size)
            else:
                yield from document_texts(item)


def build_tokenizer(cfg: SyntheticConfig, out_dir, special_tokens, vocab_size: int = 1024):
    """Trains and saves the dataset's byte-level BPE tokenizer (train split text, a backbone
    family's `special_tokens` first) to `out_dir`."""
    return train_tokenizer(
        tokenizer_texts(cfg, "train"), out_dir, special_tokens, vocab_size=vocab_size
    )
