"""Multi-vector index: one stored copy of all R_c candidate vectors serves every budget.

Storage dtypes: float32, bfloat16 (kept on the host and devices as its raw 16-bit words, see
`scoring.bfloat16_words`) and int8 with one float32 scale per vector (symmetric, absmax / 127).

Search runs on a device mesh, which may span several processes: the candidate axis is split over
all devices of the mesh (each process reads only the rows of its own devices), each device scores
its shard (chunked MaxSim, float32 accumulation) and keeps a local top-k, and one
all-gather + top-k merges them. Ties go to the lower position on every path (shards and blocks are
merged in position order), so results equal the single-device ones. An index loaded with
``mmap=True`` is streamed from disk one file shard at a time, so it can exceed RAM.

Two-stage search: a cheap coarse pass at ``coarse_budget`` over everything keeps ``shortlist``
candidates per query; those are rescored exactly at ``budget``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metaembed_jax import _index_io
from metaembed_jax.scoring import (
    chunked_scores,
    compute_dtype,
    default_chunk_size,
    resolve_budget,
    score_block,
)

DTYPES = ("float32", "bfloat16", "int8")
_HOST_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "int8": np.int8}
_CONVERT_ROWS = 4096  # rows converted at a time: bounds the float32 temporaries of build/add
DEFAULT_SHARD_ROWS = 65536  # candidates per file shard on save (= streaming block size)


def quantize(embeddings: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """[N, R, D] float -> (stored vectors in the host layout of ``dtype``, scales [N, R] | None)."""
    embeddings = np.asarray(embeddings)
    vectors = np.empty(embeddings.shape, _HOST_DTYPES[dtype])
    scales = np.empty(embeddings.shape[:2], np.float32) if dtype == "int8" else None
    for start in range(0, embeddings.shape[0], _CONVERT_ROWS):
        rows = slice(start, start + _CONVERT_ROWS)
        block = np.asarray(embeddings[rows], np.float32)
        if dtype == "float32":
            vectors[rows] = block
        elif dtype == "bfloat16":
            vectors[rows] = block.astype(jnp.bfloat16).view(np.uint16)
        else:
            absmax = np.abs(block).max(axis=-1)
            scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
            vectors[rows] = np.clip(np.rint(block / scale[..., None]), -127, 127)
            scales[rows] = scale
    return vectors, scales


def dequantize(vectors: np.ndarray, scales: np.ndarray | None, dtype: str) -> np.ndarray:
    """Inverse of `quantize` (exact for float32 / bfloat16), as float32."""
    if dtype == "bfloat16":
        return np.asarray(vectors).view(jnp.bfloat16).astype(np.float32)
    if dtype == "int8":
        return np.asarray(vectors, np.float32) * np.asarray(scales)[..., None]
    return np.asarray(vectors, np.float32)


def _mesh_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(mesh.axis_names)


def _merge(values, positions, k):
    """Global top-k of per-part lists concatenated in position order (ties: earlier part)."""
    best, order = lax.top_k(values, k)
    return best, jnp.take_along_axis(positions, order, axis=1)


def _local_top_k(scores, positions, limit, k):
    """Top-k of one device's scores [Nq, n]; positions >= limit (padding) never win."""
    scores = jnp.where(positions < limit, scores, -jnp.inf)
    best, order = lax.top_k(scores, min(k, scores.shape[1]))
    return best, jnp.take_along_axis(positions, order, axis=1)


def _gather_merge(values, positions, axes, k):
    values = lax.all_gather(values, axes, axis=1, tiled=True)
    positions = lax.all_gather(positions, axes, axis=1, tiled=True)
    return _merge(values, positions, k)


