"""Test-session set-up: no network, 8 virtual CPU devices, full float32 matmul precision, and one
temporary directory for the session (removed at exit).

This runs before any test module imports jax's backend, so the device count takes effect.
"""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
