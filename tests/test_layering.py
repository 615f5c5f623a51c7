"""The package's imports point one way: down the layers stated in ``opd_train/__init__.py``, with no cycle.

Every ``import`` / ``from ... import`` of every module (lazy ones inside functions included) is read with ``ast``;
relative imports are resolved. A subpackage may import its own layer or lower ones; an upward import, or a cycle
between subpackages of one layer, fails with the module and the line.
"""
from __future__ import annotations

import ast
import pathlib

import opd_train

ROOT = pathlib.Path(opd_train.__file__).parent
LAYER = {name: i for i, names in enumerate(opd_train.LAYERS) for name in names}


def _module(path: pathlib.Path) -> tuple[str, str]:
    """(dotted module, its package) of a file below ROOT."""
    parts = ("opd_train",) + path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), ".".join(parts[:-1])
    return ".".join(parts), ".".join(parts[:-1])


def _imports(path: pathlib.Path):
    """(line, imported opd_train module) of every import in the file."""
    _, package = _module(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
            for name in names:
                yield node.lineno, name


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "opd_train" and len(parts) > 1 else None


def _edges() -> dict[tuple[str, str], str]:
    """(importer subpackage, imported subpackage) -> one place it happens."""
    edges = {}
    for path in sorted(ROOT.rglob("*.py")):
        src = _subpackage(_module(path)[0])
        for line, target in _imports(path):
            dst = _subpackage(target)
            if src and dst and src != dst:
                edges.setdefault((src, dst), f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    return edges


def test_every_subpackage_has_a_layer():
    found = {p.name.removesuffix(".py") for p in ROOT.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert found == set(LAYER), f"unlayered: {found - set(LAYER)}, stale: {set(LAYER) - found}"


def test_imports_point_down():
    upward = [where for (src, dst), where in _edges().items() if LAYER[dst] > LAYER[src]]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_cycle_between_subpackages():
    edges = _edges()
    graph: dict[str, set[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, set()).add(dst)

    def reach(a: str, b: str, seen: set) -> bool:
        return a == b or any(n not in seen and (seen.add(n) or reach(n, b, seen)) for n in graph.get(a, ()))
    cycles = [edges[(s, d)] for (s, d) in edges if reach(d, s, set())]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walk_sees_lazy_imports():
    """The walker would catch an upward import hidden inside a function (what a regression would look like)."""
    imported = {t for _, t in _imports(ROOT / "cli.py")}
    assert "opd_train.toy.experiment" in imported and "opd_train.train" in imported
