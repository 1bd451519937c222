"""`QdrantIndex`: a `MultiVectorIndex` served by Qdrant, on one host or a cluster.

    index = QdrantIndex.from_index(multi_vector_index, path="qdrant-data", collection="docs")
    scores, ids = index.search(queries, budget=(16, 64), k=10)
    index = QdrantIndex(url="http://localhost:6333", collection="docs")   # a server / cluster

The same `add` / `search` contract as `MultiVectorIndex` (arguments, errors for bad queries,
``(scores [Nq, k] float32, ids [Nq, k])`` best first), on Qdrant's engine: ``path=`` is the
embedded engine (`qdrant-edge-py`, in this process, the collection in ``PATH/COLLECTION``),
``url=`` a Qdrant server or cluster through `qdrant-client` (``client=`` takes any
``QdrantClient``: an API key, its local mode...).

Layout: one named vector ``r{r_c}`` per stored candidate prefix (``prefixes``). For r_c > 1 it
holds the first r_c vectors as a multivector compared with MAX_SIM, with no HNSW graph (every
search over it is exact); r_c = 1 is a plain dense vector with a graph, and an (r_q, 1) query
is one dot product with the sum of the query's first r_q vectors (exact below Qdrant's full-scan
threshold or with ``exact=True``, approximate through the graph above it). Each prefix is
stored again: prefixes 1, 4, 16, 64 of R_c = 64 take (1+4+16+64)/64 ~ 1.33x the full vectors.
A budget whose r_c is not stored raises ValueError naming the stored prefixes.

Dtypes: float32 as is; bfloat16 stored as float16 (exact for bfloat16 values within
float16's range: those of |x| < 2^-14 lose precision, and |x| > 65504 cannot be stored, so the
push refuses them), and Qdrant then rounds the query vectors it is sent to float16 (a bfloat16
`MultiVectorIndex` rounds them to bfloat16); int8 as Qdrant's
scalar int8 quantisation (in RAM) with the float32 originals on disk (the index's float32 copy
when it was built with ``full_precision=True``, else its dequantised int8 vectors), and
``rescore=S`` as Qdrant's rescoring with oversampling S / k. Qdrant's int8 scores differ from
ours (one range for the whole collection, not one scale per vector).

Ids: Qdrant takes only integers and UUIDs as point ids, so each id (an int or a str, unicode
included) becomes a uuid5 and the original is kept in the point's payload. Equal scores are
ordered by position in the index within the results, but which of several tied candidates make
the top k may differ from `MultiVectorIndex`.

Pushes are atomic: the collection's manifest (a point with no vectors) is written last, so a
push or `add` that was stopped leaves a collection that refuses to open (push it again).
"""

from __future__ import annotations

import math
import uuid

import numpy as np

from metaembed_jax.retrieval import _qdrant_engines as engines
from metaembed_jax.retrieval.index import (
    MultiVectorIndex,
    check_finite_queries,
    check_ids,
    dequantize,
    quantize,
)
from metaembed_jax.scoring import resolve_budget

DEFAULT_PREFIXES = (1, 4, 16, 64)
FORMAT_VERSION = 1
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "metaembed-jax/qdrant")
_MANIFEST_ID = str(uuid.uuid5(_NAMESPACE, "manifest"))
_MANIFEST_KEY = "metaembed_manifest"
_PUSH_BYTES = 8 << 20  # float32 vector bytes per upsert request (servers cap a request's size)
_QUERIES_PER_BATCH = 64  # queries per batched request
_FLOAT16_MAX = 65504.0


def point_id(candidate_id) -> str:
    """The Qdrant point id (a UUID string) of an index id (int or str): 1 and "1" differ."""
    kind = "int" if isinstance(candidate_id, int) else "str"
    return str(uuid.uuid5(_NAMESPACE, f"{kind}:{candidate_id}"))


def location(target: str) -> dict:
    """``--qdrant PATH_OR_URL`` as keyword arguments: ``{"url": ...}`` for http(s)://...,
    else ``{"path": ...}`` (the embedded engine)."""
    if target.startswith(("http://", "https://")):
        return {"url": target}
    return {"path": target}


def _engine(path, url, client, collection):
    if sum(x is not None for x in (path, url, client)) != 1:
        raise ValueError(
            "give exactly one of path= (the embedded engine), url= (a Qdrant server) or "
            "client= (a QdrantClient)"
        )
    if not isinstance(collection, str) or not collection:
        raise ValueError(f"collection must be a non-empty name, got {collection!r}")
    if path is not None:
        return engines.EdgeEngine(path, collection)
    return engines.ClientEngine(collection, url=url, client=client)


