"""Imports go one way: model access at the bottom, measurements above it, the engine on top."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The bottom layer: what every other layer may import, and which imports nothing above itself.
BOTTOM = ("search.model", "search.errors", "search.failures", "search.registry")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in ("search", "evaluators") and n not in ("search",)}


def _allowed(name: str, layers: tuple[str, ...]) -> bool:
    return any(name == layer or name.startswith(layer + ".") for layer in layers)


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_the_bottom_layer_imports_nothing_above_it():
    files = [
        *(ROOT / "search" / "model").rglob("*.py"),
        *(ROOT / "search" / f"{m}.py" for m in ("errors", "failures", "registry")),
    ]
    wrong = {_module(f): sorted(n for n in _ours(_imports(f)) if not _allowed(n, BOTTOM)) for f in files}
    assert not {k: v for k, v in wrong.items() if v}


def test_evaluators_import_only_the_bottom_layer():
    wrong = {
        _module(f): sorted(n for n in _ours(_imports(f)) if not _allowed(n, (*BOTTOM, "evaluators")))
        for f in (ROOT / "evaluators").rglob("*.py")
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from search.study import run\n")
    assert not _allowed("search.study.run", BOTTOM) and "search.study" in _ours(_imports(bad))
