"""docs/reference.md runs as written: its shell block (import-reference, index build and search,
export) and its Python block, on a tiny ColQwen2.5-style base and a reference-style adapter
placed at the paths the page names."""

import numpy as np
from PIL import Image

from tests.docs_snippets import code_blocks, run_metaembed_commands
from tests.reference_adapters import reference_adapter, tiny_qwen_base


def test_reference_page_runs_as_written(tmp_path, monkeypatch):
    base = tiny_qwen_base(tmp_path / "build", colqwen_dim=16)
    (tmp_path / "checkpoints").mkdir()
    base.rename(tmp_path / "checkpoints" / "colqwen2.5-base")
    base = tmp_path / "checkpoints" / "colqwen2.5-base"
    reference_adapter(base, tmp_path / "runs" / "reference-adapter", 80, projection_dim=16)
    (tmp_path / "pages").mkdir()
    for i, color in enumerate(((220, 20, 20), (20, 20, 220))):
        Image.new("RGB", (56, 56), color).save(tmp_path / "pages" / f"page{i}.png")
    monkeypatch.chdir(tmp_path)

    (shell,) = code_blocks("reference.md", "bash")
    run_metaembed_commands(shell)
    assert (tmp_path / "runs" / "reference-peft" / "adapter_model.safetensors").exists()

    (python,) = code_blocks("reference.md", "python")
    namespace = {}
    exec(compile(python, "docs/reference.md", "exec"), namespace)
    query = np.asarray(namespace["query"])
    assert query.shape == (1, 16, 16)  # R_q = 16, the adapter's projection of width 16
    np.testing.assert_allclose(np.linalg.norm(query, axis=-1), 1.0, rtol=1e-5)
