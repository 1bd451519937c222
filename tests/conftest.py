"""Test-session set-up: no network, 8 virtual CPU devices, full float32 matmul precision, and one
temporary directory for the session (removed at exit).

This runs before any test module imports jax's backend, so the device count takes effect.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile

# libtpu (installed with the test extras, for the TPU-compiler tests) never queries a metadata
# server, in this process or its subprocesses: the package's one table (metaembed_jax/tpu_env.py),
# read from its file so that nothing imports jax before the settings below. The CPU tests run on
# the CPU backend only, so they never load libtpu at all (`get_topology_desc` loads it for the
# TPU-compiler tests, also under JAX_PLATFORMS=cpu).
_TPU_ENV_SPEC = importlib.util.spec_from_file_location(
    "_tpu_env", os.path.join(os.path.dirname(__file__), "..", "metaembed_jax", "tpu_env.py")
)
_tpu_env = importlib.util.module_from_spec(_TPU_ENV_SPEC)
_TPU_ENV_SPEC.loader.exec_module(_tpu_env)
_tpu_env.set_offline_tpu_env()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent compilation cache for the whole run: the xdist workers, and the train.py / two-
# process subprocesses (through the environment). Many tests compile the same tiny programs (the
# module-end `jax.clear_caches()` below drops the in-memory ones; subprocess runs start cold):
# reloading them cut test_faults + test_training from 295 s to 219 s. Removed by the controller at
# the end (`pytest_sessionfinish`); the cache cannot change results (same HLO, same executable).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # False in xdist workers: inherited
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"metaembed-jax-cache-{os.getpid()}"
    )
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# XLA_FLAGS of the test session, inherited by its subprocesses (train.py, eval.py, two-process
# runs); it replaces any inherited value (a device-count flag there would change what the tests
# see). LLVM's optimisation of the generated CPU code is most of each compile, and the suite
# compiles hundreds of tiny programs to run each a few times: level 0 cut the grad-cache file's
# one-shot-vs-cached tests from 144 s to 92 s. It changes how the machine code is optimised, not
# the HLO programs the tests compare.
os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"

# Every layer stack scanned, also the tiny test models' 2-layer ones (which users' demo runs
# unroll for speed): ~35% less XLA compile time, the suite's main cost. Both paths are equal
# (tests/test_attention.py checks the unrolled one against a Python loop).
os.environ.setdefault("METAEMBED_UNROLL_MAX_LAYERS", "0")

# tensorflow-datasets leaves an empty `tmp*tfds` directory per builder in the temp dir; keeping
# every temporary file of the session (and of its subprocesses, through TMPDIR) under one
# directory removed at exit leaves nothing behind.
_SESSION_TMP = tempfile.mkdtemp(prefix="metaembed-tests-")
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = _SESSION_TMP
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes",
    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)


import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def run_two_processes(tmp_path):
    """Runs `script` (Python source) as two real processes on 127.0.0.1, each called as
    `script PORT PROCESS_ID *args`, and fails the test, with the output's tail, unless both
    exit 0. The script itself calls `jax.distributed.initialize` with that port and id."""

    def run(script: str, *args, timeout: float = 600) -> None:
        path = tmp_path / "process.py"
        path.write_text(textwrap.dedent(script))
        env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
        port = str(_free_port())
        command = [sys.executable, str(path), port]
        procs = [
            subprocess.Popen(
                [*command, str(i), *map(str, args)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        for proc in procs:
            output = proc.communicate(timeout=timeout)[0]
            assert proc.returncode == 0, output[-3000:]

    return run


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs_after_each_module():
    """Drops jax's compiled programs and traces after each test file: a worker runs hundreds of
    tests, and the XLA CPU compiler crashed (segfault) late in a run that kept them all."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


def pytest_sessionfinish(session):
    """The controller (or a run without xdist) removes the shared compilation cache."""
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
