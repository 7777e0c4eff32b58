"""The repository's layering (issue 22 item 4; docs/ARCHITECTURE.md): imports point down the layers and no
module is part of an import cycle. Read from the source with ``ast``; nothing is imported.

Every ``import`` statement counts, at module level and inside functions alike: a function-level
import defers the cost of loading a module, not the dependency, and a circle of deferred imports
is still a circle a reader has to follow. Only imports under ``if TYPE_CHECKING:`` are left out:
they never run (names for annotations).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jam_metaseq", "checkpoints_tools", "launch")

# Bottom to top. A module may import its own layer's modules (no cycles) and any lower layer's.
# A module belongs to the longest prefix listed; command-line front ends (``*.cli``, ``*_cli``,
# ``__main__``) sit on top whatever their package. (``vocab_rows`` and ``serve`` arrive with issue 25.)
LAYERS: tuple[tuple[str, ...], ...] = (
    # words every module uses: errors, untrusted-input checks and the vocabulary manifest
    ("jam_metaseq.errors", "jam_metaseq.inputs", "jam_metaseq.vocab"),
    # the core: architectures, fusion math, objectives, the flag table, the data format and packing
    ("jam_metaseq.models", "jam_metaseq.fusion", "jam_metaseq.objectives", "jam_metaseq.flags", "jam_metaseq.data",
     "jam_metaseq.vocab_rows", "jam_metaseq.vocab_transplant"),
    # checkpoint readers, writers and operations, above the core
    ("checkpoints_tools",),
    # what reads checkpoints: the image tokenizer, then retrieval (which encodes images), then the
    # training task (which prefixes retrieved documents), evaluation, generation, the built-in data
    # and the SLURM launcher's library
    ("jam_metaseq.image_tokenizer",),
    ("jam_metaseq.retrieval",),
    ("jam_metaseq.task", "jam_metaseq.eval", "jam_metaseq.generation", "jam_metaseq.quickstart_data", "launch"),
    # on top: the host adapters, the pipeline behind jam run / jam quickstart, jam serve, every command line
    ("jam_metaseq.hosts", "jam_metaseq.pipeline", "jam_metaseq.quickstart", "jam_metaseq.cli", "jam_metaseq.serve"),
)
TOP = len(LAYERS) - 1

ALLOWED: dict[tuple[str, str], str] = {}
"""Known upward imports, each with the reason it is still there: (importing module or package,
imported module)."""


def _allowed(a: str, b: str) -> bool:
    return any(b == imported and (a == importer or a.startswith(importer + "."))
               for importer, imported in ALLOWED)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if test is not None and ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _imports(name: str, path: Path) -> set[str]:
    """The repository modules ``name`` imports (a ``from package import module`` names the module)."""
    found = set()
    for node in _nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != name:
                found.add(t)
    return found


# The package roots are left out: Python runs a package's __init__ before any of its modules, and
# jam_metaseq's __init__ is the --user-dir entry point (it registers with the hosts imported).
GRAPH = {m: {t for t in _imports(m, p) if t not in PACKAGES} for m, p in MODULES.items() if m not in PACKAGES}


def layer(module: str) -> int:
    last = module.rsplit(".", 1)[-1]
    if last in ("cli", "__main__") or last.endswith("_cli"):
        return TOP
    best, level = "", None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, level = prefix, i
    if level is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return level


def test_every_module_has_a_layer():
    for m in GRAPH:
        layer(m)


def test_imports_point_down():
    wrong = sorted(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
                   for a, bs in GRAPH.items() for b in bs if layer(b) > layer(a) and not _allowed(a, b))
    assert not wrong, "\n".join(wrong)
    stale = [(importer, imported) for importer, imported in ALLOWED
             if not any(imported in bs and (a == importer or a.startswith(importer + "."))
                        for a, bs in GRAPH.items())]
    assert not stale, f"allowed imports that no longer exist (delete them from ALLOWED): {stale}"


def test_no_import_cycles():
    """Tarjan's strongly connected components: a component of more than one module is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # iterative-enough: the graph is shallow (a few hundred modules)
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("module,expected", [
    ("jam_metaseq.models.config", 1), ("checkpoints_tools.load", 2), ("jam_metaseq.data.cli", TOP),
    ("jam_metaseq.pipeline.run", TOP), ("launch.slurm", 5),
])
def test_layer_of(module, expected):
    assert layer(module) == expected
