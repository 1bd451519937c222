"""The package's layers, read from its imports (ast): each layer imports only from those before
it, no module imports itself back through others, no module imports another module's `_private`
name or a private module of another package, and no module defers an import of the package to a
function body (layering makes such deferred imports unnecessary; the console script excepted)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metaembed_jax"

# sharding (and tpu_env, libtpu's offline settings) -> models/ -> the method -> data/ ->
# training/ -> run directories and foreign formats -> retrieval/ -> evaluation/ -> cli/; the
# package's __init__ / __main__ sit on top.
LAYERS = (
    ("sharding", "tpu_env"),
    ("models",),
    ("metaembed", "losses", "scoring"),
    ("data",),
    ("training",),
    ("formats",),
    ("retrieval",),
    ("evaluation",),
    ("cli",),
    ("__init__", "__main__"),
)
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(tree: ast.Module):
    """(target module, imported name or None, inside a function) of every package import."""
    functions = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
    }
    for node in ast.walk(tree):
        deferred = id(node) in functions
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("metaembed_jax"):
                    yield alias.name, None, deferred
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("metaembed_jax"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if _exists(submodule):
                    yield submodule, None, deferred
                else:
                    yield node.module, alias.name, deferred


def _graph() -> dict[str, list[tuple[str, str | None, bool]]]:
    return {
        _module_name(path): list(_imports(ast.parse(path.read_text(encoding="utf-8"))))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYER_OF["__init__"]
    return LAYER_OF[parts[1]]


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in _graph() if m.count(".") and m.split(".")[1] not in LAYER_OF]
    assert not unplaced, f"modules outside the layers {LAYERS}: {unplaced}"


def test_imports_follow_the_layers():
    against = [
        f"{source} (layer {_layer(source)}) imports {target} (layer {_layer(target)})"
        for source, imports in _graph().items()
        for target, _, _ in imports
        if _layer(target) > _layer(source)
    ]
    assert not against, "imports against the layering:\n" + "\n".join(against)


def test_no_import_circles():
    graph = {m: sorted({t for t, _, _ in imports if t != m}) for m, imports in _graph().items()}
    circles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in graph.get(module, []):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_private_names_across_modules():
    private = []
    for source, imports in _graph().items():
        for target, name, _ in imports:
            if name is not None and name.startswith("_") and target != source:
                private.append(f"{source} imports {target}.{name}")
            last = target.rsplit(".", 1)
            if last[-1].startswith("_") and not source.startswith(last[0] + "."):
                private.append(f"{source} imports the private module {target}")
    assert not private, "private names imported from other modules:\n" + "\n".join(private)


# The console script defers its commands' imports: `metaembed --help` or `metaembed configs`
# answers at once instead of loading JAX, and a long command prints before the model loads.
MAY_DEFER = ("metaembed_jax.cli.main",)


def test_no_deferred_imports_of_the_package():
    deferred = [
        f"{source} imports {target} inside a function"
        for source, imports in _graph().items()
        for target, _, inside in imports
        if inside and source not in MAY_DEFER
    ]
    assert not deferred, "\n".join(deferred)
