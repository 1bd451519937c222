"""The TPU compiler without a TPU (`metaembed compile`, metaembed_jax/cli/compile.py): libtpu's
no-network environment is set before libtpu loads, the demo model's sharded train step with
Pallas attention compiles for a TPU topology within stated memory bounds, and the command's
exit codes say fits / does not fit / failed.

libtpu (jax[tpu], pinned in requirements-test.txt) is loaded only in subprocesses, so the rest
of the suite's processes never load it. These tests are not skipped when it is missing: they
fail, since the test extras always install it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from metaembed_jax import tpu_env
from metaembed_jax.metaembed import MetaEmbed
from metaembed_jax.models.published import PUBLISHED_CONFIGS
from tests.paths import REPO as REPO_PATH

REPO = str(REPO_PATH)
TPU_VARIABLES = (*tpu_env.OFFLINE_ENV, "TPU_ACCELERATOR_TYPE", tpu_env.COMPILE_ONLY_ENV)


def _environment(clean_tpu_env: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    if clean_tpu_env:
        for name in TPU_VARIABLES:
            env.pop(name, None)
    return env


def _run(code: str, *, clean_tpu_env: bool = True, timeout: float = 600):
    """Python `code` in a fresh process (PYTHONPATH = the repository; CPU jax), TPU variables
    removed from its environment unless `clean_tpu_env` is False."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=_environment(clean_tpu_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_accelerator_type_names():
    """Cloud TPU names v4 / v5p slices by TensorCores (2 a chip), v5e / v6e by chips."""
    assert tpu_env.accelerator_type("v5p:2x2x1") == "v5p-8"
    assert tpu_env.accelerator_type("v5p:4x4x4") == "v5p-128"
    assert tpu_env.accelerator_type("v5e:2x2") == "v5litepod-4"
    assert tpu_env.accelerator_type("v6e:8x8") == "v6e-64"
    with pytest.raises(ValueError, match="expected"):
        tpu_env.accelerator_type("v5p-8")


