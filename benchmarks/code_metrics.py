"""Code-shape metrics over the project's own (non-test, non-benchmark) Python: the longest
functions, the imports of project modules made inside functions, and the module-level import
cycles (following function-local imports too).

    python benchmarks/code_metrics.py [--top 10]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package name it installs as (pyproject.toml's package-dir).
PACKAGES = {"threedgen": "threedgen", "guidance": "threedgen.guidance",
            "representations": "threedgen.representations", "webui": "threedgen.webui"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every project module."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def resolve(name: str, known: dict) -> str | None:
    """The project module an imported dotted name lives in (longest known prefix)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(path: Path, module: str, known: dict) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for each import in ``path``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = resolve(alias.name, known)
                    if target:
                        found.append((target, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")
                    parent = parent[: len(parent) - child.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in child.names:
                    target = resolve(f"{base}.{alias.name}", known) or resolve(base, known)
                    if target:
                        found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = modules()
    return {m: [i for i in imports(p, m, known) if i[0] != m] for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            strong(v)
    return out


def functions(top: int) -> list[tuple[int, str]]:
    rows = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)[:top]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)
    g = graph()
    local = [(m, t, line) for m, items in g.items() for t, line, inner in items if inner]
    print(f"project modules: {len(g)}")
    print(f"function-local imports of project modules: {len(local)}")
    for m, t, line in local:
        print(f"  {modules()[m].relative_to(ROOT)}:{line} -> {t}")
    edges = {m: {t for t, _, _ in items} for m, items in g.items()}
    print("import cycles (function-local imports followed):")
    for comp in cycles(edges):
        print("  " + " <-> ".join(comp))
    print("longest functions:")
    for n, where in functions(args.top):
        print(f"  {n:4d}  {where}")


if __name__ == "__main__":
    main()
