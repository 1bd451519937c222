"""The two Qdrant engines behind `QdrantIndex`, behind one small interface.

- `EdgeEngine`: the embedded engine (`qdrant-edge-py`, imported as ``qdrant_edge``), one shard
  in the directory ``PATH/COLLECTION``, in this process;
- `ClientEngine`: `qdrant-client` against a server or cluster (``url=``), or any
  ``QdrantClient`` (its local mode included).

Both take the same collection layout (`CollectionSpec`) and the same requests (`Request`), so
`QdrantIndex` builds them once. The Qdrant packages are optional: they are imported when an
engine is made, with an ImportError that says how to install them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INSTALL_HINT = 'pip install "metaembed-jax[qdrant]"'
PAYLOAD_FIELDS = ["id", "position"]  # what a search reads back of each hit
# Per-vector HNSW graph of the r_c = 1 vector (Qdrant's defaults, written out); the
# multivectors get m = 0: no graph, every search over them is exact.
GRAPH_EDGES, GRAPH_EF_CONSTRUCT, FULL_SCAN_KB = 16, 100, 10000


def vector_name(prefix: int) -> str:
    """The named vector that holds each candidate's first ``prefix`` vectors."""
    return f"r{prefix}"


@dataclass(frozen=True)
class CollectionSpec:
    dim: int
    prefixes: tuple[int, ...]
    dtype: str  # the MultiVectorIndex dtype: float32, bfloat16 (stored as float16) or int8
    shard_number: int | None = None  # server / cluster only
    replication_factor: int | None = None  # server / cluster only


@dataclass(frozen=True)
class Stage:
    """One nearest-neighbour pass: ``vectors`` ([D] dense or [r, D] multivector) against the
    named vector ``using``, keeping ``limit`` points."""

    using: str
    vectors: np.ndarray
    limit: int


@dataclass(frozen=True)
class Request:
    final: Stage
    prefetch: Stage | None = None  # the coarse pass whose points `final` rescores
    quantized: bool = False  # the collection is int8: say how to use the quantized vectors
    oversampling: float | None = None  # rescore from the originals, keeping limit * this
    exact: bool = False  # bypass the r_c = 1 graph (a full scan)


def _import(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as error:
        raise ImportError(
            f"QdrantIndex needs the {package} package ({error}); install the extra with: "
            f"{INSTALL_HINT}"
        ) from error


# ----------------------------------------------------------------------------- embedded


_OPEN_SHARDS: dict[str, object] = {}  # one EdgeShard per directory: its WAL is locked per open


class EdgeEngine:
    """The embedded engine on ``Path(path) / collection``."""

    def __init__(self, path: str | os.PathLike, collection: str):
        self.qe = _import("qdrant_edge", "qdrant-edge-py")
        if not collection or collection in (".", "..") or "/" in collection or "\\" in collection:
            raise ValueError(f"collection must be a plain directory name, got {collection!r}")
        self.directory = Path(path) / collection
        self.where = f"collection {collection!r} at {os.fspath(path)}"
        self._key = os.path.realpath(self.directory)

    @property
    def shard(self):
        shard = _OPEN_SHARDS.get(self._key)
        if shard is None:
            if not (self.directory / "edge_config.json").exists():
                raise FileNotFoundError(f"no Qdrant {self.where}")
            try:
                shard = self.qe.EdgeShard.load(str(self.directory))
            except Exception as error:  # the engine raises a bare Exception
                raise ValueError(
                    f"cannot open the Qdrant {self.where} ({error}): if a push was stopped, "
                    "push it again"
                ) from None
            _OPEN_SHARDS[self._key] = shard
        return shard

    def exists(self) -> bool:
        return self._key in _OPEN_SHARDS or (self.directory / "edge_config.json").exists()

    def drop(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def close(self) -> None:
        shard = _OPEN_SHARDS.pop(self._key, None)
        if shard is not None:
            shard.close()

    def create(self, spec: CollectionSpec) -> None:
        qe = self.qe
        quantized = spec.dtype == "int8"
        datatype = (
            qe.VectorStorageDatatype.Float16
            if spec.dtype == "bfloat16"
            else qe.VectorStorageDatatype.Float32
        )
        vectors = {}
        for prefix in spec.prefixes:
            multi = prefix > 1
            vectors[vector_name(prefix)] = qe.EdgeVectorParams(
                size=spec.dim,
                distance=qe.Distance.Dot,
                multivector_config=(
                    qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim) if multi else None
                ),
                hnsw_config=qe.HnswIndexConfig(
                    m=0 if multi else GRAPH_EDGES,
                    ef_construct=GRAPH_EF_CONSTRUCT,
                    full_scan_threshold=FULL_SCAN_KB,
                ),
                datatype=datatype,
                # int8: the originals on disk, the quantized copy in RAM.
                memory=qe.Memory.Cold if quantized else None,
                quantization_config=(
                    qe.ScalarQuantizationConfig(qe.ScalarType.Int8, memory=qe.Memory.Pinned)
                    if quantized
                    else None
                ),
            )
        # Indexing threshold 1 KB: `finish_writes` then builds the graph and the quantized
        # vectors of every segment, whatever its size (the default leaves small ones plain).
        config = qe.EdgeConfig(
            vectors=vectors, optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1)
        )
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        _OPEN_SHARDS[self._key] = qe.EdgeShard.create(str(self.directory), config)

    def upsert(self, points) -> None:
        """points: (point id, {vector name: array}, payload) triples."""
        self.shard.update(
            self.qe.UpdateOperation.upsert_points(
                [self.qe.Point(pid, vectors, payload) for pid, vectors, payload in points]
            )
        )

    def finish_writes(self) -> None:
        """Build the graph and the quantized vectors, and make every write durable."""
        self.shard.optimize()
        self.shard.flush()

    def flush(self) -> None:
        self.shard.flush()

    def payloads(self, point_ids) -> dict:
        """{point id (str): payload} of those of ``point_ids`` that exist."""
        records = self.shard.retrieve(list(point_ids), True, False)
        return {str(r.id): r.payload for r in records}

    def _search_params(self, request: Request):
        quantization = None
        if request.quantized:
            quantization = self.qe.QuantizationSearchParams(
                rescore=request.oversampling is not None, oversampling=request.oversampling
            )
        if quantization is None and not request.exact:
            return None
        return self.qe.SearchParams(exact=request.exact, quantization=quantization)

    def query_batch(self, requests: list[Request]) -> list[list[tuple[float, dict]]]:
        """Per request, its (score, payload) hits, best first."""
        qe = self.qe
        built = []
        for request in requests:
            params, prefetches = self._search_params(request), None
            if request.prefetch is not None:
                stage = request.prefetch
                # The coarse pass on quantized vectors never rescores: `final` does.
                coarse = Request(stage, quantized=request.quantized, exact=request.exact)
                prefetches = [
                    qe.Prefetch(
                        limit=stage.limit,
                        query=qe.Query.Nearest(stage.vectors, using=stage.using),
                        params=self._search_params(coarse),
                    )
                ]
            built.append(
                qe.QueryRequest(
                    limit=request.final.limit,
                    query=qe.Query.Nearest(request.final.vectors, using=request.final.using),
                    prefetches=prefetches,
                    params=params,
                    with_payload=PAYLOAD_FIELDS,
                )
            )
        results = self.shard.query_batch(qe.QueryBatchRequest(built))
        return [[(p.score, p.payload) for p in hits] for hits in results]


