"""The package's import graph has no cycle (counting imports inside functions too: a late import that only
breaks a cycle hides a tangle), and the library never imports Dagster or the Dagster layer."""

import ast
from pathlib import Path

import carl_assets

ROOT = Path(carl_assets.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    edges[name].add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                edges[name].update(alias.name for alias in node.names)
    return {name: {t for t in targets if t in modules and t != name} for name, targets in edges.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_known_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    assert _cycles(_imports()) == []


def _dagster_side(name: str) -> bool:
    """Dagster itself, an integration or the project's Dagster layer (dagster_pipes, the small client side
    of Pipes that a training process under torchrun reports through, is not)."""
    if name.startswith("dagster_pipes"):
        return False
    return name == "dagster" or name.startswith(("dagster.", "dagster_", "carl_assets.defs"))


def test_the_library_does_not_import_dagster_or_its_layer():
    # The layers above the library: the Dagster definitions and the CLI over both.
    above = {"defs", "cli"}
    library = [p for p in ROOT.rglob("*.py") if not above & set(p.relative_to(ROOT).parts)]
    offenders = []
    for path in library:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            )
            if any(_dagster_side(n) for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    allowed = {"definitions.py", "dagster_instance.py"}  # the entry point `dg` loads; the instance's yaml
    assert sorted(set(offenders) - allowed) == []
