"""The house rules of the code base, checked: one object per public name, imports that go one way,
modules small enough to read in one sitting."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lightning_bigmac", "balancer")
MAX_LINES = 400


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        pkg = importlib.import_module(package)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}.")]
    return sorted(names)


def _path(module: str) -> Path:
    base = ROOT / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _imports(module: str) -> set[str]:
    """Modules of our packages that ``module`` imports anywhere in its body (function-level too)."""
    tree = ast.parse(_path(module).read_text())
    is_package = _path(module).name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _path(candidate).exists() else base)
    return {m for m in found if m.split(".")[0] in PACKAGES and m != module and _path(m).exists()}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m) for m in modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = [*path[path.index(n) :], n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m)


def test_public_names_name_one_thing():
    owners: dict[str, set[str]] = {}
    for name in _modules():
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", ()):
            obj = getattr(module, public)
            qualname = getattr(obj, "__qualname__", None)
            origin = f"{obj.__module__}.{qualname}" if qualname else f"object {id(obj)}"
            owners.setdefault(public, set()).add(origin)
    collisions = {k: sorted(v) for k, v in owners.items() if len(v) > 1}
    assert not collisions, f"one public name for several things: {collisions}"


@pytest.mark.parametrize("module", _modules())
def test_modules_stay_small(module):
    lines = len(_path(module).read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (> {MAX_LINES}): split it by job"


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [("balancer", "CostModel", "SampleCostModel"), ("lightning_bigmac.schedule", "CostModel", "OpCosts")],
)
def test_renamed_public_names_keep_a_deprecated_alias(module, old, new):
    package = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{module}.{old} is deprecated: use {module}.{new}"):
        assert getattr(package, old) is getattr(package, new)
    with pytest.raises(AttributeError):
        package.NoSuchName  # noqa: B018