def check_prefixes(prefixes, num_vectors: int) -> tuple[int, ...]:
    """Sorted unique ints in [1, num_vectors]. Raises ValueError otherwise."""
    try:
        values = sorted({int(p) for p in prefixes})
        if any(isinstance(p, bool) or int(p) != p for p in prefixes):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"prefixes must be integers, got {prefixes!r}") from None
    if not values or values[0] < 1 or values[-1] > num_vectors:
        raise ValueError(
            f"prefixes must be in [1, {num_vectors}] (R_c of the index), got {tuple(prefixes)}"
        )
    return tuple(values)


def _stored_form(embeddings, dtype: str, full_precision: bool) -> np.ndarray:
    """What a collection of ``dtype`` keeps of new float embeddings [n, R, D] (float32): as
    `MultiVectorIndex` would store them, or the originals of an int8 ``full_precision`` index.
    Raises ValueError for non-finite values."""
    if dtype == "float32" or (dtype == "int8" and full_precision):
        return quantize(embeddings, "float32")[0]
    return dequantize(*quantize(embeddings, dtype), dtype)


def _query_vectors(query, mask, r_q: int, r_c: int) -> np.ndarray:
    """What is sent of one query [R_q, D] at (r_q, r_c): its first r_q vectors, masked rows
    dropped, summed for r_c = 1 (one dot product with the first candidate vector)."""
    rows = query[:r_q][mask[:r_q]]
    if r_c == 1:
        return rows.astype(np.float64).sum(axis=0).astype(np.float32)
    # All masked: one zero vector scores 0 everywhere, as the masked MaxSim does.
    return rows if len(rows) else np.zeros((1, query.shape[-1]), np.float32)


def _power_of_two_scale(largest: float, limit: float) -> float:
    """A power of two s with s * largest <= limit (1 if already): Qdrant quantises an int8
    query into the collection's range, clipping what lies outside; scores scale exactly back."""
    if largest <= limit or limit <= 0:
        return 1.0
    return 2.0 ** -math.ceil(math.log2(largest / limit))


