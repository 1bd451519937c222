"""A trained run as a retriever: encode queries and documents, index them, search.

    retriever = Retriever.load("runs/demo")
    index = retriever.index(["a red cube", {"text": "", "image": "page.png"}], ids=["a", "b"])
    hits = retriever.search(["which page shows a red cube?"], index, budget=(16, 64), k=10)

Items: a str is a text, never a file name (a str naming an existing image or PDF file is
refused, saying how to pass the file; one word ending in an image / PDF suffix that names no
file is embedded with a warning); bytes, a `Path`, a PIL image or a numpy HWC array is an
image; a dict `{"text", "image"}` is both (its "image" may be a path string). PDFs are indexed
page by page with `metaembed_jax.retrieval.build.build_index`. An index this retriever builds
records the model (`provenance`); `search` refuses an index another model built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from metaembed_jax import sharding
from metaembed_jax.data.pipeline import make_processor, model_family
from metaembed_jax.formats.trained import dtype_name, find_step, restore_trained_model
from metaembed_jax.retrieval.corpus import IMAGE_SUFFIXES
from metaembed_jax.retrieval.encode import ModelEncoder
from metaembed_jax.retrieval.index import MultiVectorIndex
from metaembed_jax.retrieval.provenance import check_same_model, model_record
from metaembed_jax.retrieval.qdrant import QdrantIndex
from metaembed_jax.scoring import resolve_budgets
from metaembed_jax.training.run_identity import read_saved_config

logger = logging.getLogger(__name__)


def _refuse_file_name(text: str) -> None:
    if Path(text).suffix.lower() not in (*IMAGE_SUFFIXES, ".pdf"):
        return
    if not os.path.isfile(text):
        if text.strip() and not any(c.isspace() for c in text.strip()):
            # One word ending in .png is more likely a mistyped path than a text to embed.
            logger.warning(
                "%r looks like a file name, but no such file exists: it is embedded as text "
                "(pass {'text': %r} to say so, or fix the path and pass Path(...) for the image)",
                text,
                text,
            )
        return
    if text.lower().endswith(".pdf"):
        how = "index a PDF's pages with build_index / `metaembed index build` (one item per page)"
    else:
        how = f"pass Path({text!r}) or {{'image': {text!r}}} for the image"
    raise ValueError(
        f"{text!r} is the name of an existing file, and a str is embedded as text: {how}, or "
        f"{{'text': {text!r}}} for the text"
    )


def as_item(value: Any) -> dict[str, Any]:
    """An encoder item from a text (str), an image (bytes, a `Path`, a PIL image or a numpy HWC
    array: an image-only item) or an item dict {"text", "image"}.

    Raises ValueError for a str that names an existing image / PDF file (ambiguous: see the
    module docstring) and for a `Path` to a PDF.
    """
    if isinstance(value, dict):
        return {"text": value.get("text") or "", "image": value.get("image")}
    if isinstance(value, str):
        _refuse_file_name(value)
        return {"text": value, "image": None}
    if isinstance(value, os.PathLike):
        if Path(value).suffix.lower() == ".pdf":
            raise ValueError(f"{os.fspath(value)}: {_refuse_pdf_hint()}")
        return {"text": "", "image": Path(value).read_bytes()}
    return {"text": "", "image": value}  # bytes, PIL image or numpy array


def _refuse_pdf_hint() -> str:
    return "a PDF is not one image: index its pages with build_index / `metaembed index build`"


class Retriever:
    """A MetaEmbed model, its processor and encoder, sharded over the local devices."""

    def __init__(self, encoder, config, run_dir: Path | None = None, step: int | None = None):
        self.encoder, self.config, self.run_dir, self.step = encoder, config, run_dir, step
        self._provenance: dict | None = None

    @classmethod
    def load(
        cls,
        run_dir: str | os.PathLike,
        step: int | None = None,
        *,
        batch_size: int | None = None,
        dtype: Any = None,
    ) -> Retriever:
        """The retriever of a training run (its saved config, the parameters of `step`, default
        the latest), encoding `batch_size` items per call (default `config.eval.batch_size`,
        rounded up to a multiple of the local devices). Raises as `load_trained` does."""
        import jax

        run_dir = Path(run_dir)
        config = read_saved_config(run_dir)
        if dtype is not None:
            config.model.dtype = dtype_name(dtype)
        step = find_step(run_dir, step, config)
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
        family = model_family(config)
        processor = make_processor(config, family, run_dir)
        model = restore_trained_model(
            config, run_dir, step, mesh=mesh, vocab_size=len(processor.tokenizer)
        )
        shards = sharding.batch_shards(mesh)
        size = int(batch_size or config.eval.batch_size)
        size = -(-size // shards) * shards
        encoder = ModelEncoder(
            model,
            processor,
            batch_size=size,
            mesh=mesh,
            progress=False,
            pad_features=family.static_shapes(config.data, size, multiple=shards),
        )
        return cls(encoder, config, run_dir, step)

    @property
    def provenance(self) -> dict[str, Any] | None:
        """The record of this model that indexes it builds keep (`provenance.model_record`),
        computed once; None for an encoder that holds no MetaEmbed model (a stand-in)."""
        if self._provenance is None and hasattr(self.encoder, "graphdef"):
            model = nnx.merge(self.encoder.graphdef, self.encoder.state)
            self._provenance = model_record(
                model, self.encoder.processor, self.config, self.run_dir, self.step
            )
        return self._provenance

    @property
    def trained_sizes(self) -> tuple[int, int]:
        return self.encoder.num_vectors["query"], self.encoder.num_vectors["candidate"]

    def encode_queries(self, queries: Sequence[Any]) -> np.ndarray:
        """[N, R_q, D] float32 embeddings of texts / images / items (see `as_item`)."""
        return self.encoder([as_item(q) for q in queries], "query")

    def encode_documents(self, documents: Sequence[Any]) -> np.ndarray:
        """[N, R_c, D] float32 embeddings of texts / images / items (see `as_item`)."""
        return self.encoder([as_item(d) for d in documents], "candidate")

    def index(self, documents: Sequence[Any], ids=None, dtype: str = "bfloat16"):
        """A MultiVectorIndex of `documents` (ids default to 0..N-1), recording this model."""
        index = MultiVectorIndex.build(self.encode_documents(documents), ids=ids, dtype=dtype)
        if self.provenance is not None:
            index.metadata["model"] = self.provenance
        return index

    def check_index(self, index, *, action: str = "search it", allow_other_model=False) -> None:
        """Refuse an index another model built (`provenance.check_same_model`): raises
        OtherModelError naming both, unless `allow_other_model`."""
        metadata = getattr(index, "metadata", None)
        if metadata is None or not hasattr(self.encoder, "graphdef"):  # nothing to compare
            return
        recorded = metadata.get("model")
        # An index without a record is only warned about: naming this model needs no hashing.
        current = self.provenance if recorded else {"run": self.run_dir, "step": self.step}
        check_same_model(
            recorded,
            current,
            what=f"index {getattr(index, 'path', None) or 'given'}",
            action=action,
            allow_other_model=allow_other_model,
        )

    def search(
        self,
        queries: Sequence[Any],
        index: MultiVectorIndex | QdrantIndex,
        budget: tuple[int, int] | None = None,
        k: int = 10,
        *,
        coarse_budget: tuple[int, int] | None = None,
        shortlist: int = 1000,
        allow_other_model: bool = False,
    ) -> list[list[tuple[Any, float]]]:
        """Per query, its `k` best (id, score) pairs, best first, at `budget` (default the
        trained (R_q, R_c)); with `coarse_budget`, a two-stage search over a shortlist. `k`
        beyond the index size returns every item.
        `index` is a `MultiVectorIndex` or a `QdrantIndex` (the same search contract).
        Raises OtherModelError for an index another model built (`check_index`), ValueError
        for a budget beyond the trained sizes."""
        checks = [budget or self.trained_sizes] + ([coarse_budget] if coarse_budget else [])
        checked = resolve_budgets(checks, *self.trained_sizes)
        self.check_index(index, allow_other_model=allow_other_model)
        embeddings = self.encode_queries(queries)
        k = min(int(k), len(index))
        options = {"coarse_budget": checked[1], "shortlist": shortlist} if coarse_budget else {}
        scores, ids = index.search(embeddings, budget=checked[0], k=k, **options)
        return [
            [(_plain_id(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True)]
            for row_ids, row_scores in zip(ids, np.asarray(scores), strict=True)
        ]


def _plain_id(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
