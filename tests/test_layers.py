"""The package's layers (DESIGN.md; issue 10): a lower layer never imports a higher one, no
import circle among emdist's modules, and the numerics never import Dask."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "emdist"
NUMERICS = ["emdist.models.gmm", "emdist.models.kernel", "emdist.models.estep",
            "emdist.models.mstep", "emdist.models.stats", "emdist.models.gselect",
            "emdist.models.initialize", "emdist.models.kind", "emdist.models.gmm_kind",
            "emdist.models.hmm", "emdist.models.hmm_kernels", "emdist.models.hmm_kind",
            "emdist.models.vq",
            "emdist.models.defaults", "emdist.data.datadir", "emdist.io.modelio"]
# Lowest first. A module may import its own layer and the ones before it (at import time;
# the CLI imports everything inside its commands, lazily).
LAYERS = ["emdist.errors", "emdist.models", "emdist.data", "emdist.corpora", "emdist.tasks",
          "emdist.io", "emdist.backends", "emdist.engine", "emdist.recognizer",
          "emdist.report", "emdist.api", "emdist.progress", "emdist.cli", "emdist"]


def _layer(module: str) -> int:
    for rank, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} is in no layer")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module's emdist imports made at import time, ``TYPE_CHECKING`` blocks included
    (imports inside functions are deliberate late imports, not layers)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        deps = set()
        for node in ast.parse(path.read_text()).body:
            for sub in ast.walk(node) if isinstance(node, ast.If | ast.Try) else [node]:
                if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("emdist"):
                    deps.add(sub.module)
                elif isinstance(sub, ast.Import):
                    deps.update(a.name for a in sub.names if a.name.startswith("emdist"))
        graph[_module(path)] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_lower_layers_never_import_higher_ones():
    graph = _imports()
    assert "emdist.models.kernel" in graph and "emdist.engine.driver" in graph
    upward = sorted((m, d) for m, deps in graph.items() for d in deps
                    if d in graph and _layer(d) > _layer(m))
    assert upward == []


def test_no_import_circle():
    graph = _imports()
    assert "emdist.engine" in graph and "emdist.engine.config" in graph["emdist.engine.trainer"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_numerics_never_import_dask():
    code = (f"import sys; import {', '.join(NUMERICS)}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