class QdrantIndex:
    """A Qdrant collection holding a `MultiVectorIndex`: `from_index` pushes one, the
    constructor opens one; `add` and `search` as `MultiVectorIndex`."""

    def __init__(self, path=None, *, url: str | None = None, client=None, collection: str):
        """Open the collection pushed by `from_index` (exactly one of ``path``, ``url``,
        ``client``).

        Raises:
          ImportError: the Qdrant packages are not installed. FileNotFoundError: no such
          collection. ValueError: an incomplete push (stopped before it finished) or a
          collection not written by `from_index`.
        """
        self._engine = _engine(path, url, client, collection)
        self.collection = collection
        self._manifest = self._read_manifest()

    def _read_manifest(self) -> dict:
        engine = self._engine
        if not engine.exists():
            raise FileNotFoundError(f"no Qdrant {engine.where}")
        payload = engine.payloads([_MANIFEST_ID]).get(_MANIFEST_ID) or {}
        manifest = payload.get(_MANIFEST_KEY)
        if manifest is None:
            raise ValueError(
                f"the Qdrant {engine.where} has no metaembed manifest: a push stopped before "
                "it finished, or a collection not written by QdrantIndex.from_index; push the "
                "index again (QdrantIndex.from_index, or metaembed index push)"
            )
        if not manifest.get("complete"):
            raise ValueError(
                f"the Qdrant {engine.where} is incomplete: a push or add() was stopped before "
                "it finished; push the index again (QdrantIndex.from_index, or metaembed index "
                "push)"
            )
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"the Qdrant {engine.where} has manifest format {manifest.get('format')!r}; "
                f"this version reads format {FORMAT_VERSION}"
            )
        return manifest

    # ----------------------------------------------------------------------------- pushing
    @classmethod
    def from_index(
        cls,
        index: MultiVectorIndex,
        path=None,
        *,
        url: str | None = None,
        client=None,
        collection: str,
        prefixes=DEFAULT_PREFIXES,
        overwrite: bool = False,
        shard_number: int | None = None,
        replication_factor: int | None = None,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> QdrantIndex:
        """Push ``index`` into a new collection and return it, opened.

        Args:
          path / url / client: where (exactly one): a directory for the embedded engine, a
            server / cluster URL, or a ``QdrantClient``.
          prefixes: the candidate prefixes r_c to store (each is stored again; a search's
            r_c and coarse r_c must be among them).
          overwrite: replace a complete collection of that name (an incomplete one, from a
            stopped push, is always replaced).
          shard_number / replication_factor: a server's collection layout (ignored by the
            embedded engine, which is one shard).
          batch_size: candidates per upsert request (default: ~8 MB of float32 vectors).
          progress: a tqdm progress bar.

        Raises:
          ValueError: bad prefixes, an empty index, an existing complete collection without
          ``overwrite``, bfloat16 values beyond float16's range. ImportError: no Qdrant.
        """
        prefixes = check_prefixes(prefixes, index.num_vectors)
        if len(index) == 0:
            raise ValueError("the index is empty: nothing to push")
        engine = _engine(path, url, client, collection)
        pushed = cls.__new__(cls)
        pushed._engine, pushed.collection = engine, collection
        if engine.exists():
            try:
                pushed._read_manifest()
                complete = True
            except ValueError:  # a stopped push (or an unreadable shard): replaced
                complete = False
            if complete and not overwrite:
                raise ValueError(
                    f"the Qdrant {engine.where} exists: pass overwrite=True (--overwrite) to "
                    "replace it, or choose another collection"
                )
            engine.drop()
        spec = engines.CollectionSpec(
            index.dim, prefixes, index.dtype, shard_number, replication_factor
        )
        engine.create(spec)
        pushed._manifest = {
            "format": FORMAT_VERSION,
            "num_vectors": index.num_vectors,
            "dim": index.dim,
            "dtype": index.dtype,
            "full_precision": index.full_precision,
            "prefixes": list(prefixes),
            "count": 0,
            "int_ids": True,
            # per prefix: the [min, max] of its stored values, the range Qdrant quantises into
            "ranges": {str(p): [0.0, 0.0] for p in prefixes},
            "complete": False,
            "metadata": dict(index.metadata),  # what built the index (its model), as saved
        }
        step = batch_size or pushed._rows_per_request()
        ids = index.ids
        batches = (
            (
                index.embedding_rows(
                    start, min(start + step, len(index)), full_precision=index.full_precision
                ),
                ids[start : start + step],
            )
            for start in range(0, len(index), step)
        )
        pushed._write(batches, len(index), progress)
        return pushed

    def _rows_per_request(self) -> int:
        floats = sum(self.prefixes) * self.dim
        return max(1, _PUSH_BYTES // (4 * floats))

    def _write(self, batches, total: int, progress: bool) -> None:
        """Upsert (rows [n, R_c, D] in stored form, ids) batches, then the manifest: marked
        incomplete first, complete (with the new count) once every point is written."""
        from tqdm import tqdm

        manifest = dict(self._manifest, complete=False)
        self._put_manifest(manifest)
        bar = tqdm(total=total, desc=f"push {self.collection}", unit="item", disable=not progress)
        for rows, ids in batches:
            largest = float(np.abs(rows).max()) if rows.size else 0.0
            if self.dtype == "bfloat16" and largest > _FLOAT16_MAX:
                raise ValueError(
                    f"a vector has |value| {largest:g} > {_FLOAT16_MAX:g}: bfloat16 is stored "
                    "as float16 in Qdrant, which cannot hold it"
                )
            points = []
            for offset, (candidate, candidate_id) in enumerate(zip(rows, ids, strict=True)):
                vectors = {
                    engines.vector_name(p): candidate[0] if p == 1 else candidate[:p]
                    for p in self.prefixes
                }
                payload = {"id": candidate_id, "position": manifest["count"] + offset}
                points.append((point_id(candidate_id), vectors, payload))
            self._engine.upsert(points)
            manifest["count"] += len(points)
            for prefix, (low, high) in manifest["ranges"].items():
                stored = rows[:, : int(prefix)]
                manifest["ranges"][prefix] = [
                    min(low, float(stored.min())),
                    max(high, float(stored.max())),
                ]
            manifest["int_ids"] = manifest["int_ids"] and all(isinstance(i, int) for i in ids)
            bar.update(len(points))
        bar.close()
        self._engine.finish_writes()
        self._put_manifest(dict(manifest, complete=True))
        self._manifest = dict(manifest, complete=True)

    def _put_manifest(self, manifest: dict) -> None:
        self._engine.upsert([(_MANIFEST_ID, {}, {_MANIFEST_KEY: manifest})])
        self._engine.flush()

    def add(self, embeddings, ids=None) -> None:
        """Append embeddings [n, R_c, D] and their ids (unique, not yet in the collection;
        default the next positions), as `MultiVectorIndex.add`. Raises ValueError as it does.
        A stopped add leaves the collection refusing to open (push it again)."""
        shape = np.shape(embeddings)
        if len(shape) != 3 or shape[1:] != (self.num_vectors, self.dim):
            raise ValueError(
                f"expected embeddings [n, {self.num_vectors}, {self.dim}] for this index, got "
                f"shape {shape}"
            )
        if ids is None:
            ids = list(range(len(self), len(self) + shape[0]))
        ids = check_ids(ids, shape[0], [])
        step = self._rows_per_request()
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            held = self._engine.payloads([point_id(i) for i in chunk])
            for row, candidate_id in enumerate(chunk, start):
                if point_id(candidate_id) in held:
                    raise ValueError(
                        f"duplicate id {candidate_id!r} (row {row}): already in the index"
                    )
        stored = _stored_form(np.asarray(embeddings), self.dtype, self.full_precision)
        batches = (
            (stored[start : start + step], ids[start : start + step])
            for start in range(0, len(ids), step)
        )
        self._write(batches, len(ids), progress=False)

    # ----------------------------------------------------------------------------- reading
    @property
    def metadata(self) -> dict:
        """The pushed index's `metadata` (its model record; empty for older collections)."""
        return self._manifest.get("metadata", {})

    @property
    def path(self) -> str:
        return f"Qdrant {self._engine.where}"

    def __len__(self) -> int:
        return int(self._manifest["count"])

    @property
    def num_vectors(self) -> int:
        return int(self._manifest["num_vectors"])

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def dtype(self) -> str:
        return self._manifest["dtype"]

    @property
    def full_precision(self) -> bool:
        return bool(self._manifest["full_precision"])

    @property
    def prefixes(self) -> tuple[int, ...]:
        return tuple(self._manifest["prefixes"])

    def close(self) -> None:
        """Release the engine (the embedded shard's files, or the client's connections)."""
        self._engine.close()

    def __enter__(self) -> QdrantIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------- search
    def _stored_budget(self, budget, num_query_vectors: int) -> tuple[int, int]:
        r_q, r_c = resolve_budget(budget, num_query_vectors, self.num_vectors)
        if r_c not in self.prefixes:
            raise ValueError(
                f"budget {(r_q, r_c)}: r_c={r_c} is not stored in the Qdrant "
                f"{self._engine.where}; its stored prefixes are r_c in {self.prefixes} (push "
                "again with the prefixes you need)"
            )
        return r_q, r_c

    def _check_queries(self, queries, query_mask) -> None:
        shape = np.shape(queries)
        if len(shape) != 3 or shape[2] != self.dim:
            raise ValueError(
                f"expected queries [Nq, R_q, {self.dim}] for an index of D={self.dim}, got "
                f"shape {shape}"
            )
        if query_mask is not None and np.shape(query_mask) != shape[:2]:
            raise ValueError(f"query_mask must have shape {shape[:2]}, got {np.shape(query_mask)}")
        check_finite_queries(queries)

    def _check_rescore(self, rescore, k) -> int:
        if not self.full_precision:
            raise ValueError(
                "rescore needs the float32 copy of the vectors: build the index with "
                "full_precision=True"
            )
        if not (isinstance(rescore, int | np.integer) and rescore >= k):
            raise ValueError(f"rescore must be an int >= k={k}, got {rescore!r}")
        return min(int(rescore), len(self))

    def search(
        self,
        queries,
        budget=(16, 64),
        k: int = 10,
        *,
        coarse_budget=None,
        shortlist: int = 1000,
        query_mask=None,
        rescore: int | None = None,
        exact: bool = False,
    ):
        """Top-k candidates of each query at ``budget``, as `MultiVectorIndex.search`.

        Args:
          queries: [Nq, R_q, D] finite floats; each is sent as its first r_q vectors.
          budget: (r_q, r_c) of the final scores; r_c must be a stored prefix.
          k: results per query, 1 <= k <= len(index).
          coarse_budget: two-stage search: Qdrant's prefetch of ``shortlist`` candidates per
            query at this budget (its r_c stored too), rescored at ``budget``.
          query_mask: optional [Nq, R_q]; masked query vectors are not sent.
          rescore: for an int8 collection of a ``full_precision`` index: rescore the best
            ``rescore`` (>= k) of the quantised search from the float32 originals.
          exact: search the r_c = 1 vector by a full scan instead of its HNSW graph.

        Returns:
          (scores [Nq, k] float32, ids [Nq, k] numpy array of the stored ids), best first.

        Raises:
          ValueError: bad shapes, budget (or an unstored r_c), k, shortlist or rescore;
          non-finite queries.
        """
        host = np.asarray(queries, np.float32)
        self._check_queries(host, query_mask)
        r_q, r_c = self._stored_budget(budget, host.shape[1])
        if not (isinstance(k, int | np.integer) and 1 <= k <= len(self)):
            raise ValueError(f"k must be an int in [1, {len(self)}] (index size), got {k!r}")
        found = k if rescore is None else self._check_rescore(rescore, k)
        coarse = None
        if coarse_budget is not None:
            coarse = self._stored_budget(coarse_budget, host.shape[1])
            size = min(int(shortlist), len(self))
            if size < found:
                what = f"k={k}" if rescore is None else f"k and rescore={found}"
                raise ValueError(f"shortlist must be >= {what}, got {shortlist!r}")
        mask = np.ones(host.shape[:2], bool) if query_mask is None else np.asarray(query_mask)
        stages = {
            "budget": (r_q, r_c),
            "coarse": coarse,
            "shortlist": min(int(shortlist), len(self)),
            "k": k,
            "oversampling": None if rescore is None else found / k,
            "exact": bool(exact),
        }
        requests, scales = [], []
        for query, query_mask_row in zip(host, mask.astype(bool), strict=True):
            request, scale = self._request(query, query_mask_row, **stages)
            requests.append(request)
            scales.append(scale)
        hits = []
        for start in range(0, len(requests), _QUERIES_PER_BATCH):
            hits.extend(self._engine.query_batch(requests[start : start + _QUERIES_PER_BATCH]))
        return self._results(hits, scales, k)

    def _stage(self, query, mask, budget, limit) -> tuple[engines.Stage, float]:
        """One query's pass at ``budget``, and the power-of-two scale of its vectors (int8:
        within the range of the stored prefix, which Qdrant quantises the query into)."""
        vectors, scale = _query_vectors(query, mask, *budget), 1.0
        if self.dtype == "int8":
            low, high = self._manifest["ranges"][str(budget[1])]
            scale = _power_of_two_scale(float(np.abs(vectors).max()), min(-low, high))
        return engines.Stage(engines.vector_name(budget[1]), vectors * scale, limit), scale

    def _request(self, query, mask, *, budget, coarse, shortlist, k, oversampling, exact):
        """The request of one query [R_q, D], and the scale of its final scores."""
        final, scale = self._stage(query, mask, budget, k)
        prefetch = None if coarse is None else self._stage(query, mask, coarse, shortlist)[0]
        request = engines.Request(
            final=final,
            prefetch=prefetch,
            quantized=self.dtype == "int8",
            oversampling=oversampling,
            exact=exact,
        )
        return request, scale

    def _results(self, hits, scales, k):
        """(scores [Nq, k] float32, ids [Nq, k]) from each query's (score, payload) hits, equal
        scores in position order."""
        scores = np.empty((len(hits), k), np.float32)
        ids = []
        for row, (found, scale) in enumerate(zip(hits, scales, strict=True)):
            if len(found) < k:
                raise RuntimeError(
                    f"the Qdrant {self._engine.where} returned {len(found)} hits for k={k} "
                    f"(it holds {len(self)} candidates)"
                )
            found = sorted(found, key=lambda hit: (-hit[0], hit[1]["position"]))[:k]
            scores[row] = [score / scale for score, _ in found]
            ids.append([payload["id"] for _, payload in found])
        if self._manifest["int_ids"]:
            return scores, np.asarray(ids, np.int64).reshape(len(hits), k)
        return scores, _object_rows(ids, k)


def _object_rows(ids: list[list], k: int) -> np.ndarray:
    """Rows of ids as an object array [Nq, k] (never split into characters or tuples)."""
    array = np.empty((len(ids), k), object)
    for row, values in enumerate(ids):
        array[row, :] = values
    return array
