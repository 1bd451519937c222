"""README.md and the docs run as written, and their links resolve.

Every fenced block of README.md, docs/*.md, docs/experiments/*.md and the family READMEs
(metaembed_jax/models/*/README.md) is classified by its fence:

- ```python blocks run, in page order, in one namespace per page;
- ```bash blocks hold only `metaembed ...` commands and run in process (`cli.main.main`), in
  page order among the python blocks;
- ```console blocks are shown, not run: they install (`pip install`, `make test`), train the
  demo recipe or a full recipe (`make demo`, `train.py`, `eval.py`, `metaembed data` on a
  recipe's full dataset), need a cluster (multi-host) or a run this test does not have (a LoRA
  run trained from a checkpoint, for `--format peft`), run benchmarks, or spell options as
  `[--flag]`;
- ```text blocks are output (tables, trees), not commands.

A page runs in a fresh working directory holding the paths its snippets name: `runs/demo` (the
tiny trained LoRA run of tests/trained_run.py, R_q = 4, R_c = 8, which is why the docs' budgets
stay within (4, 8)), `checkpoints/Qwen2.5-VL-3B-Instruct` (a tiny random Qwen2.5-VL with the
test tokenizer), `my_pages/` (generated PNGs) and `configs/` (the repository's recipes). After a
page has run, what its snippets computed is checked against a reference (MaxSim written out in
numpy, the retriever's own encoders, hand-computed metrics).

Pages and sections run by other tests are not run here: docs/reference.md
(tests/formats/test_docs_reference.py), docs/serving.md (tests/retrieval/test_qdrant_index.py),
and docs/use.md's "Use our model from PyTorch" (tests/formats/test_use_from_pytorch.py, where
that section exists). docs/tpu.md compiles for TPU topologies with libtpu; its blocks are not
run here either.

Links: every relative markdown link of those pages (and of reference.md / serving.md / tpu.md)
names an existing file, and an anchor names a heading of its page; every repository path in a
code span (`tests/...`, `metaembed_jax/...`, `configs/...`, `benchmarks/...`, `docs/...`)
exists.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.docs_snippets import (
    REPO,
    fenced_blocks,
    heading_anchors,
    page_path,
    relative_links,
    run_metaembed_commands,
)
from tests.reference_adapters import tiny_qwen_base
from tests.trained_run import trained_lora_run

PAGES = sorted(
    [Path("README.md")]
    + [p.relative_to(REPO) for p in (REPO / "docs").glob("*.md")]
    + [p.relative_to(REPO) for p in (REPO / "docs" / "experiments").glob("*.md")]
    + [p.relative_to(REPO) for p in (REPO / "metaembed_jax" / "models").glob("*/README.md")]
)
RUN_ELSEWHERE = {
    Path("docs/reference.md"): "tests/formats/test_docs_reference.py",
    Path("docs/serving.md"): "tests/retrieval/test_qdrant_index.py",
    Path("docs/tpu.md"): "compiles for TPU topologies with libtpu",
}
SECTIONS_RUN_ELSEWHERE = {
    Path("docs/use.md"): {
        "Use our model from PyTorch",
        "Without the helper: what transformers needs",
    }
}
SHOWN_ONLY = {"console", "text"}
SNIPPET_PAGES = [page for page in PAGES if page not in RUN_ELSEWHERE]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """What the pages' snippets read, built once: the trained run and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("docs_artefacts")
    return {
        "run": trained_lora_run(tmp_path_factory),
        "checkpoint": tiny_qwen_base(root / "checkpoint"),
    }


def page_workdir(root: Path, artefacts: dict) -> Path:
    """A working directory holding every path the pages' snippets name."""
    shutil.copytree(artefacts["run"], root / "runs" / "demo")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "Qwen2.5-VL-3B-Instruct").symlink_to(artefacts["checkpoint"])
    (root / "configs").symlink_to(REPO / "configs")
    (root / "my_pages").mkdir()
    for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220)), ("green", (20, 200, 20))):
        Image.new("RGB", (56, 56), colour).save(root / "my_pages" / f"{name}.png")
    return root


def run_page(page: Path) -> list[dict]:
    """Run a page's python and bash blocks in order; returns the python blocks' namespace as it
    was after each python block (later blocks may reuse a name)."""
    namespace: dict = {"__name__": "docs_snippet"}
    after_each = []
    skipped_sections = SECTIONS_RUN_ELSEWHERE.get(page, set())
    for block in fenced_blocks(page):
        assert block.language in SHOWN_ONLY | {"python", "bash"}, (
            f"{page}:{block.line}: fence {block.language!r}; expected python, bash (run), "
            f"console or text (shown)"
        )
        if block.section in skipped_sections or block.language in SHOWN_ONLY:
            continue
        if block.language == "python":
            exec(compile(block.text, f"{page}:{block.line}", "exec"), namespace)  # noqa: S102
            after_each.append(dict(namespace))
        else:
            run_metaembed_commands(block.text)
    return after_each


def maxsim_numpy(queries, candidates, r_q: int, r_c: int) -> np.ndarray:
    """sum over the first r_q query vectors of the max over the first r_c candidate vectors."""
    q = np.asarray(queries, np.float32)[:, :r_q]
    c = np.asarray(candidates, np.float32)[:, :r_c]
    return np.einsum("qid,cjd->qcij", q, c).max(-1).sum(-1)