@functools.lru_cache(maxsize=64)
def _exhaustive_fn(mesh, r_q, r_c, k, chunk_size, has_scales, has_mask):
    """Jitted sharded exhaustive search of one block: -> (scores [Nq, k], positions [Nq, k])."""
    axes = _mesh_axes(mesh)

    def local(queries, query_mask, block, scales, offset, limit):
        n_local = block.shape[0]
        positions = offset + lax.axis_index(axes) * n_local + jnp.arange(n_local)
        scores = chunked_scores(
            queries, block, query_mask, None, scales, r_q=r_q, r_c=r_c, chunk_size=chunk_size
        )
        positions = jnp.broadcast_to(positions, scores.shape)
        values, positions = _local_top_k(scores, positions, limit, k)
        return _gather_merge(values, positions, axes, k)

    return _jit_sharded(local, mesh, axes, has_mask, has_scales, num_replicated=2)


def _jit_sharded(local, mesh, axes, has_mask, has_scales, *, num_replicated):
    """`local(queries, query_mask, block, scales, *replicated)` jitted under shard_map: the
    candidate block (and its scales) split over the mesh axes, everything else replicated,
    outputs (the merged top-k) replicated."""
    shard_spec = P(axes)
    in_specs = (P(), P() if has_mask else None, shard_spec, shard_spec if has_scales else None)
    return jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(*in_specs, *([P()] * num_replicated)),
            out_specs=(P(), P()),
            check_vma=False,
        )
    )


def _rerank_one(query, query_mask, block, scales, local_positions, *, r_q, r_c):
    """Exact scores of one query [R_q, D] against its own gathered candidates -> [S]."""
    candidates = block[local_positions, :r_c]  # one gather of [S, r_c, D]
    if candidates.dtype == jnp.uint16:
        candidates = lax.bitcast_convert_type(candidates, jnp.bfloat16)
    dtype = compute_dtype(query.dtype, candidates.dtype)
    return score_block(
        query[:r_q].astype(dtype),
        None if query_mask is None else query_mask[None, :r_q],
        candidates,
        None,
        None if scales is None else scales[local_positions, :r_c],
        num_queries=1,
        r_q=r_q,
        dtype=dtype,
    )[0]


@functools.lru_cache(maxsize=64)
def _rerank_fn(mesh, r_q, r_c, k, has_scales, has_mask):
    """Jitted sharded exact rerank of a shortlist [Nq, S] (sorted global positions): each device
    scores the shortlisted candidates it owns, then one global merge."""
    axes = _mesh_axes(mesh)

    def local(queries, query_mask, block, scales, offset, limit, shortlist):
        n_local = block.shape[0]
        start = offset + lax.axis_index(axes) * n_local
        # Sorted positions: ties of the exact scores then resolve to the lower position.
        shortlist = jnp.sort(shortlist, axis=1)
        local_positions = shortlist - start
        owned = (local_positions >= 0) & (local_positions < n_local) & (shortlist < limit)
        local_positions = jnp.clip(local_positions, 0, n_local - 1)
        rerank = functools.partial(_rerank_one, block=block, scales=scales, r_q=r_q, r_c=r_c)
        masks = query_mask if query_mask is not None else jnp.zeros(queries.shape[0])
        scores = lax.map(
            lambda args: rerank(
                args[0], args[1] if query_mask is not None else None, local_positions=args[2]
            ),
            (queries, masks, local_positions),
        )
        values, positions = _merge(jnp.where(owned, scores, -jnp.inf), shortlist, k)
        return _gather_merge(values, positions, axes, k)

    return _jit_sharded(local, mesh, axes, has_mask, has_scales, num_replicated=3)


def _default_mesh() -> Mesh:
    # This process's first device: with several processes, each then searches on its own.
    return Mesh(np.array(jax.local_devices()[:1]), ("index",))


def _check_ids(ids, count: int, start: int) -> list:
    if ids is None:
        return list(range(start, start + count))
    ids = [i.item() if isinstance(i, np.generic) else i for i in ids]
    if len(ids) != count:
        raise ValueError(f"got {len(ids)} ids for {count} embeddings")
    if not all(isinstance(i, int | str) and not isinstance(i, bool) for i in ids):
        raise ValueError("ids must be ints or strs (they are stored in the JSON manifest)")
    return ids