# ----------------------------------------------------------------------------- client


class ClientEngine:
    """A collection of a Qdrant server or cluster (``url``), or of any ``QdrantClient``."""

    def __init__(self, collection: str, url: str | None = None, client=None):
        qdrant_client = _import("qdrant_client", "qdrant-client")
        from qdrant_client import models

        self.models, self.collection = models, collection
        self._owns_client = client is None  # a given client is the caller's to close
        self.client = client if client is not None else qdrant_client.QdrantClient(url=url)
        self.where = f"collection {collection!r} at {url or 'the given client'}"

    def exists(self) -> bool:
        return self.client.collection_exists(self.collection)

    def drop(self) -> None:
        self.client.delete_collection(self.collection)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def create(self, spec: CollectionSpec) -> None:
        models = self.models
        quantized = spec.dtype == "int8"
        vectors = {}
        for prefix in spec.prefixes:
            multi = prefix > 1
            vectors[vector_name(prefix)] = models.VectorParams(
                size=spec.dim,
                distance=models.Distance.DOT,
                multivector_config=(
                    models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
                    if multi
                    else None
                ),
                hnsw_config=models.HnswConfigDiff(
                    m=0 if multi else GRAPH_EDGES,
                    ef_construct=GRAPH_EF_CONSTRUCT,
                    full_scan_threshold=FULL_SCAN_KB,
                ),
                datatype=models.Datatype.FLOAT16 if spec.dtype == "bfloat16" else None,
                memory=models.Memory.COLD if quantized else None,
                quantization_config=(
                    models.ScalarQuantization(
                        scalar=models.ScalarQuantizationConfig(
                            type=models.ScalarType.INT8, memory=models.Memory.PINNED
                        )
                    )
                    if quantized
                    else None
                ),
            )
        self.client.create_collection(
            self.collection,
            vectors_config=vectors,
            shard_number=spec.shard_number,
            replication_factor=spec.replication_factor,
        )

    def upsert(self, points) -> None:
        structs = [
            self.models.PointStruct(
                id=pid, vector={name: v.tolist() for name, v in vectors.items()}, payload=payload
            )
            for pid, vectors, payload in points
        ]
        # wait: applied in order, so the manifest written last is never ahead of the points.
        self.client.upsert(self.collection, points=structs, wait=True)

    def finish_writes(self) -> None:
        """Nothing to do: the server indexes and quantizes in the background."""

    def flush(self) -> None:
        """Nothing to do: each upsert waited until it was applied."""

    def payloads(self, point_ids) -> dict:
        records = self.client.retrieve(
            self.collection, list(point_ids), with_payload=True, with_vectors=False
        )
        return {str(r.id): r.payload for r in records}

    def _search_params(self, request: Request):
        models, quantization = self.models, None
        if request.quantized:
            quantization = models.QuantizationSearchParams(
                rescore=request.oversampling is not None, oversampling=request.oversampling
            )
        if quantization is None and not request.exact:
            return None  # (local mode warns about any search params)
        return models.SearchParams(exact=request.exact, quantization=quantization)

    def query_batch(self, requests: list[Request]) -> list[list[tuple[float, dict]]]:
        models, built = self.models, []
        for request in requests:
            prefetch = None
            if request.prefetch is not None:
                stage = request.prefetch
                coarse = Request(stage, quantized=request.quantized, exact=request.exact)
                prefetch = models.Prefetch(
                    query=stage.vectors.tolist(),
                    using=stage.using,
                    limit=stage.limit,
                    params=self._search_params(coarse),
                )
            built.append(
                models.QueryRequest(
                    query=request.final.vectors.tolist(),
                    using=request.final.using,
                    limit=request.final.limit,
                    prefetch=prefetch,
                    params=self._search_params(request),
                    with_payload=PAYLOAD_FIELDS,
                )
            )
        results = self.client.query_batch_points(self.collection, requests=built)
        return [[(p.score, p.payload) for p in hits.points] for hits in results]