def test_package_sets_the_offline_env_before_libtpu_loads():
    """Importing the package sets TPU_SKIP_MDS_QUERY / TPU_WORKER_HOSTNAMES while libtpu is not
    yet in the process; the TPU compiler then loads libtpu (with them in force) and names the
    topology's chips."""
    result = _run(
        """
        import os
        import metaembed_jax
        maps = lambda: open("/proc/self/maps").read()
        assert os.environ["TPU_SKIP_MDS_QUERY"] == "1", os.environ.get("TPU_SKIP_MDS_QUERY")
        assert os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"
        assert "libtpu" not in maps(), "libtpu loaded by the import"
        from metaembed_jax.cli import compile as tpu_compile
        devices = tpu_compile.tpu_devices("v5e:2x2")
        assert "libtpu" in maps(), "the TPU compiler did not load libtpu"
        assert os.environ["TPU_ACCELERATOR_TYPE"] == "v5litepod-4"
        print(len(devices), devices[0].platform)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["4", "tpu"]


def test_two_compiles_load_libtpu_at_once():
    """A compile claims no chip: a second process builds a topology while the first holds
    libtpu (without ALLOW_MULTIPLE_LIBTPU_LOAD, libtpu's lockfile refuses the second)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
            import sys
            from metaembed_jax.cli import compile as tpu_compile
            tpu_compile.tpu_devices("v5e:2x2")
            print("loaded", flush=True)
            sys.stdin.read()  # hold libtpu until the test closes stdin
            """
            ),
        ],
        env=_environment(clean_tpu_env=True),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "loaded"
        second = _run(
            """
            from metaembed_jax.cli import compile as tpu_compile
            print(len(tpu_compile.tpu_devices("v5e:2x2")))
            """
        )
        assert second.returncode == 0, second.stderr[-3000:]
        assert second.stdout.split() == ["4"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_entry_point_sets_the_env_before_jax_is_imported():
    """The `metaembed` entry point's module sets the variables before anything imports jax:
    an import hook records the environment at jax's first import."""
    result = _run(
        """
        import os, sys
        seen = {}

        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name == "jax" and not seen:
                    seen.update({k: os.environ.get(k) for k in ("TPU_SKIP_MDS_QUERY",
                                                                "TPU_WORKER_HOSTNAMES")})
                return None

        sys.meta_path.insert(0, Watch())
        import metaembed_jax.cli.main
        print(seen)
        assert seen == {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost"}, seen
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_opt_in_to_the_metadata_server_sets_nothing():
    """`METAEMBED_TPU_METADATA=1` (a real multi-host TPU slice) leaves the environment as it is.
    (jax itself sets TPU_SKIP_MDS_QUERY on a host without TPU chips, so only the worker list is
    checked.)"""
    result = _run(
        """
        import os
        os.environ["METAEMBED_TPU_METADATA"] = "1"
        import metaembed_jax
        print("TPU_WORKER_HOSTNAMES" in os.environ, "TPU_ACCELERATOR_TYPE" in os.environ)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_published_configs_build_models_of_the_published_size(name):
    """Each published config builds (abstractly) a backbone of the size its checkpoint states:
    the published total less an untied LM head, which MetaEmbed does not build."""
    billions = {  # published parameter counts (model cards), LM head excluded where untied
        "Qwen2.5-VL-3B-Instruct": 3.75,
        "Qwen2.5-VL-7B-Instruct": 8.29 - 152064 * 3584 / 1e9,
        "Qwen2.5-VL-32B-Instruct": 33.45 - 152064 * 5120 / 1e9,
        "paligemma-3b-pt-224": 2.92,
        "paligemma2-3b-pt-224": 3.03,
        "Llama-3.2-11B-Vision-Instruct": 10.67 - 128256 * 4096 / 1e9,
    }[name]
    model = nnx.eval_shape(lambda: MetaEmbed.from_config(PUBLISHED_CONFIGS[name], rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(count / 1e9 - billions) < 0.02 * billions, (name, count)


# The demo's train step (batch 32 at 64 tokens + 80 meta tokens, widths 128 / 64) holds about
# 0.2-0.3 GiB a chip: far below this bound, which a step that kept a copy of every layer's
# activations per micro-batch or replicated its batch over the mesh would still stay under only
# for a model this small; the lower bound is the parameters' own share.
DEMO_STEP_BOUND = 1 << 30


def test_demo_train_step_with_pallas_compiles_for_a_tpu_mesh():
    """The tiny demo model's train step on a 2 x 2 (data x fsdp) mesh of v5p:2x2x1 with
    `attention_impl="pallas"` compiles with the TPU compiler: the Mosaic kernel is in the
    program (under shard_map, which XLA requires), and the per-chip bytes lie between the
    parameters' share of a chip and DEMO_STEP_BOUND."""
    result = _run(
        """
        import json
        import numpy as np, jax
        from metaembed_jax.cli import compile as tpu_compile
        from metaembed_jax.training.recipes import load_recipe
        config = load_recipe("configs/demo.py")
        config.mesh.data, config.mesh.fsdp = 2, 2
        config.model.attention_impl = "pallas"
        devices = tpu_compile.tpu_devices("v5p:2x2x1")
        mesh = tpu_compile.topology_mesh(config.mesh, devices)
        hf = tpu_compile.recipe_hf_config(config)
        _, params, frozen, _ = tpu_compile.abstract_model_state(config, hf, mesh)
        share = sum(
            int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
            for x in jax.tree.leaves((params, frozen))
        )
        texts = []
        original = tpu_compile._measure
        def keep_text(lower, hbm):
            texts.append(lower().compile().as_text())
            return original(lower, hbm)
        tpu_compile._measure = keep_text
        report = tpu_compile.compile_recipe(config, "v5p:2x2x1", parts=("train",))
        report["param_share"] = share
        report["mosaic"] = texts[0].count('custom_call_target="tpu_custom_call"')
        print(json.dumps(report))
        """,
        clean_tpu_env=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["compiled"] and report["chips"] == 4
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert report["mosaic"] >= 2  # forward and backward flash kernels of the decoder
    assert report["param_share"] < report["per_chip_bytes"] < DEMO_STEP_BOUND
    assert report["fits"] and report["flops_per_step"] >= report["cost_analysis_flops"] > 0


def _compile_cli(*flags: str):
    """`metaembed compile FLAGS` as a command line (absl reads the config overrides there)."""
    return subprocess.run(
        [sys.executable, "-m", "metaembed_jax", "compile", *flags],
        env=_environment(clean_tpu_env=False),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def test_compile_command_exit_codes():
    """`metaembed compile --json`: 0 when the program compiled and fits, 3 when it does not fit
    (compiled over a 1 MiB HBM, or refused by the TPU compiler for HBM), 1 with the error
    printed when it cannot be built (a mesh the topology's 4 chips cannot hold). The index
    search alone keeps the compiles short."""
    common = ("--config", "demo", "--topology", "v5e:2x2", "--json")
    index = ("--parts", "index", "--index-size", "4096")
    fits = _compile_cli(*common, *index)
    assert fits.returncode == 0, fits.stderr[-3000:]
    report = json.loads(fits.stdout.strip().splitlines()[-1])
    assert report["compiled"] and report["fits"] and report["chips"] == 4
    stored = 4096 * 64 * 128 * 2 // 4  # bfloat16 vectors [R_c, n, D] split over 4 chips
    assert report["index"]["argument_bytes"] >= stored
    assert report["hbm_bytes"] == 16 * 2**30

    too_small = _compile_cli(*common, *index, "--hbm_gib=0.001")
    assert too_small.returncode == 3, too_small.stderr[-3000:]
    assert json.loads(too_small.stdout.strip().splitlines()[-1])["fits"] is False

    # 2e9 candidates: 7.6 TiB of search temporaries a chip, which the compiler refuses.
    refused = _compile_cli(*common, "--parts", "index", "--index-size", "2000000000")
    assert refused.returncode == 3, refused.stderr[-3000:]
    refusal = json.loads(refused.stdout.strip().splitlines()[-1])
    assert refusal["compiled"] is False and refusal["fits"] is False
    assert "RESOURCE_EXHAUSTED" in refusal["index"]["refused"]
    assert refusal["index"]["required_bytes"] > 7 * 2**40

    broken = _compile_cli(*common, *index, "--config.mesh.data=3")
    assert broken.returncode == 1, broken.stderr[-3000:]
    failure = json.loads(broken.stdout.strip().splitlines()[-1])
    assert failure["compiled"] is False and "devices" in failure["error"]