class MultiVectorIndex:
    """All R_c vectors of every candidate, stored once; search at any budget.

    Build with `build`, extend with `add`, persist with `save` / `load`.
    """

    def __init__(self, num_vectors: int, dim: int, dtype: str = "bfloat16", *, streaming=False):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.num_vectors, self.dim, self.dtype = int(num_vectors), int(dim), dtype
        self.streaming = streaming  # True: blocks stay on disk (memmaps), streamed per search
        self._blocks: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._ids: list = []
        self._device_cache: dict = {}  # mesh -> the placed (vectors, scales): one at a time
        self._ids_cache: np.ndarray | None = None  # the ids as one array, until `add`

    # ----------------------------------------------------------------------------- building
    @classmethod
    def build(cls, embeddings, ids=None, dtype: str = "bfloat16") -> MultiVectorIndex:
        """Index ``embeddings`` [N, R_c, D] (float); ``ids`` default to 0..N-1."""
        shape = np.shape(embeddings)
        if len(shape) != 3:
            raise ValueError(f"expected embeddings [N, R_c, D], got shape {shape}")
        index = cls(shape[1], shape[2], dtype)
        index.add(embeddings, ids)
        return index

    def add(self, embeddings, ids=None) -> None:
        """Append embeddings [n, R_c, D] (same R_c and D as the index) and their ids."""
        shape = np.shape(embeddings)
        if len(shape) != 3 or shape[1:] != (self.num_vectors, self.dim):
            raise ValueError(
                f"expected embeddings [n, {self.num_vectors}, {self.dim}] for this index, got "
                f"shape {shape}"
            )
        ids = _check_ids(ids, shape[0], len(self._ids))
        self._blocks.append(quantize(np.asarray(embeddings), self.dtype))
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
        """Bytes of stored vectors and scales (what the index costs in memory / on disk)."""
        return sum(v.nbytes + (0 if s is None else s.nbytes) for v, s in self._blocks)

    def embeddings(self) -> np.ndarray:
        """All stored vectors dequantised to float32 [N, R_c, D] (for inspection and tests)."""
        parts = [dequantize(v, s, self.dtype) for v, s in self._blocks]
        return np.concatenate(parts) if parts else np.zeros((0, self.num_vectors, self.dim))

    # ----------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike, shard_rows: int = DEFAULT_SHARD_ROWS) -> None:
        """Atomically write the index to directory ``path`` (see `_index_io`)."""
        shards = []
        for vectors, scales in self._blocks:
            for start in range(0, vectors.shape[0], shard_rows):
                rows = slice(start, start + shard_rows)
                shards.append(
                    {"vectors": vectors[rows], "scales": None if scales is None else scales[rows]}
                )
        header = {
            "dtype": self.dtype,
            "count": len(self),
            "num_vectors": self.num_vectors,
            "dim": self.dim,
            "ids": self._ids,
        }
        _index_io.save(os.fspath(path), header, shards)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = False, verify: bool = True):
        """Read an index saved by `save`.

        Args:
          mmap: keep the shards on disk (memory-mapped) and stream them per search, so the index
            may be larger than RAM.
          verify: check every shard's sha256 (reads each file once, streaming).

        Raises:
          FileNotFoundError: no index or a missing shard. ValueError: corrupt manifest, or a
          truncated or altered shard.
        """
        path = os.fspath(path)
        manifest = _index_io.read_manifest(path)
        if manifest["dtype"] not in DTYPES:
            raise ValueError(f"{path!r}: unknown index dtype {manifest['dtype']!r}")
        index = cls(manifest["num_vectors"], manifest["dim"], manifest["dtype"], streaming=mmap)
        expected_host = np.dtype(_HOST_DTYPES[index.dtype])
        for entry in manifest["shards"]:
            vectors = _index_io.read_array(path, entry["vectors"], mmap=mmap, verify=verify)
            if vectors.dtype != expected_host or vectors.shape[1:] != (
                index.num_vectors,
                index.dim,
            ):
                raise ValueError(
                    f"{path!r}: shard {entry['vectors']['file']} does not match "
                    f"the manifest's dtype / shape"
                )
            scales = None
            if index.dtype == "int8":
                if "scales" not in entry:
                    raise ValueError(f"{path!r}: int8 shard without scales")
                scales = _index_io.read_array(path, entry["scales"], mmap=mmap, verify=verify)
                if scales.shape != vectors.shape[:2] or scales.dtype != np.float32:
                    raise ValueError(
                        f"{path!r}: scales of {entry['vectors']['file']} do not "
                        f"match its vectors {vectors.shape}"
                    )
            index._blocks.append((vectors, scales))
        index._ids = list(manifest["ids"])
        return index

    # ----------------------------------------------------------------------------- search
    def _device_blocks(self, mesh: Mesh):
        """Yield (offset, vectors, scales, limit) blocks placed on ``mesh``, rows split evenly
        over its devices (zero rows pad to a multiple of the device count; never returned).

        Each process reads only the rows its own devices hold (`_place_rows`), so on a mesh that
        spans several processes a memory-mapped index is read from disk once in total, not once
        per process.
        """
        devices = mesh.devices.size
        sharding = NamedSharding(mesh, P(_mesh_axes(mesh)))
        has_scales = self.dtype == "int8"
        if not self.streaming:
            if mesh not in self._device_cache:
                self._device_cache.clear()  # one placement at a time: each is a full copy
                rows = -(-max(1, len(self)) // devices) * devices
                vectors = [v for v, _ in self._blocks]
                scales = [s for _, s in self._blocks] if has_scales else None
                self._device_cache[mesh] = (
                    _place_rows(vectors, rows, sharding),
                    None if scales is None else _place_rows(scales, rows, sharding),
                )
            yield (0, *self._device_cache[mesh], len(self))
            return
        # Streaming: every block padded to one row count, so a single compiled program serves.
        rows = max(v.shape[0] for v, _ in self._blocks)
        rows = -(-rows // devices) * devices
        offset = 0
        for vectors, scales in self._blocks:
            count = vectors.shape[0]
            if count:
                placed = _place_rows([vectors], rows, sharding)
                placed_scales = None if scales is None else _place_rows([scales], rows, sharding)
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
    ):
        """Top-k candidates of each query at ``budget``.

        Args:
          queries: [Nq, R_q, D] float (cast to float32; a bfloat16 index multiplies in bfloat16).
          budget: (r_q, r_c) of the final scores.
          k: results per query, 1 <= k <= len(index).
          coarse_budget: if given, two-stage search: score everything at this budget, keep the
            best ``shortlist`` per query, rescore those exactly at ``budget``.
          query_mask: optional [Nq, R_q]; masked query vectors add 0.
          mesh: jax Mesh to shard the candidates over (all its axes); default one device.

        Returns:
          (scores [Nq, k] float32 numpy, ids [Nq, k] numpy array of the stored ids), best first;
          equal scores are ordered by position in the index.
        """
        self._check_queries(queries, query_mask)
        r_q, r_c = resolve_budget(budget, np.shape(queries)[1], self.num_vectors)
        if not (isinstance(k, int | np.integer) and 1 <= k <= len(self)):
            raise ValueError(f"k must be an int in [1, {len(self)}] (index size), got {k!r}")
        mesh = _default_mesh() if mesh is None else mesh
        queries = _replicate(np.asarray(queries, np.float32), mesh)
        if query_mask is not None:
            query_mask = _replicate(np.asarray(query_mask, bool), mesh)
        if coarse_budget is None:
            values, positions = self._exhaustive(
                queries, query_mask, (r_q, r_c), k, mesh, chunk_size
            )
        else:
            coarse = resolve_budget(coarse_budget, queries.shape[1], self.num_vectors)
            size = min(int(shortlist), len(self))
            if size < k:
                raise ValueError(f"shortlist must be >= k={k}, got {shortlist!r}")
            _, candidates = self._exhaustive(queries, query_mask, coarse, size, mesh, chunk_size)
            values, positions = self._rerank(queries, query_mask, (r_q, r_c), k, candidates, mesh)
        positions = np.clip(np.asarray(positions), 0, len(self) - 1)
        return np.asarray(values, np.float32), self._ids_array()[positions]

    def _ids_array(self) -> np.ndarray:
        """The ids as one numpy array (int64 if all ints, else object), cached until `add`."""
        if self._ids_cache is None:
            all_ints = all(isinstance(i, int) for i in self._ids)
            self._ids_cache = np.asarray(self._ids, np.int64 if all_ints else object)
        return self._ids_cache

    def _merged_over_blocks(self, mesh, k, search_block):
        """``search_block(vectors, scales, offset, limit) -> (values, positions)`` on every placed
        block, the per-block top-k lists merged in position order (ties: lower position)."""
        best = None
        for offset, vectors, scales, limit in self._device_blocks(mesh):
            found = search_block(vectors, scales, jnp.int32(offset), jnp.int32(limit))
            best = found if best is None else _merge_pairs(best, found, k)
        return best

    def _exhaustive(self, queries, query_mask, budget, k, mesh, chunk_size):
        r_q, r_c = budget

        def search_block(vectors, scales, offset, limit):
            n_local = vectors.shape[0] // mesh.devices.size
            chunk = chunk_size or default_chunk_size(
                queries.shape[0] * r_q, r_c, n_local, self.dim, vectors.dtype.itemsize
            )
            search = _exhaustive_fn(
                mesh,
                r_q,
                r_c,
                min(k, vectors.shape[0]),
                min(chunk, n_local),
                scales is not None,
                query_mask is not None,
            )
            return search(queries, query_mask, vectors, scales, offset, limit)

        return self._merged_over_blocks(mesh, k, search_block)

    def _rerank(self, queries, query_mask, budget, k, shortlist, mesh):
        def rerank_block(vectors, scales, offset, limit):
            rerank = _rerank_fn(mesh, *budget, k, scales is not None, query_mask is not None)
            return rerank(queries, query_mask, vectors, scales, offset, limit, shortlist)

        return self._merged_over_blocks(mesh, k, rerank_block)


def _merge_pairs(first, second, k):
    """Merge two (values, positions) top lists; ``first`` holds the lower positions."""
    values = jnp.concatenate([first[0], second[0]], axis=1)
    positions = jnp.concatenate([first[1], second[1]], axis=1)
    return _merge(values, positions, min(k, values.shape[1]))


def _host_rows(blocks: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the concatenation of ``blocks``; rows past the end are zeros."""
    pieces, offset = [], 0
    for block in blocks:
        low, high = max(start - offset, 0), min(stop - offset, block.shape[0])
        if low < high:
            pieces.append(np.asarray(block[low:high]))
        offset += block.shape[0]
    missing = (stop - start) - sum(piece.shape[0] for piece in pieces)
    if missing:
        pieces.append(np.zeros((missing, *blocks[0].shape[1:]), blocks[0].dtype))
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _place_rows(blocks: list[np.ndarray], rows: int, sharding: NamedSharding) -> jax.Array:
    """The concatenated ``blocks``, zero-padded to ``rows``, as one global array with
    ``sharding`` (split over the first axis). Only the rows of this process's devices are read
    from the host arrays (which may be memmaps)."""
    shape = (rows, *blocks[0].shape[1:])

    def fetch(index):
        start, stop, _ = index[0].indices(rows)
        return _host_rows(blocks, start, stop)

    return jax.make_array_from_callback(shape, sharding, fetch)


def _replicate(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds identically, replicated on all devices of
    ``mesh`` (which may span several processes)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, NamedSharding(mesh, P()), lambda i: array[i])
