"""The package's layers as its folders say: imports run demo -> public face -> plumbing
(fused_s2s.backends), never back up, and no module imports itself through others. Read from
the source (every import statement, also inside functions), not from what happens to load."""
import ast
from pathlib import Path
from typing import Dict, Set

PACKAGE = Path(__file__).resolve().parent.parent / "fused_s2s"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> Dict[str, Set[str]]:
    """{module: the fused_s2s modules it imports} (`from a import b` counts a and a.b)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        # a module importing a package's submodule loads the package's __init__ first: only count
        # the package itself when it is not the importer's own ancestor
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def _layer(module: str) -> str:
    if module == "fused_s2s.__main__":  # `python -m fused_s2s`: the demo's command line
        return "demo"
    if module.startswith("fused_s2s.backends"):
        return "plumbing"
    if module.startswith("fused_s2s.demo"):
        return "demo"
    return "face"


def test_imports_run_one_way():
    allowed = {"plumbing": {"plumbing"}, "face": {"face", "plumbing"}, "demo": {"demo", "face"}}
    wrong = sorted(f"{m} imports {t}" for m, targets in _imports().items() for t in targets
                   if _layer(t) not in allowed[_layer(m)])
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = _imports()
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_graph_reads_every_kind_of_import():
    """Relative, absolute and function-level imports are all seen (a guard against checks
    that pass because they read nothing)."""
    graph = _imports()
    assert "fused_s2s.backends.registry" in graph["fused_s2s.backends.dispatch"]
    assert "fused_s2s.functional" in graph["fused_s2s.demo.models"]
    assert "fused_s2s.backends.build" in graph["fused_s2s.backends.registry"]  # imported inside a function
