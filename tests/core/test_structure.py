"""The import structure stays clean: read from the source with ``ast``, so it holds for every module.

Four rules, each found broken at least once before this test existed:
- no module uses another module's ``_private`` name (a helper two modules need gets a public home);
- no import circle among the project's modules (lazy imports inside functions count: they hide one);
- no module-level ``__getattr__`` (lazy re-exports hide where a name lives);
- imports point one way: apps -> scorers/trainers -> the diffalign core.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: dict[str, int] = field(default_factory=dict)  # imported project module -> first line
    private_uses: list[str] = field(default_factory=list)


def _package_dirs() -> dict[str, Path]:
    """Top-level import names and their folders, as the wheel maps them (pyproject's package-dir)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {name: ROOT / folder for name, folder in config.get("package-dir", {}).items()}
    return mapping or {"diffalign": ROOT / "diffalign"}


PACKAGE_DIRS = _package_dirs()
TOP_LEVEL = {name.split(".")[0] for name in PACKAGE_DIRS}  # an import of these is an import of the project


def _project_modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    dirs = PACKAGE_DIRS
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            # A folder mapped to a sub-package of its own (trainers/ -> diffalign.trainers) is not also part of diffalign.
            if any(other != folder and other.is_relative_to(folder) and path.is_relative_to(other) for other in dirs.values()):
                continue
            parts = [part for part in relative.parts if part != "__init__"]
            name = ".".join([package, *parts])
            modules[name] = Module(name, path, path.name == "__init__.py", ast.parse(path.read_text(), str(path)))
    return modules


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of nodes under ``if TYPE_CHECKING:``: annotations only, never run, so never a circle."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    return skipped


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _analyse(modules: dict[str, Module]) -> None:
    for module in modules.values():
        skipped = _type_checking_nodes(module.tree)
        aliases: dict[str, str] = {}  # local name -> project module it is bound to
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target and target not in modules:
                        target = target.rpartition(".")[0]
                    if target and target != module.name:
                        if id(node) not in skipped:
                            module.imports.setdefault(target, node.lineno)
                        if alias.asname:
                            aliases[alias.asname] = alias.name if alias.name in modules else target
                    for part in alias.name.split("."):
                        if _is_private(part) and alias.name.split(".")[0] in TOP_LEVEL:
                            module.private_uses.append(f"line {node.lineno}: imports the private module {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, node)
                if source.split(".")[0] not in TOP_LEVEL:
                    continue
                if any(_is_private(part) for part in source.split(".")):
                    module.private_uses.append(f"line {node.lineno}: imports from the private module {source}")
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    target = submodule if submodule in modules else source
                    if target in modules and target != module.name:
                        if id(node) not in skipped:
                            module.imports.setdefault(target, node.lineno)
                        if target == submodule:
                            aliases[alias.asname or alias.name] = submodule
                    if target == source and _is_private(alias.name) and source != module.name:
                        module.private_uses.append(f"line {node.lineno}: imports the private name {alias.name} from {source}")
        for node in ast.walk(module.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _is_private(node.attr)):
                module.private_uses.append(f"line {node.lineno}: uses the private name {node.attr} of {aliases[node.value.id]}")


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    found = _project_modules()
    _analyse(found)
    return found


def test_the_walk_sees_every_layer(modules):
    """Guards the other tests against passing vacuously (a mapping change that finds no module)."""
    layers = {name.split(".")[1] for name in modules if name.count(".") >= 1}
    assert {"trainers", "scorers", "apps", "backbones", "data"} <= layers
    assert sum(len(module.imports) for module in modules.values()) > 100


def test_no_module_uses_another_modules_private_names(modules):
    found = [f"{module.path.relative_to(ROOT)} {use}" for module in modules.values() for use in module.private_uses]
    assert not found, "give the helper a public name in one public home:\n" + "\n".join(found)


def test_no_module_level_getattr(modules):
    found = [str(module.path.relative_to(ROOT)) for module in modules.values()
             if any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__" for node in module.tree.body)]
    assert not found, "import names from where they live instead of re-exporting them lazily:\n" + "\n".join(found)


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A shortest import path from ``start`` back to itself, or None (breadth-first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for name in frontier:
            for target in sorted(graph.get(name, ())):
                if target == start:
                    path = [name]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, name, start]
                if target not in parents:
                    parents[target] = name
                    following.append(target)
        frontier = following
    return None


def test_no_import_circle(modules):
    # A package's __init__ importing its own submodules is how a package shows its public face, not a circle.
    graph = {
        name: {target for target in module.imports if not (module.is_package and target.startswith(name + "."))}
        for name, module in modules.items()
    }
    circles: dict[frozenset[str], str] = {}
    for name in sorted(graph):
        if cycle := _cycle_through(name, graph):
            circles.setdefault(frozenset(cycle), " -> ".join(cycle))
    assert not circles, "break each circle (move the shared piece down a layer):\n" + "\n".join(sorted(circles.values()))


def _layer(name: str) -> str:
    second = name.split(".")[1] if "." in name else ""
    return second if second in {"apps", "trainers", "scorers"} else "core"


ALLOWED = {"core": {"core"}, "trainers": {"core", "trainers"}, "scorers": {"core", "scorers"},
           "apps": {"core", "trainers", "scorers", "apps"}}


def test_imports_point_one_way(modules):
    """apps -> scorers/trainers -> core: the core knows no method, scorer or app; methods know no app."""
    found = [
        f"{module.path.relative_to(ROOT)} line {line}: the {_layer(name)} layer imports {target}"
        for name, module in modules.items() for target, line in module.imports.items()
        if _layer(target) not in ALLOWED[_layer(name)]
    ]
    assert not found, "\n".join(found)


# Where per-family code belongs: the adapters, and the tiny builders, whose job is to build each
# family's architecture at toy size (they branch on the tiny names sd15/sd2/sdxl/sd3, not on a Backbone).
FAMILY_HOMES = ("diffalign.backbones", "diffalign.tiny")


def _spelled(side: ast.expr) -> object:
    """The name a comparison side reads: ``family``, ``x.family`` and ``record["family"]`` all read "family"."""
    if isinstance(side, ast.Name):
        return side.id
    if isinstance(side, ast.Attribute):
        return side.attr
    if isinstance(side, ast.Subscript) and isinstance(side.slice, ast.Constant):
        return side.slice.value
    return None


def _compares_family(node: ast.AST) -> bool:
    return isinstance(node, ast.Compare) and "family" in [_spelled(side) for side in [node.left, *node.comparators]]


def test_family_knowledge_lives_in_the_backbones(modules):
    """No ``if family == "sd3"`` outside the adapters: a new family is one new adapter, not a hunt for branches."""
    found = [
        f"{module.path.relative_to(ROOT)} line {node.lineno}: {ast.unparse(node)}"
        for name, module in modules.items() if not name.startswith(FAMILY_HOMES)
        for node in ast.walk(module.tree) if _compares_family(node)
    ]
    assert not found, "ask the Backbone (an attribute or method) instead:\n" + "\n".join(found)