def check_readme(blocks: list[dict], workdir: Path) -> None:
    """The quick start's search equals MaxSim of the retriever's own encodings; the CLI wrote
    the index and the export."""
    from metaembed_jax.retrieval.index import MultiVectorIndex

    done = blocks[-1]
    retriever = done["retriever"]
    documents = retriever.encode_documents(done["scenes"])
    scores = maxsim_numpy(done["queries"], documents, 4, 8)[0]
    want = dict(zip(["red", "blue"], scores, strict=True))
    hits = retriever.search(["a red square"], done["index"], budget=(4, 8), k=2)[0]
    assert sorted(doc_id for doc_id, _ in hits) == ["blue", "red"]
    for doc_id, score in hits:  # the index stores bfloat16 vectors
        assert score == pytest.approx(want[doc_id], abs=2e-2)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert MultiVectorIndex.load(workdir / "scenes.index").ids == ["red", "blue"]
    assert len(MultiVectorIndex.load(workdir / "my_pages.index").ids) == 3
    assert (workdir / "exported" / "metaembed.safetensors").is_file()


def check_retrieval(blocks: list[dict], workdir: Path) -> None:
    """The scoring block's last score matrix and the int8 + rescore search equal MaxSim in
    numpy on the float32 vectors."""
    embedded, scored, done = blocks
    q, c, cm = scored["q"], scored["c"], scored["cm"]
    similarities = np.einsum("qid,cjd->qcij", q, c)
    want = np.where(cm[None, :, None, :], similarities, -np.inf).max(-1).sum(-1)  # masked: no max
    np.testing.assert_allclose(np.asarray(scored["s"]), want, rtol=1e-5, atol=1e-5)
    q, c = done["q"], done["c"]
    exact = maxsim_numpy(q, c, 16, 64)
    order = np.argsort(-exact, axis=1)[:, :10]
    assert [list(row) for row in done["ids"]] == [[f"doc{i}" for i in row] for row in order]
    np.testing.assert_allclose(
        np.asarray(done["scores"]), np.take_along_axis(exact, order, 1), atol=1e-4
    )
    assert (workdir / "my_index" / "manifest.json").is_file()
    first = np.asarray(embedded["docs"])
    assert first.shape[:2] == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(first, axis=-1), 1.0, rtol=1e-3)


def check_use(blocks: list[dict], workdir: Path) -> None:
    """load_trained's query embedding is the retriever's; the hf export was written."""
    done = blocks[-1]
    query = np.asarray(done["query"])
    assert query.shape[:2] == (1, 4)
    np.testing.assert_allclose(np.linalg.norm(query, axis=-1), 1.0, rtol=1e-5)
    cube = done["retriever"].encode_queries(["a red cube"])
    np.testing.assert_allclose(np.asarray(cube), query, atol=1e-4)
    assert np.asarray(done["documents"]).shape[:2] == (1, 8)
    assert {doc_id for doc_id, _ in done["hits"][0]} == {"a", "b"}
    if (workdir / "exported").exists():  # the export block of this branch's page
        assert (workdir / "exported" / "metaembed_config.json").is_file()


def check_data(blocks: list[dict], workdir: Path) -> None:
    """A global batch of 8 on the mesh, each side the family's features."""
    (done,) = blocks
    batch = done["batch"]
    assert {"query", "positive"} <= set(batch)
    for side in batch.values():
        assert set(side) <= set(done["family"].feature_keys)
        assert side["input_ids"].shape[0] == 8
    assert done["state"] is not None


def check_evaluation(blocks: list[dict], workdir: Path) -> None:
    """nDCG@5 by hand: q1 ranks d1 d2 d3 (relevant d1, d3): (1 + 1/2) / (1 + 1/log2 3); q2's
    tie goes to the higher document id, d2, the relevant one: 1."""
    (done,) = blocks
    q1 = 1.5 / (1 + 1 / np.log2(3))
    assert done["ndcg_at_k"](done["qrels"], done["run"], k=5) == pytest.approx((q1 + 1.0) / 2)


CHECKS = {
    Path("README.md"): check_readme,
    Path("docs/retrieval.md"): check_retrieval,
    Path("docs/use.md"): check_use,
    Path("docs/data.md"): check_data,
    Path("docs/evaluation.md"): check_evaluation,
}


@pytest.mark.parametrize("page", SNIPPET_PAGES, ids=str)
def test_page_runs_as_written(page, artefacts, tmp_path, monkeypatch):
    """Every python / bash block of the page runs in order; then what it computed is checked."""
    workdir = page_workdir(tmp_path, artefacts)
    monkeypatch.chdir(workdir)
    blocks = run_page(page)
    if page in CHECKS:
        CHECKS[page](blocks, workdir)


def test_pages_with_snippets_have_checks():
    """A page whose python blocks run is also checked (or has nothing to check: its blocks
    assert themselves, as design.md's family outline does)."""
    asserting_themselves = {Path("docs/design.md")}
    for page in SNIPPET_PAGES:
        if any(b.language == "python" for b in fenced_blocks(page)):
            assert page in CHECKS or page in asserting_themselves, page


CODE_PATH = re.compile(r"`((?:tests|metaembed_jax|configs|benchmarks|docs)/[\w./*-]*)(?::\w+)?`")


@pytest.mark.parametrize("page", PAGES, ids=str)
def test_links_and_paths_resolve(page):
    """Relative links name existing files (and anchors existing headings); repository paths
    in code spans exist."""
    path = page_path(page)
    problems = []
    for target, anchor in relative_links(path):
        linked = (path.parent / target).resolve() if target else path
        if not linked.exists():
            problems.append(f"link to {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            problems.append(f"link to {target}#{anchor}: no such heading")
    text = path.read_text(encoding="utf-8")
    for repo_path in CODE_PATH.findall(text):
        if not any(REPO.glob(repo_path.rstrip("/"))):
            problems.append(f"code span {repo_path}: no such path in the repository")
    assert not problems, f"{page}: " + "; ".join(problems)
