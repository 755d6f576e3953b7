"""Print every import circle among lorakit's modules (strongly connected components of the import graph).

``make test`` runs it (exit 1 on a circle); the layer order itself is checked by ``lint-imports``.
"""

from __future__ import annotations

import sys

import grimp


def cycles(package: str = "lorakit") -> list[list[str]]:
    graph = grimp.build_graph(package)
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
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

    sys.setrecursionlimit(10_000)
    for m in modules:
        if m not in index:
            visit(m)
    return out


if __name__ == "__main__":
    found = cycles()
    for c in found:
        print("import circle:", " <-> ".join(c))
    print(f"{len(found)} import circle(s)")
    sys.exit(1 if found else 0)
