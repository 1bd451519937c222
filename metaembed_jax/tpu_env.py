"""libtpu's environment, in one place: it never contacts the network from a machine without a TPU.

With `jax[tpu]` installed, libtpu is loaded by jax's TPU plugin (`jax.devices()` without
`JAX_PLATFORMS=cpu`) and by the TPU compiler of `jax.experimental.topologies.get_topology_desc`
(`metaembed compile`). Unless told otherwise, libtpu asks a cloud metadata server which TPU it
runs on and who its peer hosts are. `TPU_SKIP_MDS_QUERY=1` skips that query,
`TPU_WORKER_HOSTNAMES=localhost` names this host as the only worker, and `TPU_ACCELERATOR_TYPE`
(e.g. `v5p-8`) names the chip, so libtpu asks nothing. libtpu reads them when it loads, so
`set_offline_tpu_env` runs before jax can load it: at the top of `metaembed_jax/__init__.py`
(every entry point imports the package first) and in `metaembed compile` before it builds a
topology.

Values already in the environment are kept (`setdefault`). On a real multi-host TPU slice the
runtime needs its metadata server: set `METAEMBED_TPU_METADATA=1` there and nothing is set.
This module imports nothing but `os` and `re`, so it is safe to import before jax.
"""

from __future__ import annotations

import os
import re

OFFLINE_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost"}
COMPILE_ONLY_ENV = "ALLOW_MULTIPLE_LIBTPU_LOAD"
# "1" lets libtpu query its metadata server (a real TPU VM of a multi-host slice).
METADATA_OPT_IN = "METAEMBED_TPU_METADATA"

# Topology-name prefix -> (accelerator-type prefix, TensorCores per chip): Cloud TPU names a
# v4 / v5p slice by its TensorCores (2 a chip; v5p-8 = 4 chips), v5e / v6e by its chips.
_ACCELERATOR_NAMES = {
    "v4": ("v4", 2),
    "v5p": ("v5p", 2),
    "v5e": ("v5litepod", 1),
    "v6e": ("v6e", 1),
}


def accelerator_type(topology: str) -> str:
    """`TPU_ACCELERATOR_TYPE` of a topology name: "v5p:2x2x1" -> "v5p-8", "v6e:4x4" -> "v6e-16".

    Raises ValueError for a name that is not `<v4|v5p|v5e|v6e>:AxB[xC]`.
    """
    match = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", topology.strip())
    if match is None:
        raise ValueError(
            f"TPU topology {topology!r}: expected <v4|v5p|v5e|v6e>:AxB[xC], e.g. v5p:2x2x1"
        )
    prefix, cores_per_chip = _ACCELERATOR_NAMES[match.group(1)]
    chips = 1
    for size in match.group(2).split("x"):
        chips *= int(size)
    return f"{prefix}-{chips * cores_per_chip}"


def set_offline_tpu_env(topology: str | None = None) -> dict[str, str]:
    """Set libtpu's no-network variables (`OFFLINE_ENV`, and `TPU_ACCELERATOR_TYPE` of
    `topology` when given, with `ALLOW_MULTIPLE_LIBTPU_LOAD=1` for a compile without chips)
    where the environment has none; returns the values in force.

    Call before jax loads libtpu. Does nothing when `METAEMBED_TPU_METADATA=1`.
    """
    if os.environ.get(METADATA_OPT_IN) == "1":
        return {}
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    if topology is not None:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topology))
        # The compiler alone claims no chip, so two compiles may load libtpu at once: its
        # lockfile (/tmp/libtpu_lockfile) guards chips and would refuse the second.
        os.environ.setdefault(COMPILE_ONLY_ENV, "1")
    names = (*OFFLINE_ENV, "TPU_ACCELERATOR_TYPE", COMPILE_ONLY_ENV)
    return {name: os.environ[name] for name in names if name in os.environ}
