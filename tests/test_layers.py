"""The layering of the packages: ``lua ← client ← gpuboss ← cli``.

Every module of the three packages is parsed (never imported) and every import in it collected:
at module level, inside functions and under ``if TYPE_CHECKING:``; relative imports are resolved
to absolute names, and ``from . import m`` counts as importing the submodule ``m``. Then:

- :mod:`gpuboss_client` imports neither :mod:`gpuboss` nor :mod:`gpuboss_cli`;
- :mod:`gpuboss` imports no :mod:`gpuboss_cli`;
- the imports between the project's modules have no cycle, also within one package;
- outside the client, only the modules that start or connect to Redis processes import ``redis``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "gpuboss_client": ROOT / "client" / "gpuboss_client",
    "gpuboss": ROOT / "gpuboss",
    "gpuboss_cli": ROOT / "cli" / "gpuboss_cli",
}
# What each package must not import: the layers above it.
FORBIDDEN = {
    "gpuboss_client": ("gpuboss", "gpuboss_cli"),
    "gpuboss": ("gpuboss_cli",),
}
# The modules outside the client that may import redis directly.
REDIS_ALLOWED = {
    "gpuboss.server": "starts the service and connects to its Redis",
    "gpuboss.embedded": "starts the embedded redis-server (or fakeredis) and connects to it",
}


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    path: Path
    is_package: bool  # an __init__.py: relative imports start at the module itself


@dataclass(frozen=True, slots=True)
class Import:
    target: str  # absolute name of what is imported: a module, or a package for `from pkg import x`
    line: int


def discover() -> dict[str, Module]:
    """Every .py module of the three packages, by its absolute name."""
    found: dict[str, Module] = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            found[name] = Module(name, path, is_package)
    return found


def collect_imports(source: str, module: Module, known: Iterable[str]) -> list[Import]:
    """The imports of ``source`` (the text of ``module``), anywhere in it, with absolute names.

    ``from X import y`` names ``X.y`` when that is one of the ``known`` modules (a submodule),
    otherwise ``X``; ``from . import m`` is thus the submodule ``m``.
    """
    known = set(known)
    found: list[Import] = []
    for node in ast.walk(ast.parse(source, filename=str(module.path))):
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.name if module.is_package else module.name.rpartition(".")[0]
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{module.path}:{node.lineno}: relative import beyond the top package")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                if node.module:
                    base += "." + node.module
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(sub if sub in known else base, node.lineno))
    return sorted(found, key=lambda i: (i.line, i.target))


def project_module(name: str, known: Mapping[str, Module]) -> str | None:
    """The project module that ``name`` refers to (its longest known prefix), or None if outside."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def top(name: str) -> str:
    return name.partition(".")[0]


Graph = Mapping[str, Mapping[str, int]]  # module -> {imported project module: line of the import}


def build_graph(
    modules: Mapping[str, Module], imports: Mapping[str, list[Import]]
) -> dict[str, dict[str, int]]:
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, found in imports.items():
        for imp in found:
            target = project_module(imp.target, modules)
            if target is not None and target != name:  # a module importing itself is harmless
                graph[name].setdefault(target, imp.line)
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """A cycle of ``graph`` as [a, b, ..., a] (each imports the next), or None if it has none.

    Depth-first, in sorted order, so the same graph always reports the same cycle.
    """
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        stack = [iter(sorted(graph.get(start, ())))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def describe_cycle(cycle: list[str], graph: Graph, modules: Mapping[str, Module] | None = None) -> str:
    """One line per import of the cycle: where it is, and what it imports."""
    lines = []
    for a, b in pairwise(cycle):
        where = modules[a].path.relative_to(ROOT) if modules is not None else a
        lines.append(f"  {a} ({where}:{graph[a][b]}) imports {b}")
    return "import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(lines)


def assert_acyclic(graph: Graph, modules: Mapping[str, Module] | None = None) -> None:
    cycle = find_cycle(graph)
    if cycle is not None:
        raise AssertionError(describe_cycle(cycle, graph, modules))


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    found = discover()
    for package in PACKAGES:
        assert package in found, f"no {package}/__init__.py under {PACKAGES[package]}"
    return found


@pytest.fixture(scope="module")
def imports(modules: dict[str, Module]) -> dict[str, list[Import]]:
    return {
        name: collect_imports(m.path.read_text(encoding="utf-8"), m, modules) for name, m in modules.items()
    }


def where(modules: Mapping[str, Module], name: str, imp: Import) -> str:
    return f"{modules[name].path.relative_to(ROOT)}:{imp.line}: {name} imports {imp.target}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(
    package: str, modules: dict[str, Module], imports: dict[str, list[Import]]
) -> None:
    bad = [
        where(modules, name, imp)
        for name, found in imports.items()
        if top(name) == package
        for imp in found
        if top(imp.target) in FORBIDDEN[package]
    ]
    assert not bad, f"{package} must import nothing from {', '.join(FORBIDDEN[package])}:\n" + "\n".join(bad)


