"""Multi-vector index: one stored copy of all R_c candidate vectors serves every budget.

Storage dtypes: float32, bfloat16 (kept on the host and devices as its raw 16-bit words, see
`scoring.bfloat16_words`) and int8 with one float32 scale per vector (symmetric, absmax / 127).

Layout: budget-major. Each block of candidates is stored as ``[R_c, n, D]`` (scales
``[R_c, n]``), so the first ``r_c`` vectors of all its candidates are one contiguous range, in
memory, in the files and under mmap: a ``(1, 1)`` search reads 1/R_c of the index with no stride,
and a memory-mapped index streams only the prefix its budget needs.

Search runs on a device mesh, which may span several processes: the candidate axis is split over
all devices of the mesh (each process reads only the rows of its own devices), each device scores
its shard (chunked MaxSim, float32 accumulation) and keeps a local top-k, and one
all-gather + top-k merges them. Ties go to the lower position on every path (shards and blocks are
merged in position order), so results equal the single-device ones. An index loaded with
``mmap=True`` is streamed from disk one file shard at a time, so it can exceed RAM.

Two-stage search: a cheap coarse pass at ``coarse_budget`` over everything keeps ``shortlist``
candidates per query; those are rescored exactly at ``budget``.

Rescoring a quantised index (the "reorder" step of FAISS / ScaNN): built with
``full_precision=True``, an int8 / bfloat16 index also keeps every vector in float32, on disk once
saved (memory-mapped on load, so RAM holds only the quantised copy); ``search(..., rescore=S)``
keeps the quantised search's best ``S`` per query and returns their exact float32 order.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metaembed_jax.retrieval import _placement as placement
from metaembed_jax.retrieval import _search as kernels
from metaembed_jax.retrieval import _storage as _index_io
from metaembed_jax.scoring import default_chunk_size, resolve_budget, top_k

DTYPES = ("float32", "bfloat16", "int8")
_HOST_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "int8": np.int8}
_CONVERT_ROWS = 4096  # rows converted at a time: bounds the float32 temporaries of build/add
DEFAULT_SHARD_ROWS = 65536  # candidates per file shard on save (= streaming block size)
_RESCORE_BYTES = 256 << 20  # float32 vectors gathered at a time when rescoring


def _quantize_rows(block: np.ndarray, dtype: str, first_row: int):
    """One float32 block [n, R, D] -> (stored [n, R, D], scales [n, R] | None); rejects
    non-finite values (an int8 index would store NaN, a search would rank garbage)."""
    finite = np.isfinite(block).all(axis=(1, 2))
    if not finite.all():
        row = first_row + int(np.argmin(finite))
        raise ValueError(
            f"embeddings of candidate {row} (row {row} of the input) contain NaN or inf; "
            "only finite vectors can be indexed"
        )
    if dtype == "float32":
        return block, None
    if dtype == "bfloat16":
        return block.astype(jnp.bfloat16).view(np.uint16), None
    absmax = np.abs(block).max(axis=-1)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(block / scale[..., None]), -127, 127).astype(np.int8), scale


def quantize(embeddings: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """[N, R, D] float -> (stored vectors [N, R, D] in the host dtype of ``dtype``, scales
    [N, R] | None), in the candidate-major layout `scoring.maxsim` takes.

    Raises:
      ValueError: non-finite values (naming the first bad candidate).
    """
    embeddings = np.asarray(embeddings)
    vectors = np.empty(embeddings.shape, _HOST_DTYPES[dtype])
    scales = np.empty(embeddings.shape[:2], np.float32) if dtype == "int8" else None
    for start in range(0, embeddings.shape[0], _CONVERT_ROWS):
        rows = slice(start, start + _CONVERT_ROWS)
        stored, scale = _quantize_rows(np.asarray(embeddings[rows], np.float32), dtype, start)
        vectors[rows] = stored
        if scales is not None:
            scales[rows] = scale
    return vectors, scales


def _to_store(embeddings: np.ndarray, dtype: str, full_precision: bool):
    """[n, R, D] float -> budget-major (vectors [R, n, D], scales [R, n] | None,
    float32 copy [R, n, D] | None), converted a bounded number of rows at a time."""
    n, r, d = embeddings.shape
    vectors = np.empty((r, n, d), _HOST_DTYPES[dtype])
    scales = np.empty((r, n), np.float32) if dtype == "int8" else None
    full = np.empty((r, n, d), np.float32) if full_precision else None
    for start in range(0, n, _CONVERT_ROWS):
        rows = slice(start, start + _CONVERT_ROWS)
        block = np.asarray(embeddings[rows], np.float32)
        stored, scale = _quantize_rows(block, dtype, start)
        vectors[:, rows] = stored.transpose(1, 0, 2)
        if scales is not None:
            scales[:, rows] = scale.T
        if full is not None:
            full[:, rows] = block.transpose(1, 0, 2)
    return vectors, scales, full


def dequantize(vectors: np.ndarray, scales: np.ndarray | None, dtype: str) -> np.ndarray:
    """Inverse of `quantize` (exact for float32 / bfloat16), as float32, in any layout (scales
    shaped like the vectors without D)."""
    if dtype == "bfloat16":
        return np.asarray(vectors).view(jnp.bfloat16).astype(np.float32)
    if dtype == "int8":
        return np.asarray(vectors, np.float32) * np.asarray(scales)[..., None]
    return np.asarray(vectors, np.float32)


def _default_mesh() -> Mesh:
    # This process's first device: with several processes, each then searches on its own.
    return Mesh(np.array(jax.local_devices()[:1]), ("index",))


def check_ids(ids, count: int, existing: list) -> list:
    """The ids of ``count`` new candidates (default: their positions), checked to be ints
    (within int64, `_storage.INT_ID_RANGE`) or strs, unique, and not already in ``existing``.

    Raises ValueError naming the first bad id and its row."""
    if ids is None:
        ids = list(range(len(existing), len(existing) + count))
    ids = [i.item() if isinstance(i, np.generic) else i for i in ids]
    if len(ids) != count:
        raise ValueError(f"got {len(ids)} ids for {count} embeddings")
    low, high = _index_io.INT_ID_RANGE
    for row, candidate_id in enumerate(ids):
        if not isinstance(candidate_id, int | str) or isinstance(candidate_id, bool):
            raise ValueError(
                f"id {candidate_id!r} (row {row}) is a {type(candidate_id).__name__}: ids must be "
                "ints or strs (they are stored in the JSON manifest)"
            )
        if isinstance(candidate_id, int) and not low <= candidate_id <= high:
            raise ValueError(
                f"id {candidate_id} (row {row}) does not fit in int64 (searches return int ids "
                f"as an int64 array): use ids in [-2**63, 2**63 - 1], or str(id)"
            )
    seen = set(existing)
    for row, candidate_id in enumerate(ids):
        if candidate_id in seen:
            where = "earlier in these ids" if candidate_id in ids[:row] else "in the index"
            raise ValueError(f"duplicate id {candidate_id!r} (row {row}): already {where}")
        seen.add(candidate_id)
    return ids


def check_finite_queries(queries) -> None:
    queries = np.asarray(queries, np.float32)
    if np.isfinite(queries).all():  # one pass; which query is bad is looked up only on failure
        return
    finite = np.isfinite(queries).all(axis=(1, 2))
    raise ValueError(
        f"query {int(np.argmin(finite))} contains NaN or inf; only finite queries can be searched"
    )


class MultiVectorIndex:
    """All R_c vectors of every candidate, stored once; search at any budget.

    Build with `build`, extend with `add`, persist with `save` / `load` (with `metadata`).
    """

    def __init__(
        self,
        num_vectors: int,
        dim: int,
        dtype: str = "bfloat16",
        *,
        streaming=False,
        full_precision=False,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if full_precision and dtype == "float32":
            raise ValueError("full_precision is for quantised indexes: float32 already is exact")
        self.num_vectors, self.dim, self.dtype = int(num_vectors), int(dim), dtype
        self.streaming = streaming  # True: blocks stay on disk (memmaps), streamed per search
        self.full_precision = bool(full_precision)  # keeps float32 copies for `rescore`
        self._blocks: list[tuple[np.ndarray, np.ndarray | None]] = []  # [R, n, D], [R, n]
        self._full: list[np.ndarray] = []  # float32 [R, n_i, D]; memmaps once saved / loaded
        self._ids: list = []
        self._device_cache: dict = {}  # mesh -> (r_c, placed vectors, scales): one at a time
        self._ids_cache: np.ndarray | None = None  # the ids as one array, until `add`
        # JSON-serialisable facts about the index, saved in its manifest: what built it (the
        # model, `retrieval.provenance`), the corpus files a build skipped.
        self.metadata: dict = {}
        self.path: str | None = None  # the directory it was loaded from or saved to

    # ----------------------------------------------------------------------------- building
    @classmethod
    def build(
        cls, embeddings, ids=None, dtype: str = "bfloat16", *, full_precision: bool = False
    ) -> MultiVectorIndex:
        """Index ``embeddings`` [N, R_c, D] (finite floats); ``ids`` default to 0..N-1.

        ``full_precision``: also keep the vectors in float32 (on disk once saved) so that
        ``search(..., rescore=...)`` can return exact float32 results from a quantised index.

        Raises:
          ValueError: bad shape, dtype, non-finite values, bad or duplicate ids.
        """
        shape = np.shape(embeddings)
        if len(shape) != 3:
            raise ValueError(f"expected embeddings [N, R_c, D], got shape {shape}")
        index = cls(shape[1], shape[2], dtype, full_precision=full_precision)
        index.add(embeddings, ids)
        return index

    def add(self, embeddings, ids=None) -> None:
        """Append embeddings [n, R_c, D] (same R_c and D as the index) and their ids (unique,
        not yet in the index). Raises ValueError as `build`."""
        shape = np.shape(embeddings)
        if len(shape) != 3 or shape[1:] != (self.num_vectors, self.dim):
            raise ValueError(
                f"expected embeddings [n, {self.num_vectors}, {self.dim}] for this index, got "
                f"shape {shape}"
            )
        ids = check_ids(ids, shape[0], self._ids)
        vectors, scales, full = _to_store(np.asarray(embeddings), self.dtype, self.full_precision)
        self._blocks.append((vectors, scales))
        if full is not None:
            self._full.append(full)
        self._ids.extend(ids)
        self._device_cache.clear()
        self._ids_cache = None

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list:
        return list(self._ids)

    @property
    def nbytes(self) -> int:
        """Bytes of stored (quantised) vectors and scales: what the index costs in memory. The
        float32 copy of a ``full_precision`` index is not counted (it lives on disk)."""
        return sum(v.nbytes + (0 if s is None else s.nbytes) for v, s in self._blocks)

    def embeddings(self, count: int | None = None) -> np.ndarray:
        """The stored vectors of the first `count` candidates (None = all) dequantised to
        float32 [count, R_c, D] (for inspection and tests)."""
        count = len(self) if count is None else min(count, len(self))
        if count == 0:
            return np.zeros((0, self.num_vectors, self.dim))
        vectors = placement.host_rows([v for v, _ in self._blocks], 0, count)
        scales = None
        if self.dtype == "int8":  # the dtype that stores scales (as `_device_blocks` reads it)
            scales = placement.host_rows([s for _, s in self._blocks], 0, count)
        return dequantize(vectors, scales, self.dtype).transpose(1, 0, 2)

    def embedding_rows(self, start: int, stop: int, *, full_precision: bool = False):
        """Candidates [start, stop) as float32 [n, R_c, D] (for copying the index elsewhere,
        a range at a time): the stored vectors dequantised, or with ``full_precision`` the
        float32 copy of a ``full_precision`` index. Raises ValueError for a bad range."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"rows [{start}, {stop}) are not within [0, {len(self)}]")
        if full_precision and not self.full_precision:
            raise ValueError("this index keeps no float32 copy (built without full_precision)")
        if start == stop:
            return np.zeros((0, self.num_vectors, self.dim), np.float32)
        if full_precision:
            return placement.host_rows(self._full, start, stop).transpose(1, 0, 2)
        vectors = placement.host_rows([v for v, _ in self._blocks], start, stop)
        scales = None
        if self.dtype == "int8":
            scales = placement.host_rows([s for _, s in self._blocks], start, stop)
        return dequantize(vectors, scales, self.dtype).transpose(1, 0, 2)

    # ----------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike, shard_rows: int = DEFAULT_SHARD_ROWS) -> None:
        """Atomically write the index to directory ``path`` (see `_index_io`): safe against a
        crash (the previous index stays readable) and against concurrent saves to one path.

        A ``full_precision`` index then reads its float32 copy from the saved files (mmap)."""
        shards = []
        for vectors, scales in self._blocks:
            for start in range(0, vectors.shape[1], shard_rows):
                rows = slice(start, start + shard_rows)
                shards.append(
                    {
                        "vectors": vectors[:, rows],
                        "scales": None if scales is None else scales[:, rows],
                    }
                )
        if self.full_precision:
            offset = 0
            for shard in shards:
                count = shard["vectors"].shape[1]
                shard["full"] = placement.host_rows(self._full, offset, offset + count)
                offset += count
        header = {
            "dtype": self.dtype,
            "count": len(self),
            "num_vectors": self.num_vectors,
            "dim": self.dim,
            "full_precision": self.full_precision,
            "ids": self._ids,
            "metadata": self.metadata,
        }
        path = os.fspath(path)
        entries = _index_io.save(path, header, shards)
        self.path = path
        if self.full_precision:  # RAM keeps only the quantised copy from now on
            self._full = [
                _index_io.read_array(path, e["full"], mmap=True, verify=False) for e in entries
            ]

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = False, verify: bool = True):
        """Read an index saved by `save` (format version 2, or version 1 of earlier releases).

        Args:
          mmap: keep the shards on disk (memory-mapped) and stream them per search, so the index
            may be larger than RAM. The float32 copy of a ``full_precision`` index is always
            memory-mapped.
          verify: check every shard's sha256 (reads each file once, streaming).

        Raises:
          FileNotFoundError: no index or a missing shard. ValueError: corrupt or unsupported
          manifest (named field, file name outside the directory, unknown format version), or a
          truncated or altered shard.
        """
        path = os.fspath(path)
        with _index_io.locked(path, shared=True):  # no save swaps files while we read them
            manifest = _index_io.read_manifest(path)
            if manifest["dtype"] not in DTYPES:
                raise ValueError(f"{path!r}: unknown index dtype {manifest['dtype']!r}")
            index = cls(
                manifest["num_vectors"],
                manifest["dim"],
                manifest["dtype"],
                streaming=mmap,
                full_precision=bool(manifest.get("full_precision", False)),
            )
            for entry in manifest["shards"]:
                index._load_shard(path, entry, manifest["version"], mmap=mmap, verify=verify)
        index._ids = list(manifest["ids"])
        index.metadata = dict(manifest.get("metadata", {}))
        index.path = path
        return index

    def _load_shard(self, path, entry, version, *, mmap, verify):
        """Read one manifest shard entry into `_blocks` (and `_full`), as budget-major arrays
        (a version-1 shard [n, R, D] is transposed: a copy in RAM, a strided view under mmap)."""
        read = _index_io.read_array
        vectors = read(path, entry["vectors"], mmap=mmap, verify=verify)
        name = entry["vectors"]["file"]
        if version == 1 and vectors.ndim == 3:
            vectors = vectors.transpose(1, 0, 2)
        if vectors.dtype != np.dtype(_HOST_DTYPES[self.dtype]) or (
            vectors.shape[0],
            vectors.shape[2:],
        ) != (self.num_vectors, (self.dim,)):
            raise ValueError(
                f"{path!r}: shard {name} has dtype {vectors.dtype} and shape {vectors.shape}; "
                f"the manifest's index needs {np.dtype(_HOST_DTYPES[self.dtype])} "
                f"[{self.num_vectors}, n, {self.dim}]"
            )
        scales = None
        if self.dtype == "int8":
            if "scales" not in entry:
                raise ValueError(f"{path!r}: int8 shard {name} without scales")
            scales = read(path, entry["scales"], mmap=mmap, verify=verify)
            scales = scales.T if version == 1 else scales
            if scales.shape != vectors.shape[:2] or scales.dtype != np.float32:
                raise ValueError(
                    f"{path!r}: scales of {name} ({scales.dtype} {scales.shape}) do not match "
                    f"its vectors {vectors.shape}"
                )
        if not mmap and version == 1:
            vectors = np.ascontiguousarray(vectors)
            scales = None if scales is None else np.ascontiguousarray(scales)
        self._blocks.append((vectors, scales))
        if self.full_precision:
            if "full" not in entry:
                raise ValueError(f"{path!r}: full-precision index, shard {name} has no 'full'")
            full = read(path, entry["full"], mmap=True, verify=verify)
            if full.shape != vectors.shape or full.dtype != np.float32:
                raise ValueError(
                    f"{path!r}: float32 copy of {name} ({full.dtype} {full.shape}) does not "
                    f"match its vectors {vectors.shape}"
                )
            self._full.append(full)

    # ----------------------------------------------------------------------------- search
    def _device_blocks(self, mesh: Mesh, r_c: int):
        """Yield (offset, vectors, scales, limit) blocks placed on ``mesh``, candidates split
        evenly over its devices (zero rows pad to a multiple of the device count; never
        returned). Only the first ``r_c`` vectors are placed (one contiguous range per block):
        in memory they stay cached on the devices until a larger ``r_c`` (or `add`) replaces
        them, so device memory grows with the largest budget searched, not with R_c; streamed,
        each file shard's prefix is placed per search.

        Each process reads only the rows its own devices hold (`_index_placement.place_rows`),
        so on a mesh that spans several processes a memory-mapped index is read from disk once
        in total, not once per process.
        """
        devices = mesh.devices.size
        sharding = NamedSharding(mesh, P(None, kernels.mesh_axes(mesh)))
        has_scales = self.dtype == "int8"
        if not self.streaming:
            placed = self._device_cache.get(mesh)
            if placed is None or placed[0] < r_c:
                self._device_cache.clear()  # one placement at a time: each is a copy
                rows = -(-max(1, len(self)) // devices) * devices
                vectors = [v[:r_c] for v, _ in self._blocks]
                scales = [s[:r_c] for _, s in self._blocks] if has_scales else None
                self._device_cache[mesh] = (
                    r_c,
                    placement.place_rows(vectors, rows, sharding),
                    None if scales is None else placement.place_rows(scales, rows, sharding),
                )
            yield (0, *self._device_cache[mesh][1:], len(self))
            return
        # Streaming: every block padded to one row count, so a single compiled program serves.
        rows = max(v.shape[1] for v, _ in self._blocks)
        rows = -(-rows // devices) * devices
        offset = 0
        for vectors, scales in self._blocks:
            count = vectors.shape[1]
            if count:
                placed = placement.place_rows([vectors[:r_c]], rows, sharding)
                placed_scales = (
                    None if scales is None else placement.place_rows([scales[:r_c]], rows, sharding)
                )
                yield offset, placed, placed_scales, offset + count
            offset += count

    def _check_queries(self, queries, query_mask):
        shape = np.shape(queries)
        if len(shape) != 3 or shape[2] != self.dim:
            raise ValueError(
                f"expected queries [Nq, R_q, {self.dim}] for an index of D={self.dim}, got "
                f"shape {shape}"
            )
        if query_mask is not None and np.shape(query_mask) != shape[:2]:
            raise ValueError(f"query_mask must have shape {shape[:2]}, got {np.shape(query_mask)}")
        check_finite_queries(queries)

    def search(
        self,
        queries,
        budget=(16, 64),
        k: int = 10,
        *,
        coarse_budget=None,
        shortlist: int = 1000,
        query_mask=None,
        mesh: Mesh | None = None,
        chunk_size: int | None = None,
        rescore: int | None = None,
    ):
        """Top-k candidates of each query at ``budget``.

        Args:
          queries: [Nq, R_q, D] finite floats (cast to float32; a bfloat16 index multiplies in
            bfloat16).
          budget: (r_q, r_c) of the final scores.
          k: results per query, 1 <= k <= len(index).
          coarse_budget: if given, two-stage search: score everything at this budget, keep the
            best ``shortlist`` per query, rescore those exactly at ``budget``.
          query_mask: optional [Nq, R_q]; masked query vectors add 0.
          mesh: jax Mesh to shard the candidates over (all its axes); default one device.
          rescore: for a ``full_precision`` index: keep the best ``rescore`` (>= k) candidates
            of the search on the stored (quantised) vectors, score them exactly from the float32
            copy and return the best k of those: float32 results whenever the float32 top-k is
            within that shortlist.

        Returns:
          (scores [Nq, k] float32 numpy, ids [Nq, k] numpy array of the stored ids), best first;
          equal scores are ordered by position in the index.

        Raises:
          ValueError: bad shapes, budget, k, shortlist or rescore; non-finite queries.
        """
        host_queries = np.asarray(queries, np.float32)
        self._check_queries(host_queries, query_mask)
        r_q, r_c = resolve_budget(budget, host_queries.shape[1], self.num_vectors)
        if not (isinstance(k, int | np.integer) and 1 <= k <= len(self)):
            raise ValueError(f"k must be an int in [1, {len(self)}] (index size), got {k!r}")
        found = k if rescore is None else self._check_rescore(rescore, k)
        host_mask = None if query_mask is None else np.asarray(query_mask, bool)
        mesh = _default_mesh() if mesh is None else mesh
        # Only the query vectors the budgets use go to the devices (a (1, 1) search of 16-vector
        # queries moves 1/16 of them: at D = 2048, 4 MB -> 256 KB a call).
        coarse = None
        if coarse_budget is not None:
            coarse = resolve_budget(coarse_budget, host_queries.shape[1], self.num_vectors)
        used = r_q if coarse is None else max(r_q, coarse[0])
        queries = placement.replicate(np.ascontiguousarray(host_queries[:, :used]), mesh)
        query_mask = None if host_mask is None else placement.replicate(host_mask[:, :used], mesh)
        if coarse is None:
            values, positions = self._exhaustive(
                queries, query_mask, (r_q, r_c), found, mesh, chunk_size
            )
        else:
            size = min(int(shortlist), len(self))
            if size < found:
                what = f"k={k}" if rescore is None else f"k and rescore={found}"
                raise ValueError(f"shortlist must be >= {what}, got {shortlist!r}")
            _, candidates = self._exhaustive(queries, query_mask, coarse, size, mesh, chunk_size)
            values, positions = self._rerank(
                queries, query_mask, (r_q, r_c), found, candidates, mesh
            )
        # np.minimum / maximum, not np.clip: the same values, ~3 us less a call on [Nq, k].
        positions = np.minimum(np.maximum(np.asarray(positions), 0), len(self) - 1)
        if rescore is not None:
            values, positions = self._rescore(host_queries, host_mask, (r_q, r_c), k, positions)
        return np.asarray(values, np.float32), self._ids_array()[positions]

    def _check_rescore(self, rescore, k) -> int:
        """The shortlist size of a rescored search (at most the index size)."""
        if not self.full_precision:
            raise ValueError(
                "rescore needs the float32 copy of the vectors: build the index with "
                "full_precision=True"
            )
        if not (isinstance(rescore, int | np.integer) and rescore >= k):
            raise ValueError(f"rescore must be an int >= k={k}, got {rescore!r}")
        return min(int(rescore), len(self))

    def _rescore(self, queries, query_mask, budget, k, shortlist):
        """Exact float32 top-k of each query among its own ``shortlist`` [Nq, S] positions."""
        r_q, r_c = budget
        unique = np.unique(shortlist)  # sorted: ties then go to the lower position
        group = max(1, _RESCORE_BYTES // (r_c * self.dim * 4))
        bucket = min(group, 1 << int(np.ceil(np.log2(len(unique)))))  # few compiled shapes
        chunk = default_chunk_size(len(queries) * r_q, r_c, bucket, self.dim, 4)
        ranges, parts = placement.row_ranges(self._full), []
        for start in range(0, len(unique), bucket):
            chosen = unique[start : start + bucket]
            gathered = placement.gather_columns(self._full, chosen, r_c, ranges)
            if len(chosen) < bucket:
                pad = np.zeros((r_c, bucket - len(chosen), self.dim), np.float32)
                gathered = np.concatenate([gathered, pad], axis=1)
            scores = kernels.full_precision_scores(
                jnp.asarray(queries),
                None if query_mask is None else jnp.asarray(query_mask),
                jnp.asarray(gathered),
                r_q=r_q,
                r_c=r_c,
                chunk_size=chunk,
            )
            parts.append(np.asarray(scores)[:, : len(chosen)])
        scores = np.concatenate(parts, axis=1)  # [Nq, U]
        member = np.zeros(scores.shape, bool)
        member[np.arange(len(scores))[:, None], np.searchsorted(unique, shortlist)] = True
        values, order = top_k(np.where(member, scores, -np.inf), k)
        return values, unique[np.asarray(order)]

    def _ids_array(self) -> np.ndarray:
        """The ids as one numpy array (int64 if all ints, else object), cached until `add`."""
        if self._ids_cache is None:
            all_ints = all(isinstance(i, int) for i in self._ids)
            self._ids_cache = np.asarray(self._ids, np.int64 if all_ints else object)
        return self._ids_cache

    def _merged_over_blocks(self, mesh, k, r_c, search_block):
        """``search_block(vectors, scales, offset, limit) -> (values, positions)`` on every placed
        block, the per-block top-k lists merged in position order (ties: lower position)."""
        best = None
        for offset, vectors, scales, limit in self._device_blocks(mesh, r_c):
            found = search_block(vectors, scales, np.int32(offset), np.int32(limit))
            best = found if best is None else kernels.merge_pairs(best, found, k)
        return best

    def _exhaustive(self, queries, query_mask, budget, k, mesh, chunk_size):
        r_q, r_c = budget

        def search_block(vectors, scales, offset, limit):
            n_local = vectors.shape[1] // mesh.devices.size
            chunk = chunk_size or _search_chunk_size(
                queries.shape[0], (r_q, r_c), n_local, self.dim, vectors.dtype
            )
            search = kernels.exhaustive_fn(
                mesh,
                r_q,
                r_c,
                min(k, vectors.shape[1]),
                min(chunk, n_local),
                scales is not None,
                query_mask is not None,
            )
            return search(queries, query_mask, vectors, scales, offset, limit)

        return self._merged_over_blocks(mesh, k, r_c, search_block)

    def _rerank(self, queries, query_mask, budget, k, shortlist, mesh):
        def rerank_block(vectors, scales, offset, limit):
            rerank = kernels.rerank_fn(mesh, *budget, k, scales is not None, query_mask is not None)
            return rerank(queries, query_mask, vectors, scales, offset, limit, shortlist)

        return self._merged_over_blocks(mesh, k, budget[1], rerank_block)


def _search_chunk_size(num_queries: int, budget, num_candidates: int, dim: int, dtype) -> int:
    """Candidates per chunk of an exhaustive search on a device's ``num_candidates``.

    A float32 ``(1, 1)`` search scores all of them at once: its similarity block is the score
    rows themselves (chunks would bound no memory), the prefix it reads is one contiguous range,
    and one chunk is what the candidates-first kernel (`_index_search._single_vector_top_k`)
    takes; on the chunked kernel too one chunk was the fastest at every size
    (`benchmarks/index_chunk_sweep.py`). bfloat16 keeps the bounded chunks (one
    chunk was slower at 4000 x 2048 there), as do larger budgets, whose similarity block grows
    with r_q * r_c.
    """
    r_q, r_c = budget
    if (r_q, r_c) == (1, 1) and np.dtype(dtype) == np.float32:
        return num_candidates
    return default_chunk_size(num_queries * r_q, r_c, num_candidates, dim, np.dtype(dtype).itemsize)


def exhaustive_search_program(mesh, budget: tuple[int, int], k: int, chunk_size: int):
    """The jitted, sharded exhaustive search the index runs over one block of float / bfloat16
    candidates (no int8 scales, no query mask), for ahead-of-time compilation (`metaembed
    compile`): `fn(queries, None, block [r_c, N, D], None, offset, limit)` -> (scores,
    positions)."""
    r_q, r_c = budget
    return kernels.exhaustive_fn(mesh, r_q, r_c, k, chunk_size, False, False)
