"""The import graph of the library runs one way: no cycles among logitcache's modules, and the
reports (inspect, verify, fidelity, compare) never import the dump or training entry points,
whose shared helpers live below them (device, metrics, students, targets)."""

import ast
from pathlib import Path

import logitcache

ROOT = Path(logitcache.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("logitcache", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str], top_level: bool) -> set[str]:
    """logitcache modules ``path`` imports (``top_level``: at import time only, not inside functions)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else ast.walk(tree)
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package.rsplit(".", node.level - 1)[0]] + ([base] if base else []))
            # "from logitcache import checks" imports the module checks, not the package's own code
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != _module_name(path):
                found.add(name)
    return found


def _graph(top_level: bool) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {m: _imports(p, set(files), top_level) for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _between_modules(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Without a module's imports of its own parent package: a package's __init__ defines what its
    parts need (logitcache.__version__, the codecs' base class) before importing them to re-export
    or register them, so those edges are the package's layout, not a dependency between modules."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def test_module_level_imports_have_no_cycle():
    graph = _between_modules(_graph(top_level=True))
    assert _cycle(graph) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself works


def test_reports_import_neither_train_nor_dump():
    graph = _graph(top_level=False)
    reports = [m for m in graph if m == "logitcache.report" or m.startswith("logitcache.reports")]
    assert len(reports) >= 7  # the facade, the package and its five concerns
    for m in reports:
        assert not graph[m] & {"logitcache.train", "logitcache.dump"}, m


def test_helpers_sit_below_dump_and_train():
    graph = _graph(top_level=False)
    for helper in ("logitcache.device", "logitcache.metrics", "logitcache.students", "logitcache.targets"):
        assert not graph[helper] & {"logitcache.train", "logitcache.dump"}, helper
        assert not any(m.startswith("logitcache.report") for m in graph[helper]), helper