def test_no_import_cycle(modules: dict[str, Module], imports: dict[str, list[Import]]) -> None:
    assert_acyclic(build_graph(modules, imports), modules)


def test_only_the_redis_starters_import_redis_outside_the_client(
    modules: dict[str, Module], imports: dict[str, list[Import]]
) -> None:
    stale = sorted(set(REDIS_ALLOWED) - set(modules))
    assert not stale, f"REDIS_ALLOWED names modules that do not exist: {stale}"
    bad = [
        where(modules, name, imp)
        for name, found in imports.items()
        if top(name) != "gpuboss_client" and name not in REDIS_ALLOWED
        for imp in found
        if top(imp.target) == "redis"
    ]
    assert not bad, (
        "only " + ", ".join(sorted(REDIS_ALLOWED)) + " may import redis outside gpuboss_client; "
        "talk to Redis through gpuboss_client instead:\n" + "\n".join(bad)
    )


def test_the_packages_import() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import gpuboss_cli.main, gpuboss.api, gpuboss_client"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr


# The checks' own machinery, on hand-made input.


def test_find_cycle_reports_a_cycle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    with pytest.raises(AssertionError, match=r"import cycle a -> b -> c -> a:\n  a \(a:1\) imports b\n"):
        assert_acyclic(graph)


def test_find_cycle_finds_one_deep_in_the_graph() -> None:
    graph = {"a": {"b": 1, "c": 1}, "b": {"d": 1}, "c": {"d": 1}, "d": {"e": 1}, "e": {"c": 1}}
    assert find_cycle(graph) == ["d", "e", "c", "d"]  # a, b, d, e, c: and c imports d
    assert find_cycle({"x": {"x": 1}}) == ["x", "x"]


def test_find_cycle_accepts_a_graph_without_one() -> None:
    diamond = {"a": {"b": 1, "c": 1}, "b": {"d": 1}, "c": {"d": 1}, "d": {}}
    assert find_cycle(diamond) is None
    assert find_cycle({}) is None


def test_collect_imports_resolves_relative_imports() -> None:
    known = {"pkg", "pkg.sub", "pkg.sub.mod", "pkg.sub.m", "pkg.other"}
    source = (
        "import os, pkg.other\n"
        "from . import m\n"
        "from .m import thing\n"
        "from .. import other\n"
        "from ..other import x\n"
        "from pkg import name\n"
        "def f():\n"
        "    import redis.asyncio\n"
        "    from pkg.sub import mod\n"
    )
    found = collect_imports(source, Module("pkg.sub.mod", Path("mod.py"), False), known)
    assert [(i.target, i.line) for i in found] == [
        ("os", 1),
        ("pkg.other", 1),
        ("pkg.sub.m", 2),
        ("pkg.sub.m", 3),
        ("pkg.other", 4),
        ("pkg.other", 5),
        ("pkg", 6),
        ("redis.asyncio", 8),
        ("pkg.sub.mod", 9),
    ]
    in_init = collect_imports(
        "from . import m\nfrom .m import y\n", Module("pkg.sub", Path("i.py"), True), known
    )
    assert [i.target for i in in_init] == ["pkg.sub.m", "pkg.sub.m"]


def test_build_graph_keeps_only_project_modules() -> None:
    known = {n: Module(n, Path(n), False) for n in ("a", "a.x", "a.y")}
    imports = {
        "a": [Import("a.x", 1)],
        "a.x": [Import("redis", 1), Import("a.y.helper", 2), Import("a.x", 3)],
        "a.y": [Import("a", 4)],
    }
    assert build_graph(known, imports) == {"a": {"a.x": 1}, "a.x": {"a.y": 2}, "a.y": {"a": 4}}
    assert find_cycle(build_graph(known, imports)) == ["a", "a.x", "a.y", "a"]
