"""The package's layering, read from every import in its source (lazy imports inside functions included).

Top-level subpackages form no cycle; the bundle format and the graph utilities import no stage;
the runtime imports neither torch nor the export/calibration/models stages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGE = {"tests", "benchmarks", "docs", "build", "dist", "out", "bundles"}


def _modules() -> dict[str, Path]:
    """Dotted module name (without `latentrt.`) -> file, for every module of the package."""
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_PACKAGE or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    """The modules `path` imports (absolute names), latentrt's without the `latentrt.` prefix."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(["latentrt", *package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {n.removeprefix("latentrt.") if n.startswith("latentrt.") else n for n in names if n}


def _subpackage(module: str) -> str:
    return module.split(".")[0]


@pytest.fixture(scope="module")
def edges() -> dict[str, dict[str, set[str]]]:
    """Top-level subpackage -> subpackage it imports -> the importing modules."""
    modules = _modules()
    graph: dict[str, dict[str, set[str]]] = {}
    for module, path in modules.items():
        if not module:  # latentrt/__init__.py re-exports the public API from the layers
            continue
        for imported in _imports(module, path):
            top = _subpackage(imported)
            if top in {_subpackage(m) for m in modules} and top != _subpackage(module):
                graph.setdefault(_subpackage(module), {}).setdefault(top, set()).add(module)
    return graph


def test_no_cycle_between_subpackages(edges):
    def cycle_from(start: str, node: str, seen: list[str]) -> list[str] | None:
        for nxt in edges.get(node, {}):
            if nxt == start:
                return [*seen, nxt]
            if nxt not in seen:
                found = cycle_from(start, nxt, [*seen, nxt])
                if found:
                    return found
        return None

    for start in edges:
        cycle = cycle_from(start, start, [start])
        if cycle:
            hops = [f"{a} -> {b} (in {sorted(edges[a][b])})" for a, b in zip(cycle, cycle[1:])]
            pytest.fail("import cycle between subpackages: " + "; ".join(hops))


# The README's layout table, bottom layer first: a subpackage imports only those before it.
LAYERS = ("_version", "errors", "bundle", "graph", "engines", "runtime", "serve", "calibration", "models", "export", "debug", "bench", "cli")


def test_layers_import_only_lower_layers(edges):
    assert set(edges) <= set(LAYERS), f"subpackages missing from LAYERS (and the README's table): {sorted(set(edges) - set(LAYERS))}"
    for package, targets in edges.items():
        upward = {k: sorted(v) for k, v in targets.items() if LAYERS.index(k) > LAYERS.index(package)}
        assert not upward, f"{package}/ imports higher layers {upward}; it may import only {LAYERS[: LAYERS.index(package)]}"


def test_runtime_and_serving_import_no_torch():
    heavy = {"torch", "diffusers", "transformers"}
    for module, path in _modules().items():
        if module.startswith(("runtime", "serve")):
            bad = {n for n in _imports(module, path) if n.split(".")[0] in heavy}
            assert not bad, f"{path} imports {sorted(bad)}; the runtime and the served model must stay torch-free"


def test_walk_sees_lazy_and_relative_imports():
    """The walk is not vacuous: it finds a function-local import and a relative one."""
    modules = _modules()
    assert "engines.build" in _imports("runtime.backends.tensorrt.loop", modules["runtime.backends.tensorrt.loop"])
    assert "models.demo.dataset" in _imports("models.demo.analyser", modules["models.demo.analyser"])
