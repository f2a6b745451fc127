"""Orderings on the problem graph: finding a cycle, and the order the adjoints are pushed in."""

from __future__ import annotations

from typing import Mapping, Sequence


def find_cycle(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> list[str] | None:
    """A directed cycle among ``edges`` as its nodes, the first repeated at the end, or None."""
    nxt: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        nxt.setdefault(a, []).append(b)
    color: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for m in nxt.get(n, []):
            if color.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if color.get(m) is None:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        color[n] = 2
        return None

    for n in nodes:
        if color.get(n) is None:
            found = dfs(n)
            if found:
                return found
    return None


def push_order(nodes: list[str], inputs: Mapping[str, list[str]]) -> list[str] | None:
    """Order so that a problem comes before every problem it pushes into."""
    nodeset = set(nodes)
    indeg = {n: 0 for n in nodes}
    for n in nodes:
        for r in inputs[n]:
            if r in nodeset:
                indeg[r] += 1
    order, ready = [], [n for n in reversed(nodes) if indeg[n] == 0]
    while ready:
        n = ready.pop(0)
        order.append(n)
        for r in inputs[n]:
            if r in nodeset:
                indeg[r] -= 1
                if indeg[r] == 0:
                    ready.append(r)
    return order if len(order) == len(nodes) else None
