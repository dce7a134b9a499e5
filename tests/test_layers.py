"""The shape of the code: imports point down the layers, no cycles, no hidden imports, modules of a readable size.

docs/design.md draws the layers; this test holds the code to the picture, so that a change that climbs
back up (or hides an import inside a function to dodge a cycle) fails here rather than in review.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Bottom to top, as docs/design.md draws them: a module may import its own layer's modules (without a cycle) and
# the layers below, never the ones above.
LAYERS = [
    ["drzero", "drzero.config", "drzero.layout", "drzero.plan", "drzero.checks", "drzero.atomic", "drzero.records",
     "drzero.prompts"],
    ["drzero.models", "drzero.corpus"],
    ["drzero.rollout", "drzero.rewards", "drzero.retrieval", "drzero.data"],
    ["drzero.verl", "drzero.services", "drzero.cluster"],
    ["drzero.stages"],
    ["drzero.pipeline"],
    ["drzero.tools"],
    ["drzero.cli"],
    ["backends"],
]
MAX_LINES = 500
MAX_MODAL_LINES = 400  # backends/modal.py reads top to bottom like a modal-examples app


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("drzero", "backends"):
        for path in (REPO / top).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    best = max((prefix for layer in LAYERS for prefix in layer if module == prefix or module.startswith(prefix + ".")),
               key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def _ours(name: str) -> str | None:
    """The module of ours that ``name`` (an imported dotted name) lives in, if any."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in {_ours(n) for n in names if n.split(".")[0] in ("drzero", "backends")} - {None, module}:
            found.append((target, node.lineno, id(node) in inside))
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert all(_layer(module) >= 0 for module in MODULES)


def test_imports_point_down_the_layers():
    upward = [f"{module}:{line} imports {target}" for module, imports in GRAPH.items()
              for target, line, _ in imports if _layer(target) > _layer(module)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = {module: {target for target, _, _ in imports} for module, imports in GRAPH.items()}
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def _says_why(module: str, line: int) -> bool:
    """A lazy import says why on its own line or the one above: ``# lazy: <the heavy thing it keeps out>``."""
    lines = MODULES[module].read_text().splitlines()
    return any("# lazy:" in lines[i] for i in (line - 2, line - 1) if 0 <= i < len(lines))


def test_no_module_of_ours_is_imported_inside_a_function():
    """An import of our own code inside a function hides a cycle or a module in the wrong layer; the exception is a
    module that loads a heavy library (verl's trainer, the hf engine's workers) only one path needs."""
    hidden = [f"{module}:{line} imports {target}" for module, imports in GRAPH.items()
              for target, line, inner in imports if inner and not _says_why(module, line)]
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable(module):
    text = MODULES[module].read_text()
    limit = MAX_MODAL_LINES if module == "backends.modal" else MAX_LINES
    assert len(text.splitlines()) <= limit, f"{module} has {len(text.splitlines())} lines; split it by what it does"
    in_strings = {line for token in tokenize.generate_tokens(io.StringIO(text).readline)
                  if token.type == tokenize.STRING for line in range(token.start[0], token.end[0] + 1)}
    continued = [number for number, line in enumerate(text.splitlines(), 1)
                 if line.rstrip().endswith("\\") and number not in in_strings and not line.lstrip().startswith("#")]
    assert not continued, f"{module}: line continuations with a backslash on lines {continued}; use brackets"
